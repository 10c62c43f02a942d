"""State-dict files both ways: `.safetensors` (no torch needed) and `.pth` / `.pt` / `.bin`.

A state dict here is {PyTorch key: numpy array}. PyTorch files are read with
`torch.load(weights_only=True)`, which refuses pickled code, so loading an untrusted file
cannot run anything; torch is imported only when such a file is touched. Checkpoints that
wrap their weights (`{'model': ...}` as facebookresearch/mae, `{'state_dict': ...}` as many
Lightning/mmcv files) are unwrapped on load. Every error names the file: an unreadable,
truncated or foreign file is a DataError (ValueError), and so is an unwritable output.
"""

from __future__ import annotations

import pathlib
import pickle
import zipfile
from collections.abc import Mapping

import numpy as np

from ultrajax.configlib import DataError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
WRAPPER_KEYS = ("model", "state_dict")


def file_kind(path) -> str:
  """'safetensors' | 'torch' from the file name; other suffixes raise ValueError naming it."""
  suffix = pathlib.Path(path).suffix.lower()
  if suffix in SAFETENSORS_SUFFIXES:
    return "safetensors"
  if suffix in TORCH_SUFFIXES:
    return "torch"
  raise ValueError(
    f"{path}: unknown state-dict file type {suffix!r}; use one of "
    f"{SAFETENSORS_SUFFIXES + TORCH_SUFFIXES}"
  )


def _torch(path):
  try:
    import torch
  except ImportError:
    raise ImportError(
      f"{path}: PyTorch files need torch (pip install 'ultrajax[torch]'), or "
      "use a .safetensors file instead"
    ) from None
  return torch


def nonfinite_keys(tensors: Mapping[str, np.ndarray]) -> list[str]:
  """Keys (in order) of the floating-point arrays that hold a NaN or an infinity."""
  return [
    k
    for k, v in tensors.items()
    if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.all(np.isfinite(v))
  ]


def save_state_dict(
  path,
  tensors: Mapping[str, np.ndarray],
  *,
  wrap_key: str | None = None,
  metadata: Mapping[str, str] | None = None,
) -> pathlib.Path:
  """Writes {key: array} to `path` (.safetensors or .pth/.pt/.bin); returns the path.

  metadata: {str: str} added to a safetensors file's header (after format=pt); PyTorch files
  have no header, so it is ignored there (export.py writes it to a JSON sidecar instead).
  wrap_key: PyTorch files only, stores {wrap_key: state_dict} (the official MAE files use
  'model'); safetensors files are flat and cannot wrap. A path that cannot be written raises
  DataError naming it (not the writer's temporary file).
  """
  path = pathlib.Path(path)
  kind = file_kind(path)
  if kind == "safetensors" and wrap_key is not None:
    raise ValueError(f"{path}: safetensors files are flat; wrap_key={wrap_key!r} needs .pth")
  # Contiguous, writable, owned memory: both writers need the first, torch.from_numpy the rest.
  arrays = {k: np.require(v, requirements=("C", "W", "O")) for k, v in tensors.items()}
  torch = _torch(path) if kind == "torch" else None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "safetensors":
      from safetensors.numpy import save_file

      # metadata format=pt: what transformers/timm expect of a PyTorch-layout safetensors file.
      save_file(arrays, str(path), metadata={**(metadata or {}), "format": "pt"})
    else:
      state_dict = {k: torch.from_numpy(v) for k, v in arrays.items()}
      torch.save(state_dict if wrap_key is None else {wrap_key: state_dict}, path)
  except Exception as e:  # OSError, or safetensors' SafetensorError around one
    if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
      # safetensors writes through a temporary file next to `path` and names only that one.
      reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split(" at path")[0]
      raise DataError(f"cannot write {path}: {reason}") from e
    raise
  return path


def _unwrap(obj, path) -> Mapping:
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  for key in WRAPPER_KEYS:
    if isinstance(obj.get(key), Mapping):
      return obj[key]
  return obj


def _torch_to_numpy(torch, key: str, value, path) -> np.ndarray:
  if not isinstance(value, torch.Tensor):
    raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
  value = value.detach().cpu()
  if value.dtype == torch.bfloat16:  # numpy has no bfloat16
    value = value.float()
  return value.numpy()


def load_state_dict(path) -> dict[str, np.ndarray]:
  """{key: numpy array} from a .safetensors or .pth/.pt/.bin file, unwrapped from a
  'model'/'state_dict' key. bfloat16 tensors in PyTorch files come back as float32."""
  path = pathlib.Path(path)
  kind = file_kind(path)
  if not path.is_file():
    raise FileNotFoundError(f"no state-dict file at {path}")
  if kind == "safetensors":
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
      return load_file(str(path))
    except SafetensorError as e:
      raise DataError(
        f"{path}: not a readable safetensors file (truncated or damaged?): {e}"
      ) from None
  problem = _torch_file_problem(path)
  if problem:
    raise DataError(f"{path}: {problem}")
  torch = _torch(path)
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    first = " ".join(str(e).split())[:300]
    raise DataError(
      f"{path}: holds Python objects besides tensors (e.g. a training "
      "checkpoint's args), which weights_only loading refuses; save just its "
      f"weights, e.g. torch.save({{'model': ckpt['model']}}, ...): {first}"
    ) from None
  except (RuntimeError, EOFError, OSError) as e:
    first = " ".join(str(e).split())[:200]
    raise DataError(
      f"{path}: not a readable PyTorch file (truncated or damaged?): {first}"
    ) from None
  return {k: _torch_to_numpy(torch, k, v, path) for k, v in _unwrap(obj, path).items()}


def _torch_file_problem(path: pathlib.Path) -> str | None:
  """Why `path` cannot be a torch.save file, from its first bytes (None if it may be one).

  torch.save writes a zip archive (PyTorch >= 1.6) or, before that, a pickle (protocol 2+,
  first byte 0x80); anything else would reach the unpickler and be misreported.
  """
  with open(path, "rb") as f:
    head = f.read(4)
  if head.startswith(b"PK") and not zipfile.is_zipfile(path):
    return "a damaged or truncated zip archive (the PyTorch file format): no central directory"
  if head.startswith(b"PK") or head[:1] == b"\x80":
    return None
  return (
    f"not a PyTorch file: it starts with bytes {head!r}, neither a zip archive (PK) nor a "
    "pickle; damaged, or another format"
  )
