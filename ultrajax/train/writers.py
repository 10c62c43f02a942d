"""Metric writers behind clu's MetricWriter interface: log lines, TensorBoard and JSONL.

`create_writer(workdir)` writes every scalar to the log, to a TensorBoard event file in the
workdir (tensorboardX: no TensorFlow needed; images and flattened hyper-parameters too) and to
`workdir/metrics.jsonl`: one JSON object per logged step, with the step and every scalar (round,
loss, per-client losses, img_per_s, ...), easy to read back with pandas or `json.loads` per line.
Only process 0 writes files; other processes get a writer that only logs.
"""

from __future__ import annotations

import json
import logging as py_logging
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview

from ultrajax import configlib


class JsonlWriter(metric_writers.MetricWriter):
  """Appends scalars to a JSONL file, one object per `write_scalars` call."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = self.path.open("a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  def _not_scalars(self, *args, **kwargs):
    """Everything but scalars stays out of the JSONL file."""

  write_summaries = write_images = write_videos = write_audios = _not_scalars
  write_texts = write_histograms = write_hparams = _not_scalars

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def truncate_jsonl(path, last_round: int, key: str = "round") -> None:
  """Drops rows whose `key` is after `last_round`: a killed run may have logged rounds (or
  epochs) it never saved.

  On resume those rounds are trained again, so their old rows would appear twice. A torn last
  line (power loss, full disk) is dropped with a warning; a bad line before it is an error
  naming the file and line.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return
  rows = [line for line in path.read_text().splitlines() if line.strip()]
  parsed = []
  for i, row in enumerate(rows):
    try:
      parsed.append(json.loads(row))
    except json.JSONDecodeError as e:
      if i < len(rows) - 1:
        raise ValueError(f"{path} line {i + 1} is not JSON ({e}): {row[:80]!r}") from None
      logging.warning("%s: dropped its torn last line %r.", path, row[:80])
  kept = [r for r, obj in zip(rows, parsed) if obj.get(key, -1) <= last_round]
  path.write_text("".join(r + "\n" for r in kept))


def flatten_hparams(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested mapping (a ConfigDict too) -> {'a.b.c': value} with TensorBoard hparam types.

  bool, int, float and str stay as they are; None and anything else (tuples, lists) become their
  str(), so every field of a config shows up, as in big_vision.
  """
  return {
    name: value if isinstance(value, (bool, int, float, str)) else str(value)
    for name, value in configlib.flatten(tree, prefix).items()
  }


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported here (only process 0 writes files) and without
  PyTorch: where torch is installed (the [torch] extra) tensorboardX imports it only to accept
  torch tensors, which these writers never pass, and that cost every job process 2.6 s (2-core
  VM). `import torch` fails while tensorboardX loads and works again after."""
  import sys

  block = "torch" not in sys.modules  # a process that already has torch keeps it
  if block:
    sys.modules["torch"] = None  # type: ignore[assignment]  (Python: ImportError on import)
  try:
    from tensorboardX import SummaryWriter
  finally:
    if block:
      del sys.modules["torch"]
  return SummaryWriter


class TensorboardWriter(metric_writers.MetricWriter):
  """TensorBoard event files through tensorboardX (no TensorFlow): scalars, images, texts,
  histograms, and hyper-parameters (nested mappings flattened to 'a.b.c') in the same file."""

  def __init__(self, logdir):
    self._writer = _summary_writer_class()(logdir=str(logdir), flush_secs=30)

  def _unsupported(self, *args, **kwargs):
    raise NotImplementedError("TensorboardWriter writes no videos, audio or raw summaries")

  write_summaries = write_videos = write_audios = _unsupported

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(np.asarray(value)), global_step=int(step))

  def write_images(self, step: int, images: Mapping[str, Any]):
    """images: {tag: [H, W, C] or [N, H, W, C]}, uint8 or float in [0, 1] (clu's layout)."""
    for key, value in images.items():
      value = np.asarray(value)
      if value.ndim == 4:
        self._writer.add_images(key, value, global_step=int(step), dataformats="NHWC")
      else:
        self._writer.add_image(key, value, global_step=int(step), dataformats="HWC")

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, value in texts.items():
      self._writer.add_text(key, value, global_step=int(step))

  def write_histograms(self, step, arrays, num_buckets=None):
    for key, value in arrays.items():
      bins = (num_buckets or {}).get(key)
      self._writer.add_histogram(key, np.asarray(value), global_step=int(step), max_bins=bins)

  def write_hparams(self, hparams: Mapping[str, Any]):
    from tensorboardX.summary import hparams as hparams_summaries

    # Into this run's event file (SummaryWriter.add_hparams would start a sub-run per call).
    for summary in hparams_summaries(flatten_hparams(hparams), {}):
      self._writer.file_writer.add_summary(summary)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def png_image(path) -> np.ndarray:
  """An image file as uint8 [H, W, 3], for `write_images` of a figure saved as PNG."""
  from PIL import Image

  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"))


class _LoggingWriter(metric_writers.LoggingWriter):
  """clu's log lines, without the hyper-parameters: `log_config` has logged the config once."""

  def write_hparams(self, hparams):
    pass


def create_writer(workdir) -> metric_writers.MetricWriter:
  if jax.process_index() != 0:
    return _LoggingWriter()
  workdir = pathlib.Path(workdir)
  return metric_writers.MultiWriter(
    [_LoggingWriter(), TensorboardWriter(workdir), JsonlWriter(workdir / "metrics.jsonl")]
  )


def log_parameter_overview(params, msg: str | None = None) -> None:
  """clu's table of the parameters with their statistics; with several processes, shapes and
  shardings only: a process cannot read the values of arrays sharded over other hosts' devices."""
  include_stats = True if jax.process_count() == 1 else "sharding"
  parameter_overview.log_parameter_overview(params, include_stats=include_stats, msg=msg)


def log_config(config, workdir) -> None:
  """Logs the resolved config (overrides applied) once and writes it to `workdir/config.json`
  (process 0), as big_vision does; `ml_collections.ConfigDict(json.load(f))` reads it back."""
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  logging.info("Config (also in %s):\n%s", pathlib.Path(workdir) / "config.json", text)
  if jax.process_index() == 0:
    path = pathlib.Path(workdir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _orbax_below_warning(record) -> bool:
  """A logging filter: drops records below WARNING logged from Orbax's files."""
  return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax(quiet: bool = True) -> None:
  """Orbax logs through absl at INFO, about 60 lines per checkpoint save; keep only its
  warnings and errors (quiet) or everything (not quiet, e.g. with --verbose)."""
  absl_logger = logging.get_absl_logger()
  if quiet:
    absl_logger.addFilter(_orbax_below_warning)
  else:
    absl_logger.removeFilter(_orbax_below_warning)


def read_jsonl(path) -> list[dict]:
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]
