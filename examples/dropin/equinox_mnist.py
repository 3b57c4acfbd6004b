"""Follows the Equinox "CNN on MNIST" example (docs.kidger.site/equinox/examples/mnist/,
github.com/patrick-kidger/equinox, examples/mnist.ipynb).

Same structure and the same Optax calls as the original: an ``eqx.Module`` CNN holding a list
of layers, ``loss`` / ``cross_entropy`` on log-softmax outputs, and ``train`` doing
``opt_state = optim.init(eqx.filter(model, eqx.is_array))`` and, inside an ``eqx.filter_jit``
``make_step``, ``eqx.filter_value_and_grad(loss)``, ``optim.update(grads, opt_state,
eqx.filter(model, eqx.is_array))`` and ``eqx.apply_updates``, with ``optim = optax.adamw(
LEARNING_RATE)``.

Adapted to run offline in seconds: the data is a synthetic 28x28 ten-class set generated with
NumPy instead of torchvision MNIST (one noisy prototype image per class), the hidden layers
are narrower (64/32 units instead of 512/64), the learning rate is 2e-3 instead of 3e-4 so
that 30 steps show progress, there is no test loader or evaluation, the
loader is a NumPy generator instead of a torch DataLoader, and ``main`` returns the losses and
the final parameters. The only line that differs in the text of the training code is the
import of ``optax``; ``main(optax_module)`` lets a test run the same text under another module.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PyTree

import optcompose as optax  # noqa: F401  (the public original reads `import optax`)

# Hyperparameters

BATCH_SIZE = 32
LEARNING_RATE = 2e-3
STEPS = 30
PRINT_EVERY = 10
SEED = 5678


class CNN(eqx.Module):
  layers: list

  def __init__(self, key):
    key1, key2, key3, key4 = jax.random.split(key, 4)
    # Standard CNN setup: convolutional layer, followed by flattening,
    # with a small MLP on top.
    self.layers = [
        eqx.nn.Conv2d(1, 3, kernel_size=4, key=key1),
        eqx.nn.MaxPool2d(kernel_size=2),
        jax.nn.relu,
        jnp.ravel,
        eqx.nn.Linear(1728, 64, key=key2),
        jax.nn.sigmoid,
        eqx.nn.Linear(64, 32, key=key3),
        jax.nn.relu,
        eqx.nn.Linear(32, 10, key=key4),
        jax.nn.log_softmax,
    ]

  def __call__(self, x: Float[Array, "1 28 28"]) -> Float[Array, "10"]:
    for layer in self.layers:
      x = layer(x)
    return x


def loss(
    model: CNN, x: Float[Array, "batch 1 28 28"], y: Int[Array, " batch"]
) -> Float[Array, ""]:
  # Our input has the shape (BATCH_SIZE, 1, 28, 28), but our model operations on
  # a single input input image of shape (1, 28, 28).
  #
  # Therefore, we have to use jax.vmap, which in this case maps our model over the
  # leading (batch) axis.
  pred_y = jax.vmap(model)(x)
  return cross_entropy(y, pred_y)


def cross_entropy(
    y: Int[Array, " batch"], pred_y: Float[Array, "batch 10"]
) -> Float[Array, ""]:
  # y are the true targets, and should be integers 0-9.
  # pred_y are the log-softmax'd predictions.
  pred_y = jnp.take_along_axis(pred_y, jnp.expand_dims(y, 1), axis=1)
  return -jnp.mean(pred_y)


def trainloader_from(seed, n=512):
  """Synthetic stand-in for the MNIST DataLoader: endless shuffled (x, y) batches."""
  rs = np.random.RandomState(seed)
  prototypes = rs.uniform(0.0, 1.0, (10, 1, 28, 28)).astype(np.float32)
  labels = rs.randint(0, 10, n).astype(np.int32)
  images = prototypes[labels] + 0.5 * rs.normal(size=(n, 1, 28, 28)).astype(np.float32)
  while True:
    perm = rs.permutation(n)
    for start in range(0, n - BATCH_SIZE + 1, BATCH_SIZE):
      idx = perm[start:start + BATCH_SIZE]
      yield images[idx], labels[idx]


def train(
    model: CNN,
    trainloader,
    optim,
    steps: int,
    print_every: int,
):
  # Just like earlier: It only makes sense to train the arrays in our model,
  # so filter out everything else.
  opt_state = optim.init(eqx.filter(model, eqx.is_array))

  # Always wrap everything -- computing gradients, running the optimiser, updating
  # the model -- into a single JIT region. This ensures things run as fast as
  # possible.
  @eqx.filter_jit
  def make_step(
      model: CNN,
      opt_state: PyTree,
      x: Float[Array, "batch 1 28 28"],
      y: Int[Array, " batch"],
  ):
    loss_value, grads = eqx.filter_value_and_grad(loss)(model, x, y)
    updates, opt_state = optim.update(
        grads, opt_state, eqx.filter(model, eqx.is_array)
    )
    model = eqx.apply_updates(model, updates)
    return model, opt_state, loss_value

  losses = []
  for step, (x, y) in zip(range(steps), trainloader):
    model, opt_state, train_loss = make_step(model, opt_state, x, y)
    losses.append(float(train_loss))
    if (step % print_every) == 0 or (step == steps - 1):
      print(f"{step=}, train_loss={train_loss.item()}")
  return model, losses


def main(optax_module=None, steps=STEPS, seed=0):
  """Trains `steps` batches; returns the losses and the final parameters
  (flattened, and by path)."""
  global optax
  if optax_module is not None:
    optax = optax_module
  key = jax.random.PRNGKey(SEED + seed)
  key, subkey = jax.random.split(key, 2)
  model = CNN(subkey)
  optim = optax.adamw(LEARNING_RATE)
  model, losses = train(model, trainloader_from(seed), optim, steps, PRINT_EVERY)
  named = {jax.tree_util.keystr(path): np.asarray(p)
           for path, p in jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_array))[0]}
  flat = np.concatenate([np.ravel(p) for p in named.values()])
  return {"losses": losses, "loss": losses[-1], "params": flat, "named_params": named}


if __name__ == "__main__":
  main()
