r"""Representation evaluators (linear probe, k-NN) on a pretrained encoder, from the command line.

  python -m ultrajax.evaluate --config=configs/pretrain_fed.py:cpu --workdir=/tmp/ufm_cpu [--round=40]
  python -m ultrajax.evaluate --config=configs/pretrain_fed.py:cpu --checkpoint=mae_vit.pth

--workdir: a pretraining workdir, its latest checkpoint or the one of --round.
--checkpoint: instead, anything `init_from` accepts (an ultrajax workdir or checkpoint folder,
  an official MAE or timm ViT .pth/.safetensors file; ultrajax.interop.load).
The config gives the model's shape and config.evals the task, features and evaluator settings
(override them as in training, e.g. --config.evals.knn.k=10); both evaluators run whatever
their every_rounds. The figures are printed and written as JSON to --output (default
<workdir>/evals/round_<N>.json, or eval_<name>.json here for --checkpoint). On the same
checkpoint they equal what the pretraining job logged at that round.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from ultrajax.eval import evaluators
from ultrajax.interop import load as interop_load
from ultrajax.models import mae
from ultrajax.train import checkpoint


def resolve(
  workdir: str = "", round_index: int | None = None, checkpoint_path: str = ""
) -> tuple[pathlib.Path, int | None]:
  """(path to load, its round or None) from the command line's choices."""
  if bool(workdir) == bool(checkpoint_path):
    raise ValueError("give exactly one of --workdir and --checkpoint")
  if checkpoint_path:
    path = pathlib.Path(checkpoint_path)
    if not path.exists():
      raise FileNotFoundError(f"--checkpoint={checkpoint_path}: nothing there")
    return path, None
  path = checkpoint.find_checkpoint_dir(workdir, round_index)
  return path, int(path.name)


def load_params(config, path: pathlib.Path) -> dict:
  """The MAE's parameters (pure dict) from `path`; a file without a decoder gets zeros there
  (the evaluators use only the encoder)."""
  abstract = nnx.eval_shape(lambda: mae.mae_from_config(config.model, nnx.Rngs(0)))
  zeros = jax.tree.map(
    lambda x: np.zeros(x.shape, x.dtype), nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  )
  return interop_load.load_init_params(path, abstract, base_params=zeros)


def evaluate(
  config,
  *,
  workdir: str = "",
  round_index: int | None = None,
  checkpoint_path: str = "",
  output: str = "",
) -> dict:
  """Runs both evaluators on the chosen checkpoint; writes and returns the JSON record."""
  path, found_round = resolve(workdir, round_index, checkpoint_path)
  probes = evaluators.Evaluators(config)
  result = probes(load_params(config, path), evaluators.EVALUATORS)
  e = config.evals
  record = dict(
    checkpoint=str(path),
    round=found_round,
    features=e.features,
    task=e.task.to_dict(),
    linear_probe=e.linear_probe.to_dict(),
    knn=e.knn.to_dict(),
    num_fit=len(probes.train_y),
    num_test=len(probes.test_y),
    **result,
  )
  if not output:
    output = (
      pathlib.Path(workdir) / "evals" / f"round_{found_round:05d}.json"
      if workdir
      else pathlib.Path(f"eval_{path.name}.json")
    )
  output = pathlib.Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(record, indent=1, default=list) + "\n")
  record["output"] = str(output)
  return record


def define_flags() -> dict:
  """The command's flags, defined only when it runs as a command: `--config` and `--workdir`
  would otherwise clash with ultrajax.main's and ultrajax.export's in a process importing both."""
  return dict(
    config=config_flags.DEFINE_config_file(
      "config", None, "Pretraining config file[:preset].", lock_config=True
    ),
    workdir=flags.DEFINE_string("workdir", "", "Pretraining workdir to evaluate."),
    round=flags.DEFINE_integer("round", None, "Checkpoint round in --workdir (default: latest)."),
    checkpoint=flags.DEFINE_string("checkpoint", "", "Or: an init_from-style path."),
    output=flags.DEFINE_string("output", "", "JSON file for the figures."),
  )


def main(argv, f):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if f["config"].value is None:
    raise app.UsageError("--config=configs/pretrain_*.py[:preset] is required")
  record = evaluate(
    f["config"].value,
    workdir=f["workdir"].value,
    round_index=f["round"].value,
    checkpoint_path=f["checkpoint"].value,
    output=f["output"].value,
  )
  print(
    f"{record['checkpoint']} (round {record['round']}), {record['features']} features, "
    f"fit on {record['num_fit']}, scored on {record['num_test']} images:"
  )
  for key in sorted(k for k in record if k.startswith("eval/")):
    print(f"  {key:28s} {record[key]:.4f}")
  print(f"written to {record['output']}")


if __name__ == "__main__":
  _flags = define_flags()
  app.run(lambda argv: main(argv, _flags))
