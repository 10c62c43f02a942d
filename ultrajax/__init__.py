"""ultrajax: JAX/Flax toolkit for federated ultrasound foundation models."""

import sys as _sys
import types as _types


def _defer_clu_tensorflow() -> None:
  """Lets `clu.metric_writers` (and clu.periodic_actions, which imports it) load without
  TensorFlow.

  clu's package __init__ imports its TF SummaryWriter eagerly, which imports TensorFlow (about
  3.5 s per start, 1.4 GB installed) although ultrajax writes TensorBoard files with tensorboardX
  (train/writers.py). A stand-in for that one submodule builds clu's TF writer only when called,
  so TensorFlow is imported only by code that asks for it. Does nothing if clu's writers are
  already imported.
  """
  name = "clu.metric_writers.summary_writer"
  if "clu.metric_writers" in _sys.modules or name in _sys.modules:
    return
  stand_in = _types.ModuleType(name, "clu's TF SummaryWriter, imported when first built.")

  def SummaryWriter(*args, **kwargs):
    from clu.metric_writers.tf import summary_writer  # needs tensorflow

    return summary_writer.SummaryWriter(*args, **kwargs)

  stand_in.SummaryWriter = SummaryWriter
  _sys.modules[name] = stand_in


_defer_clu_tensorflow()
