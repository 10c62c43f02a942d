"""Metric writers: clu (TensorBoard + log lines) plus `workdir/metrics.jsonl`.

Only process 0 writes files; other processes get a writer that only logs. metrics.jsonl has
one JSON object per logged step, with the step and every scalar (round, loss, per-client
losses, img_per_s, ...), easy to read back with pandas or `json.loads` per line.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers


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

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def truncate_jsonl(path, last_round: int, key: str = "round") -> None:
  """Drops rows whose `key` is after `last_round`: a killed run may have logged rounds (or
  epochs) it never saved.

  On resume those rounds are trained again, so their old rows would appear twice.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return
  rows = [line for line in path.read_text().splitlines() if line.strip()]
  kept = [r for r in rows if json.loads(r).get(key, -1) <= last_round]
  path.write_text("".join(r + "\n" for r in kept))


def create_writer(workdir) -> metric_writers.MetricWriter:
  if jax.process_index() != 0:
    return metric_writers.LoggingWriter()
  workdir = pathlib.Path(workdir)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(str(workdir), asynchronous=False),
      JsonlWriter(workdir / "metrics.jsonl"),
  ])


def read_jsonl(path) -> list[dict]:
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]
