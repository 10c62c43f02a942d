"""Config helpers shared by every `configs/<job>.py`: preset parsing and start-up validation.

A config file exports `get_config(arg)`. `arg` is everything after ':' in
`--config=configs/job.py:arg`, e.g. `cpu` or `cpu,rounds=3`: the first bare word picks the
preset, `k=v` pairs set preset-level knobs the file declares. Field overrides on the command
line (`--config.fed.num_rounds=3`) are handled by ml_collections itself, which rejects
unknown field names and cannot override lists: list-like fields are tuples, given on the
command line as a Python literal (`--config.sharding_rules="(('.*', 'fsdp'),)"`). Values are
checked here, at start-up, so a typo fails before any compile or data loading and the
message names the field. The entry points report USER_ERRORS with `report_user_errors`.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import sys
from collections.abc import Callable, Iterable
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A config field holds a value that cannot work; the message names the field."""


class DataError(ValueError):
  """A file (image, mask, manifest, weights, checkpoint) that cannot be used as asked; the
  message names the file (and the line, column or tensor where there is one)."""


# What a user can fix from the message alone; anything else is a bug and keeps its traceback.
USER_ERRORS = (
  ConfigError,
  DataError,
  FileNotFoundError,
  PermissionError,
  IsADirectoryError,
  NotADirectoryError,
)
VERBOSE_ENV = "ULTRAJAX_VERBOSE"


def report_user_errors(main: Callable, verbose: Callable[[], bool] = lambda: False) -> Callable:
  """`main` for absl's app.run, printing a user error as one line on stderr and exiting 1.

  verbose(): True (e.g. a --verbose flag) or env ULTRAJAX_VERBOSE=1 re-raises, traceback and all.
  """

  def wrapped(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      if verbose() or os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
        raise
      print(
        f"error: {e}  [{type(e).__name__}; --verbose or {VERBOSE_ENV}=1 shows the traceback]",
        file=sys.stderr,
        flush=True,
      )
      sys.exit(1)

  return wrapped


def parse_arg(
  arg: str | None, presets: Iterable[str], default_preset: str, **knobs: Any
) -> ml_collections.ConfigDict:
  """Parses 'preset,k=v,...' into a ConfigDict with `preset` and the known knobs.

  Unknown presets or knob names raise ConfigError naming them; values are parsed as Python
  literals where possible ('3' -> 3, 'True' -> True) and kept as strings otherwise.
  """
  presets = tuple(presets)
  out = ml_collections.ConfigDict(dict(preset=default_preset, **knobs))
  for part in filter(None, (p.strip() for p in (arg or "").split(","))):
    if "=" not in part:
      if part not in presets:
        raise ConfigError(f"unknown preset {part!r}; choose one of {presets}")
      out.preset = part
      continue
    key, value = part.split("=", 1)
    if key not in knobs:
      raise ConfigError(f"unknown config argument {key!r}; known: {sorted(knobs)}")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def get_field(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for name in path.split("."):
    if name not in node:
      raise ConfigError(f"config field {path!r} is missing")
    node = node[name]
  return node


def check_choice(config, path: str, choices: Iterable[Any]) -> None:
  value, choices = get_field(config, path), tuple(choices)
  if value not in choices:
    raise ConfigError(f"config.{path}={value!r} is not one of {choices}")


def check_range(
  config, path: str, low=None, high=None, *, low_inclusive=True, high_inclusive=True
) -> None:
  """Fails naming the field when the value is outside [low, high] (bounds optional)."""
  value = get_field(config, path)
  too_low = low is not None and (value < low if low_inclusive else value <= low)
  too_high = high is not None and (value > high if high_inclusive else value >= high)
  if too_low or too_high:
    lo = "[" if low_inclusive else "("
    hi = "]" if high_inclusive else ")"
    raise ConfigError(f"config.{path}={value!r} is outside {lo}{low}, {high}{hi}")


def flatten(tree, prefix: str = "") -> dict:
  """Nested mapping (a ConfigDict or a dict read back from JSON) -> {'a.b.c': value}, so a
  message or a table can name the exact field."""
  flat = {}
  for key, value in tree.items():
    if hasattr(value, "items"):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def check(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def check_one_tfds_name(config) -> None:
  """config.data.tfds_name names exactly one prepared TFDS dataset (no comma, not blank)."""
  name = config.data.tfds_name
  check(
    "," not in name and bool(name.strip()),
    f"config.data.tfds_name={name!r} must name one prepared TFDS dataset",
  )


def find_config_file(path: str):
  """The config file `path` (e.g. 'configs/pretrain_fed.py'): as given from the working
  directory, else the file of that name among the configs shipped with ultrajax (the checkout's
  configs/ folder, or ultrajax/configs in an installed package); None when neither exists."""
  given = pathlib.Path(path)
  if given.is_file():
    return given
  package = pathlib.Path(__file__).resolve().parent
  name = given.name if given.parent.name in ("", "configs") else None
  for folder in (package / "configs", package.parent / "configs"):
    if name and (folder / name).is_file():
      return folder / name
  return None


def load_config_module(path: str):
  """Imports a config file by path (configs build on each other without being a package)."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"ultrajax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(spec: str, field: str) -> ml_collections.ConfigDict:
  """The config of `spec` ('configs/x.py:preset', the value of config.<field>): the file from the
  working directory, then from the repository root, then among the configs shipped with
  ultrajax."""
  path, _, arg = spec.partition(":")
  found = find_config_file(path)
  repo = pathlib.Path(__file__).resolve().parents[1]
  if found is None and (repo / path).is_file():
    found = repo / path
  check(found is not None, f"config.{field}={spec!r}: no file at {path}")
  return load_config_module(found).get_config(arg or None)


def apply_overrides(
  config: ml_collections.ConfigDict, overrides, field: str, prefix: str = ""
) -> None:
  """Copies the nested `overrides` into `config`; a field the config lacks fails naming it."""
  for name, value in overrides.items():
    check(name in config, f"config.{field}.{prefix}{name} is not a field of that config")
    if isinstance(value, ml_collections.ConfigDict):
      apply_overrides(config[name], value, field, f"{prefix}{name}.")
    else:
      config[name] = value


def stage_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """A study's stage config: config.<stage>_config with config.<stage>_overrides and the study's
  seed (e.g. stage 'pretrain' of the transfer study or the benefit report)."""
  c = load_config_file(config[f"{stage}_config"], f"{stage}_config")
  apply_overrides(c, config[f"{stage}_overrides"], f"{stage}_overrides")
  c.seed = config.seed
  return c
