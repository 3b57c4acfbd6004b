"""Follows nanoGPT (github.com/karpathy/nanoGPT: model.py and train.py) in the shape of its
Flax Linen ports (e.g. github.com/cgarciae/nanoGPT-jax), with the optimizer set up the way the
Flax/Hugging Face training scripts do it (run_clm_flax.py: ``decay_mask_fn``, ``optax.adamw``
with a warmup+cosine schedule, ``optax.MultiSteps`` for gradient accumulation).

Same structure and the same Optax calls: a GPT of ``Block``s (causal self-attention + MLP,
pre-LayerNorm, tied token embedding / LM head), ``get_batch`` sampling random windows of a
character corpus, a ``TrainState`` whose ``tx`` is ``optax.MultiSteps(optax.chain(
optax.clip_by_global_norm(grad_clip), optax.adamw(optax.warmup_cosine_decay_schedule(...),
b1, b2, weight_decay=..., mask=decay_mask_fn)), every_k_schedule=gradient_accumulation_steps)``
(weight decay on kernels and embeddings only, as nanoGPT's ``configure_optimizers``: not on
biases nor LayerNorm scales), and a jitted ``train_step`` with
``optax.softmax_cross_entropy_with_integer_labels`` and ``state.apply_gradients``.

Adapted to run offline in seconds: the corpus is a small synthetic character text generated
with NumPy instead of Shakespeare, the model is tiny (2 layers, 2 heads, 32-wide, context 16),
there is no dropout, no evaluation and no checkpointing, and ``main`` runs a fixed number of
micro-steps and returns the losses and the final parameters. The only line that differs in the
text of the training code is the import of ``optax``; ``main(optax_module)`` lets a test run
the same text under another module.
"""

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.training import train_state

import optcompose as optax  # the public original reads `import optax`


@dataclass
class GPTConfig:
  block_size: int = 16
  vocab_size: int = 32
  n_layer: int = 2
  n_head: int = 2
  n_embd: int = 32


class CausalSelfAttention(nn.Module):
  config: GPTConfig

  @nn.compact
  def __call__(self, x):
    B, T, C = x.shape
    n_head = self.config.n_head
    # calculate query, key, values for all heads in batch
    q, k, v = jnp.split(nn.Dense(3 * C, name='c_attn')(x), 3, axis=-1)
    q = q.reshape(B, T, n_head, C // n_head).swapaxes(1, 2)  # (B, nh, T, hs)
    k = k.reshape(B, T, n_head, C // n_head).swapaxes(1, 2)
    v = v.reshape(B, T, n_head, C // n_head).swapaxes(1, 2)
    # causal self-attention; (B, nh, T, hs) x (B, nh, hs, T) -> (B, nh, T, T)
    att = (q @ k.swapaxes(-2, -1)) * (1.0 / jnp.sqrt(k.shape[-1]))
    mask = jnp.tril(jnp.ones((T, T), dtype=bool)).reshape(1, 1, T, T)
    att = jnp.where(mask, att, jnp.finfo(att.dtype).min)
    att = jax.nn.softmax(att, axis=-1)
    y = att @ v  # (B, nh, T, hs)
    y = y.swapaxes(1, 2).reshape(B, T, C)  # re-assemble all head outputs side by side
    return nn.Dense(C, name='c_proj')(y)


class MLP(nn.Module):
  config: GPTConfig

  @nn.compact
  def __call__(self, x):
    C = self.config.n_embd
    x = nn.Dense(4 * C, name='c_fc')(x)
    x = nn.gelu(x, approximate=True)
    return nn.Dense(C, name='c_proj')(x)


class Block(nn.Module):
  config: GPTConfig

  @nn.compact
  def __call__(self, x):
    x = x + CausalSelfAttention(self.config, name='attn')(nn.LayerNorm(name='ln_1')(x))
    x = x + MLP(self.config, name='mlp')(nn.LayerNorm(name='ln_2')(x))
    return x


class GPT(nn.Module):
  config: GPTConfig

  @nn.compact
  def __call__(self, idx):
    _, t = idx.shape
    assert t <= self.config.block_size
    pos = jnp.arange(0, t)[None]  # shape (1, t)
    wte = nn.Embed(self.config.vocab_size, self.config.n_embd, name='wte')
    wpe = nn.Embed(self.config.block_size, self.config.n_embd, name='wpe')
    x = wte(idx) + wpe(pos)
    for i in range(self.config.n_layer):
      x = Block(self.config, name=str(i))(x)
    x = nn.LayerNorm(name='ln_f')(x)
    return wte.attend(x)  # weight tying: lm_head shares wte's embedding


def make_corpus(seed, length=4000):
  """Synthetic stand-in for shakespeare_char: sentences from a small vocabulary of words."""
  rs = np.random.RandomState(seed)
  words = ['to', 'be', 'or', 'not', 'the', 'king', 'queen', 'of', 'my', 'lord', 'and', 'thou',
           'art', 'good', 'night', 'sweet', 'prince', 'is', 'this', 'a', 'dagger']
  text = ''
  while len(text) < length:
    text += ' '.join(rs.choice(words, rs.randint(3, 9))).capitalize() + '.\n'
  chars = sorted(set(text))
  stoi = {ch: i for i, ch in enumerate(chars)}
  return np.array([stoi[c] for c in text], dtype=np.int32), len(chars)


def get_batch(data, rs, batch_size, block_size):
  ix = rs.randint(0, len(data) - block_size, batch_size)
  x = np.stack([data[i:i + block_size] for i in ix])
  y = np.stack([data[i + 1:i + 1 + block_size] for i in ix])
  return jnp.asarray(x), jnp.asarray(y)


def decay_mask_fn(params):
  # weight decay on the matmul kernels and embeddings, none on biases and LayerNorm scales
  flat_params = traverse_util.flatten_dict(params)
  flat_mask = {path: path[-1] in ('kernel', 'embedding') for path in flat_params}
  return traverse_util.unflatten_dict(flat_mask)


def create_train_state(rng, model, config, train):
  params = model.init(rng, jnp.ones((1, config.block_size), dtype=jnp.int32))['params']
  lr_schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train['learning_rate'], warmup_steps=train['warmup_iters'],
      decay_steps=train['lr_decay_iters'], end_value=train['min_lr'])
  tx = optax.chain(
      optax.clip_by_global_norm(train['grad_clip']),
      optax.adamw(lr_schedule, b1=train['beta1'], b2=train['beta2'],
                  weight_decay=train['weight_decay'], mask=decay_mask_fn),
  )
  tx = optax.MultiSteps(tx, every_k_schedule=train['gradient_accumulation_steps'])
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


@jax.jit
def train_step(state, x, y):
  def loss_fn(params):
    logits = state.apply_fn({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  state = state.apply_gradients(grads=grads)
  return state, loss


def main(optax_module=None, steps=40, seed=0):
  """Runs `steps` micro-steps; returns the losses and the final parameters
  (flattened, and by path)."""
  global optax
  if optax_module is not None:
    optax = optax_module
  train = {'batch_size': 16, 'learning_rate': 3e-3, 'min_lr': 3e-4, 'warmup_iters': 4,
           'lr_decay_iters': steps // 2, 'weight_decay': 0.1, 'beta1': 0.9, 'beta2': 0.99,
           'grad_clip': 1.0, 'gradient_accumulation_steps': 2}
  data, vocab_size = make_corpus(seed)
  config = GPTConfig(vocab_size=vocab_size)
  model = GPT(config)
  state = create_train_state(jax.random.PRNGKey(seed), model, config, train)

  rs = np.random.RandomState(seed)
  losses = []
  for it in range(steps):
    x, y = get_batch(data, rs, train['batch_size'], config.block_size)
    state, loss = train_step(state, x, y)
    losses.append(float(loss))
    if it % 10 == 0 or it == steps - 1:
      print(f'iter {it}: loss {loss:.4f}')

  named = {jax.tree_util.keystr(path): np.asarray(p)
           for path, p in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  flat = np.concatenate([np.ravel(p) for p in named.values()])
  return {'losses': losses, 'loss': losses[-1], 'params': flat, 'named_params': named}


if __name__ == '__main__':
  main()
