"""Interactive SAM: embed an image once, then prompt it many times (segment_anything's SamPredictor).

  model, _ = load_model('sam_vit_b_01ec64.pth')       # or an ultrajax SAM training workdir
  predictor = SamPredictor(model)
  predictor.set_image(image)                         # [H, W, 3] uint8 RGB; jitted encoder
  masks, iou, low_res = predictor.predict(point_coords=np.array([[x, y]]),
                                          point_labels=np.array([1]))
  # masks [3, H, W] bool, iou [3], low_res [3, 256, 256] logits (feed back as mask_input)

Prompts are in original-image pixels, (x, y). The image is resized with PIL exactly as
segment_anything's ResizeLongestSide.apply_image, so both predictors see the same pixels.
Bad prompts raise ValueError saying what is wrong. Each combination of prompt kinds and point
count compiles once (jit's cache); a repeated click costs only the decoder.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ultrajax.models import sam as sam_lib

POINT_LABELS = (-1, 0, 1)  # not-a-point, background, foreground


def resize_image(image: np.ndarray, long_side: int) -> np.ndarray:
  """[H, W, 3] uint8 -> [h, w, 3] uint8 with max(h, w) = long_side: PIL bilinear (with its
  antialiasing), as segment_anything's ResizeLongestSide.apply_image."""
  from PIL import Image

  h, w = sam_lib.preprocess_shape(image.shape[0], image.shape[1], long_side)
  return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def _saved_decoder_heads(directory: pathlib.Path) -> int | None:
  """config.model.decoder_heads from the checkpoint's meta (heads leave no trace in shapes)."""
  import json

  import orbax.checkpoint as ocp

  if not (directory / "meta").is_dir():
    return None
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
    meta = ckptr.restore(directory / "meta")
  model = json.loads(meta.get("config", "{}")).get("model", {})
  return model.get("decoder_heads") or None


def load_model(path, **overrides):
  """(Sam, SamConfig) from a segment_anything file (.pth/.safetensors) or an ultrajax
  workdir / checkpoint folder of a SAM training run.

  The architecture is read off the parameter shapes (`config_from_state_dict`), so any
  job's checkpoint of a `Sam` loads; the decoder head count, invisible in shapes, comes from
  the run's saved `config.model.decoder_heads` (else SAM's 8). overrides: SamConfig fields.
  """
  from ultrajax.interop import sam as sam_interop

  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(
      f"nothing at {path}: expected a SAM .pth/.safetensors file or an ultrajax workdir"
    )
  if path.is_file():
    return sam_interop.load_sam(path, **overrides)
  from ultrajax.train import checkpoint

  directory = checkpoint.find_checkpoint_dir(path)
  params = jax.device_get(checkpoint.load_params(directory))
  missing = {"image_encoder", "prompt_encoder", "mask_decoder"} - set(params)
  if missing:
    raise ValueError(
      f"{directory}: the checkpoint's params are not a SAM (no "
      f"{sorted(missing)}; it has {sorted(params)})"
    )
  heads = _saved_decoder_heads(directory)
  if heads:
    overrides.setdefault("decoder_heads", heads)
  cls = params["mask_decoder"].get("cls_tokens")
  if cls is not None:
    overrides.setdefault("num_cls_tokens", cls.shape[0])
  core = dict(
    params, mask_decoder={k: v for k, v in params["mask_decoder"].items() if k != "cls_tokens"}
  )
  config = sam_interop.config_from_state_dict(sam_interop.sam_to_torch(core), **overrides)
  abstract = nnx.eval_shape(lambda: sam_lib.Sam(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state), config


def _as_rgb(image) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be [H, W, 3] (or grey [H, W]), got shape {image.shape}")
  if image.dtype != np.uint8:
    raise ValueError(f"image must be uint8 with values 0-255, got {image.dtype}")
  return image


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, params, images):
  return nnx.merge(graphdef, params).encode_image(images)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))  # graphdef, multimask, frames
def _decode(graphdef, params, features, prompts, multimask, frames):
  model = nnx.merge(graphdef, params)
  sparse, dense = model.encode_prompts(*prompts)
  logits, iou = model.decode_masks(features, model.dense_pe(), sparse, dense, multimask)
  return sam_lib.postprocess_masks(logits, *frames, model.image_size), iou, logits


class SamPredictor:
  """segment_anything's SamPredictor on an ultrajax `Sam` (see the module docstring). The
  compiled encoder and decoder are shared by every predictor of the same architecture (the
  graphdef is a static argument), so a new predictor does not compile again."""

  def __init__(self, model: sam_lib.Sam):
    self.config = model.config
    self.graphdef, self.params = nnx.split(model, nnx.Param)
    self.reset_image()

  def reset_image(self) -> None:
    self.features = self.original_size = self.input_size = None

  @property
  def is_image_set(self) -> bool:
    return self.features is not None

  def set_image(self, image, image_format: str = "RGB") -> None:
    """image: [H, W, 3] uint8 (RGB or BGR) -> caches its embedding [1, g, g, C]."""
    if image_format not in ("RGB", "BGR"):
      raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    image = _as_rgb(image)
    if image_format == "BGR":
      image = image[..., ::-1]
    resized = resize_image(np.ascontiguousarray(image), self.config.image_size)
    x = sam_lib.preprocess(resized[None], self.config.image_size)
    self.features = _encode(self.graphdef, self.params, x)
    self.original_size = tuple(image.shape[:2])
    self.input_size = tuple(resized.shape[:2])

  def get_image_embedding(self):
    if not self.is_image_set:
      raise RuntimeError("set an image with .set_image(...) first")
    return self.features

  def _to_input_frame(self, coords: np.ndarray) -> np.ndarray:
    """Original-image pixels -> model input-frame pixels (ResizeLongestSide.apply_coords)."""
    (oh, ow), (nh, nw) = self.original_size, self.input_size
    return (np.asarray(coords, np.float64) * [nw / ow, nh / oh]).astype(np.float32)

  def _check_inside(self, what: str, coords: np.ndarray) -> None:
    h, w = self.original_size
    bad = (coords[:, 0] < 0) | (coords[:, 0] > w) | (coords[:, 1] < 0) | (coords[:, 1] > h)
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      raise ValueError(
        f"{what} {i} at (x, y) = {tuple(coords[i].tolist())} is outside the "
        f"image (width {w}, height {h})"
      )

  def _check_prompts(self, point_coords, point_labels, box, mask_input):
    points = labels = boxes = masks = None
    if (point_coords is None) != (point_labels is None):
      raise ValueError("point_coords and point_labels come together (both or neither)")
    if point_coords is not None:
      coords = np.asarray(point_coords, np.float64)
      labels = np.asarray(point_labels)
      if coords.ndim != 2 or coords.shape[1] != 2 or labels.shape != coords.shape[:1]:
        raise ValueError(
          f"point_coords must be [N, 2] and point_labels [N]; got {coords.shape} and {labels.shape}"
        )
      if not np.isin(labels, POINT_LABELS).all():
        raise ValueError(
          f"point_labels must be 1 (foreground), 0 (background) or -1 "
          f"(ignored), got {np.unique(labels).tolist()}"
        )
      self._check_inside("point", coords)
      points, labels = self._to_input_frame(coords)[None], labels.astype(np.int32)[None]
    if box is not None:
      box = np.asarray(box, np.float64).reshape(-1)
      if box.shape != (4,):
        raise ValueError(f"box must be [x0, y0, x1, y1], got {np.shape(box)}")
      if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(
          f"box {box.tolist()} has x1 < x0 or y1 < y0; give [x0, y0, x1, y1] "
          "with the top-left corner first"
        )
      self._check_inside("box corner", box.reshape(2, 2))
      boxes = self._to_input_frame(box.reshape(2, 2)).reshape(1, 4)
    if mask_input is not None:
      size = self.config.low_res_size
      masks = np.asarray(mask_input, np.float32)
      if masks.shape != (1, size, size):
        raise ValueError(
          f"mask_input must be [1, {size}, {size}] low-res logits (e.g. "
          f"low_res_logits[i:i+1] of a previous predict), got {masks.shape}"
        )
    return points, labels, boxes, masks

  def predict(
    self,
    point_coords=None,
    point_labels=None,
    box=None,
    mask_input=None,
    multimask_output: bool = True,
    return_logits: bool = False,
  ):
    """-> masks [M, H, W] (bool, or logits with return_logits), iou [M], low_res [M, 4g, 4g]
    as numpy; M = 3 with multimask_output, else 1; (H, W) the original image size."""
    if not self.is_image_set:
      raise RuntimeError("set an image with .set_image(...) before predict")
    prompts = self._check_prompts(point_coords, point_labels, box, mask_input)
    frames = (self.input_size, self.original_size)
    out = _decode(
      self.graphdef, self.params, self.features, prompts, bool(multimask_output), frames
    )
    full, iou, low_res = (np.asarray(x[0]) for x in out)
    return (full if return_logits else full > sam_lib.MASK_THRESHOLD), iou, low_res
