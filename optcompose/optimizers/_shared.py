"""What several recipes share: the optional proximal (elastic-net) step."""

from __future__ import annotations

from optcompose.transforms.proximal import prox_elastic_net


def _proximal(learning_rate, l1, l2, mask) -> tuple:
  """The optional proximal step; nothing when neither strength is given (``None``)."""
  if l1 is None and l2 is None:
    return ()
  return (
    prox_elastic_net(0.0 if l1 is None else l1, 0.0 if l2 is None else l2, learning_rate, mask),
  )
