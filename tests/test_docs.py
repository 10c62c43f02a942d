"""The python snippets of docs/formats.md run as written, against tiny exports made here.

Every ```python block runs in one namespace, in order, in a folder holding what the text
says the reader has: `encoder/` and `encoder.safetensors` from `ultrajax.export` of a tiny
MAE checkpoint, `ultrasam_vit_b.pth` (+ .json) as `export --format=sam` writes it, `model` (the
MAE) and `images_nchw`. A block that needs what no test can have (another repository's code, a
released checkpoint) says so in an HTML comment `<!-- not run by tests/test_docs.py: why -->`
on the line above it; those are counted, not run.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax
import jax.numpy as jnp
from flax import nnx

from ultrajax import export
from ultrajax.configs import pretrain_fed
from ultrajax.interop import sam as sam_interop
from ultrajax.models import mae, sam
from ultrajax.train import checkpoint

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "formats.md"
SKIP = "<!-- not run by tests/test_docs.py:"
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.DOTALL)


def python_blocks(text: str) -> list[tuple[str, str | None]]:
  """[(code, reason it is not run or None)] of the ```python blocks, in order."""
  out = []
  for m in BLOCK.finditer(text):
    before = m.group("before").strip()
    reason = before[len(SKIP) :].rstrip("->").strip() if before.startswith(SKIP) else None
    out.append((m.group("code"), reason))
  return out


def test_block_extraction_by_hand():
  text = (
    "intro\n```python\na = 1\n```\n" + SKIP + " needs x -->\n```python\nb = 2\n```\n"
    "```json\n{}\n```\n"
  )
  assert python_blocks(text) == [("a = 1", None), ("b = 2", "needs x")]


def test_formats_md_python_snippets_run(tmp_path, monkeypatch):
  config = pretrain_fed.get_config("smoke")  # its model: ViT 64 x 2 at 32 px, patch 8
  model = mae.mae_from_config(config.model, nnx.Rngs(0))
  ckpt = checkpoint.Checkpointer(tmp_path / "run")
  ckpt.save(
    1,
    nnx.to_pure_dict(nnx.state(model, nnx.Param)),
    {"r": jnp.asarray(1)},
    None,
    {"config": json.dumps(config.to_dict())},
  )
  ckpt.close()
  monkeypatch.chdir(tmp_path)
  export.export(tmp_path / "run", "timm", "encoder")
  export.export(tmp_path / "run", "timm", "encoder.safetensors")
  # As `export --format=sam` writes a run's weights (its loading is tested in test_sam_model).
  sam_config = sam.sam_config(
    "tiny",
    image_size=64,
    width=32,
    depth=1,
    num_heads=1,
    global_attn_indexes=(0,),
    prompt_dim=16,
    mask_in_chans=4,
    decoder_heads=2,
    decoder_mlp_dim=32,
    iou_head_hidden=16,
  )
  abstract = nnx.to_pure_dict(
    nnx.state(nnx.eval_shape(lambda: sam.Sam(sam_config, rngs=nnx.Rngs(0))), nnx.Param)
  )
  export.save_with_preprocessing(
    "ultrasam_vit_b.pth",
    sam_interop.sam_to_torch(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)),
    {"preprocessing": sam_interop.preprocessing(sam_config.image_size)},
  )

  blocks = python_blocks(DOC.read_text())
  skipped = [reason for _, reason in blocks if reason]
  assert len(blocks) - len(skipped) >= 5 and all(skipped)
  namespace = {"model": model, "images_nchw": torch.rand(2, 3, 32, 32)}
  for code, reason in blocks:
    if reason is None:
      exec(compile(code, f"{DOC.name} block", "exec"), namespace)  # noqa: S102
  assert namespace["features"].shape == (2, 64)
  assert tuple(namespace["data_config"]["mean"]) == (0.485, 0.456, 0.406)
  assert namespace["pre"]["pixel_mean"] == [123.675, 116.28, 103.53]
  assert (tmp_path / "demo" / "rle.json").is_file()


def test_readme_config_paths_resolve_outside_the_checkout(tmp_path, monkeypatch):
  """`--config=configs/x.py:preset` names a shipped config from any directory (an installed
  wheel has them as ultrajax/configs, the checkout's link to configs/)."""
  from ultrajax import configlib  # main.resolve_config_flag rewrites --config with it

  repo = DOC.parents[1]
  assert sorted(p.name for p in (repo / "ultrajax" / "configs").glob("*.py")) == sorted(
    p.name for p in (repo / "configs").glob("*.py")
  )
  monkeypatch.chdir(tmp_path)
  found = configlib.find_config_file("configs/pretrain_fed.py")
  assert found.read_text() == (repo / "configs" / "pretrain_fed.py").read_text()
  assert configlib.find_config_file("configs/typo.py") is None
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "pretrain_fed.py").write_text("# a local file wins\n")
  assert configlib.find_config_file("configs/pretrain_fed.py") == pathlib.Path(
    "configs/pretrain_fed.py"
  )
