"""What several recipes share: the optional proximal (elastic-net) step."""

from __future__ import annotations

from optcompose.core import MASK, real
from optcompose.transforms.proximal import prox_elastic_net

_STRENGTH = real(0.0, optional=True)


def _proximal(learning_rate, l1, l2, mask, *, who: str, mask_name: str) -> tuple:
  """The optional proximal step; nothing when neither strength is given (``None``). Its
  arguments are checked first under the recipe's names (``sgd: `l2```, ``reg_mask``), not
  the inner ``prox_elastic_net``'s."""
  for name, value in (("l1", l1), ("l2", l2)):
    _STRENGTH.check(who, name, value)
  MASK.check(who, mask_name, mask)
  if l1 is None and l2 is None:
    return ()
  return (
    prox_elastic_net(0.0 if l1 is None else l1, 0.0 if l2 is None else l2, learning_rate, mask),
  )
