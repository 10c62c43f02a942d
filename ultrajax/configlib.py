"""Config helpers shared by every `configs/<job>.py`: preset parsing and start-up validation.

A config file exports `get_config(arg)`. `arg` is everything after ':' in
`--config=configs/job.py:arg`, e.g. `cpu` or `cpu,rounds=3`: the first bare word picks the
preset, `k=v` pairs set preset-level knobs the file declares. Field overrides on the command
line (`--config.fed.num_rounds=3`) are handled by ml_collections itself, which rejects
unknown field names. Values are checked here, at start-up, so a typo fails before any
compile or data loading and the message names the field.
"""
from __future__ import annotations

import ast
from typing import Any, Iterable

import ml_collections


class ConfigError(ValueError):
  """A config field holds a value that cannot work; the message names the field."""


def parse_arg(arg: str | None, presets: Iterable[str], default_preset: str, **knobs: Any
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


def check_range(config, path: str, low=None, high=None, *, low_inclusive=True,
                high_inclusive=True) -> None:
  """Fails naming the field when the value is outside [low, high] (bounds optional)."""
  value = get_field(config, path)
  too_low = low is not None and (value < low if low_inclusive else value <= low)
  too_high = high is not None and (value > high if high_inclusive else value >= high)
  if too_low or too_high:
    lo = "[" if low_inclusive else "("
    hi = "]" if high_inclusive else ")"
    raise ConfigError(f"config.{path}={value!r} is outside {lo}{low}, {high}{hi}")


def check(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def load_config_module(path: str):
  """Imports a config file by path (configs build on each other without being a package)."""
  import importlib.util
  import pathlib
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"ultrajax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
