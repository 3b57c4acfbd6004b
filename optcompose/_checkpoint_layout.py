"""Orbax's layout of a checkpoint directory: what ``save_orbax_checkpoint(..., overwrite=True)``
may replace (a directory that holds that and nothing else), and which of the errors of Orbax
reading one mean that it is damaged."""

from __future__ import annotations

import json
import pathlib
import re
import traceback

SIDECAR = "optcompose_checkpoint.json"  # checksums and layouts inside an Orbax directory

# What Orbax (0.10 to 0.12) writes at the top of a checkpoint directory, with this library's
# sidecar: the metadata (one of them marks a checkpoint), the arrays' OCDBT store, a commit
# marker; "checkpoint" is older Orbax's one msgpack file.
_METADATA = {"_CHECKPOINT_METADATA", "_METADATA", "checkpoint", "manifest.ocdbt", SIDECAR}
_ORBAX_NAMES = _METADATA | {
  "_sharding",
  "d",
  "array_metadatas",
  "commit_success.txt",
  "descriptor",
  "default",  # a CheckpointManager step's item directory
}
_ORBAX_PATTERN = re.compile(r"ocdbt\.process_\d+")
_OCDBT_MAGIC = bytes.fromhex("0cdb3a2a")
_HEX = re.compile(r"[0-9a-f]{8,64}")
# What each of Orbax's subdirectories holds: the names of its files, and whether it may hold
# a "d" directory of hex-named data files (an ocdbt.process_N directory does).
_LAYOUT = {
  "d": (_HEX, False),
  "array_metadatas": (re.compile(r"process_\d+"), False),
  "descriptor": (re.compile(r"[\w.-]+\.pbtxt"), False),
}
_PROCESS_LAYOUT = (re.compile(r"manifest\.ocdbt"), True)


def replaceable(fn: str, directory: pathlib.Path) -> None:
  """Raise a ValueError unless ``directory`` is an Orbax checkpoint (metadata that reads as
  Orbax's or this library's, the rest laid out as Orbax lays it out) holding nothing else,
  or an empty directory: what ``overwrite=True`` may replace without losing a file the user
  put there (a directory of other files, a file of theirs named ``checkpoint``, or a
  checkpoint with the user's notes or metrics saved into it, at the top or below)."""
  names = {p.name for p in directory.iterdir()} if directory.is_dir() else {"(a file)"}
  if names and not any(_marks(directory / n) for n in names & _METADATA):
    raise ValueError(
      f"{fn}: {directory} exists and is not a checkpoint (no Orbax metadata in it: "
      f"{sorted(names)[:3]}): overwrite=True replaces a checkpoint only, never other files; "
      "move them, or save under another path."
    )
  others = [str(p.relative_to(directory)) for p in _not_orbax(directory)]
  if others:
    raise ValueError(
      f"{fn}: the checkpoint {directory} also holds files outside the layout of the "
      "checkpoints this function writes (Orbax's OCDBT layout, one unnamed item) "
      f"({', '.join(sorted(others)[:3])}{', ...' if len(others) > 3 else ''}): overwrite=True "
      "would delete them with the checkpoint, so it refuses; move them out of it (or delete "
      "an older checkpoint of another layout yourself), or save under another path."
    )


def _marks(path: pathlib.Path) -> bool:
  """Whether ``path``, named as a checkpoint's metadata, reads as one: JSON (Orbax's
  metadata, this library's sidecar), msgpack (older Orbax's ``checkpoint``), or an OCDBT
  manifest (its magic number). A user's file that is merely so named does not."""
  try:
    data = path.read_bytes() if path.is_file() else None
  except OSError:
    return False
  if data is None or path.name == "manifest.ocdbt":
    return data is not None and data[:4] == _OCDBT_MAGIC
  try:
    if path.name == "checkpoint":
      import msgpack  # Flax's dependency, as the msgpack checkpoints are

      msgpack.unpackb(data, strict_map_key=False)
    else:
      json.loads(data)
  except Exception:  # any decoding error: not metadata  # noqa: BLE001
    return False
  return True


def _not_orbax(directory: pathlib.Path) -> list:
  """The paths under ``directory`` that Orbax's layout does not account for: at the top the
  names Orbax writes; below, ``d/<hex>`` data files (also under ``ocdbt.process_N``, with
  its manifest), ``array_metadatas/process_N``, ``descriptor/*.pbtxt``, and ``default``, a
  CheckpointManager item laid out as a checkpoint."""
  out = []
  for p in directory.iterdir():
    name = p.name
    if not (name in _ORBAX_NAMES or _ORBAX_PATTERN.fullmatch(name)):
      out.append(p)
    elif name == "default" and p.is_dir():
      out += _not_orbax(p)
    elif p.is_dir() and (name in _LAYOUT or _ORBAX_PATTERN.fullmatch(name)):
      files, data = _LAYOUT.get(name, _PROCESS_LAYOUT)
      for q in p.iterdir():
        if q.is_dir() and q.name == "d" and data:
          out += [r for r in q.iterdir() if r.is_dir() or not _HEX.fullmatch(r.name)]
        elif q.is_dir() or not files.fullmatch(q.name):
          out.append(q)
    elif p.is_dir():
      out.append(p)  # a directory Orbax's layout has no place for
  return out


_DAMAGE = ("DATA_LOSS", "NOT_FOUND", "FAILED_PRECONDITION", "OUT_OF_RANGE")  # TensorStore's


def _is_damage(error: BaseException) -> bool:
  """Whether Orbax's error reading a checkpoint means a damaged one (not a bug): TensorStore's
  codes, a file missing or undecodable, or a parsing error while Orbax reads its per-array
  metadata files (a flipped byte there is a KeyError or AttributeError of its parser)."""
  if isinstance(error, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError)):
    return True
  frames = traceback.extract_tb(error.__traceback__)
  parsing = isinstance(error, (KeyError, AttributeError, ValueError))  # not a TypeError: a bug
  in_metadata = parsing and any("array_metadata" in f.filename for f in frames)
  return str(error).startswith(_DAMAGE) or in_metadata


def metadatas_whole(directory: pathlib.Path) -> bool:
  """Whether each of Orbax's per-process array metadata files reads as Orbax writes them: a
  list under ``"array_metadatas"`` of ``{"array_metadata": {"param_name": ..., ...}}``. (A
  flipped bit in a key there makes Orbax fail far from it: an AttributeError of its array
  handler.)"""
  for path in (directory / "array_metadatas").glob("process_*"):
    try:
      entries = json.loads(path.read_bytes())["array_metadatas"]
      if not all(
        set(x) == {"array_metadata"} and isinstance(x["array_metadata"]["param_name"], str)
        for x in entries
      ):
        return False
    except Exception:  # undecodable, or not of that shape  # noqa: BLE001
      return False
  return True
