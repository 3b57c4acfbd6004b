"""Follows the Flax Linen MNIST example (github.com/google/flax, examples/mnist/train.py).

Same structure and the same Optax calls as the original: a small CNN, ``create_train_state``
building ``train_state.TrainState.create(apply_fn=cnn.apply, params=params,
tx=optax.sgd(learning_rate, momentum))``, a jitted ``apply_model`` computing
``optax.softmax_cross_entropy(logits=logits, labels=one_hot)`` and a jitted ``update_model``
calling ``state.apply_gradients``, fed shuffled batches by ``train_epoch``.

Adapted to run offline in seconds: the data is a synthetic 28x28 ten-class set generated with
NumPy instead of TFDS MNIST (one noisy prototype image per class), the CNN is narrower
(8/16 conv features, 32 hidden units instead of 32/64/256), there is no test split, the
config is a plain dict, and ``main`` runs a fixed number of steps and returns the losses and
the final parameters. The only line that differs in the text of the training code is the
import of ``optax``; ``main(optax_module)`` lets a test run the same text under another module.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.training import train_state

import optcompose as optax  # the public original reads `import optax`


class CNN(nn.Module):
  """A simple CNN model."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=8, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=16, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # flatten
    x = nn.Dense(features=32)(x)
    x = nn.relu(x)
    x = nn.Dense(features=10)(x)
    return x


@jax.jit
def apply_model(state, images, labels):
  """Computes gradients, loss and accuracy for a single batch."""

  def loss_fn(params):
    logits = state.apply_fn({'params': params}, images)
    one_hot = jax.nn.one_hot(labels, 10)
    loss = jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=one_hot))
    return loss, logits

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, logits), grads = grad_fn(state.params)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return grads, loss, accuracy


@jax.jit
def update_model(state, grads):
  return state.apply_gradients(grads=grads)


def train_epoch(state, train_ds, batch_size, rng, max_steps):
  """Train for a single epoch (or until `max_steps` batches)."""
  train_ds_size = len(train_ds['image'])
  steps_per_epoch = train_ds_size // batch_size

  perms = jax.random.permutation(rng, len(train_ds['image']))
  perms = perms[: steps_per_epoch * batch_size]  # skip incomplete batch
  perms = perms.reshape((steps_per_epoch, batch_size))

  epoch_loss = []
  epoch_accuracy = []

  for perm in perms[:max_steps]:
    batch_images = train_ds['image'][perm, ...]
    batch_labels = train_ds['label'][perm, ...]
    grads, loss, accuracy = apply_model(state, batch_images, batch_labels)
    state = update_model(state, grads)
    epoch_loss.append(float(loss))
    epoch_accuracy.append(float(accuracy))
  return state, epoch_loss, epoch_accuracy


def get_datasets(seed, n=512):
  """Synthetic stand-in for MNIST: 28x28x1 float32 images, ten classes."""
  rs = np.random.RandomState(seed)
  prototypes = rs.uniform(0.0, 1.0, (10, 28, 28, 1)).astype(np.float32)
  labels = rs.randint(0, 10, n).astype(np.int32)
  images = prototypes[labels] + 0.5 * rs.normal(size=(n, 28, 28, 1)).astype(np.float32)
  return {'image': jnp.asarray(images), 'label': jnp.asarray(labels)}


def create_train_state(rng, config):
  """Creates initial `TrainState`."""
  cnn = CNN()
  params = cnn.init(rng, jnp.ones([1, 28, 28, 1]))['params']
  tx = optax.sgd(config['learning_rate'], config['momentum'])
  return train_state.TrainState.create(apply_fn=cnn.apply, params=params, tx=tx)


def main(optax_module=None, steps=30, seed=0):
  """Trains `steps` batches; returns the losses and the final parameters
  (flattened, and by path)."""
  global optax
  if optax_module is not None:
    optax = optax_module
  config = {'learning_rate': 0.05, 'momentum': 0.9, 'batch_size': 32}
  train_ds = get_datasets(seed)
  rng = jax.random.key(seed)
  rng, init_rng = jax.random.split(rng)
  state = create_train_state(init_rng, config)

  losses, accuracies = [], []
  epoch = 0
  while len(losses) < steps:
    epoch += 1
    rng, input_rng = jax.random.split(rng)
    state, epoch_loss, epoch_accuracy = train_epoch(
        state, train_ds, config['batch_size'], input_rng, steps - len(losses))
    losses += epoch_loss
    accuracies += epoch_accuracy
    print(f'epoch:{epoch:3}, train_loss: {np.mean(epoch_loss):.4f}, '
          f'train_accuracy: {100 * np.mean(epoch_accuracy):.2f}')

  named = {jax.tree_util.keystr(path): np.asarray(p)
           for path, p in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  flat = np.concatenate([np.ravel(p) for p in named.values()])
  return {'losses': losses, 'loss': losses[-1], 'accuracy': accuracies[-1], 'params': flat,
          'named_params': named}


if __name__ == '__main__':
  main()
