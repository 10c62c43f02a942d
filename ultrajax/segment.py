r"""Segments one image from a click or a box with a SAM and saves an overlay PNG.

  python -m ultrajax.segment --checkpoint=FILE_OR_WORKDIR --image=IMG \
      (--point=x,y [--point=x,y ...] [--negative=x,y ...] | --box=x0,y0,x1,y1) \
      --out=overlay.png [--single_mask | --refine]

FILE_OR_WORKDIR: a segment_anything state dict (sam_vit_b_01ec64.pth, .safetensors) or an
ultrajax SAM training workdir. Coordinates are pixels of IMG, (x, y), origin top-left.
With several candidate masks (the default for one click) the one with the highest predicted
IoU is drawn. --refine runs UltraSam's test-time refinement instead (`predict_refined`; what a
model trained by configs/sam_ultrasound.py learns). Prints the predicted IoU and the mask area;
the overlay shows the mask in colour, its outline, the clicks (green foreground, red background)
and the box.
"""

from __future__ import annotations

import pathlib

import numpy as np
from absl import app, flags

from ultrajax import configlib


def define_flags() -> dict:
  """The command's flags, defined only when it runs as a command: `--out` would otherwise
  clash with ultrajax.export's flag of that name in a process that imports both."""
  return dict(
    checkpoint=flags.DEFINE_string(
      "checkpoint", None, "SAM .pth/.safetensors or ultrajax workdir."
    ),
    image=flags.DEFINE_string("image", None, "Image file (PNG, JPEG, ...; grey or RGB)."),
    point=flags.DEFINE_multi_string("point", [], "Foreground click x,y (repeatable)."),
    negative=flags.DEFINE_multi_string("negative", [], "Background click x,y (repeatable)."),
    box=flags.DEFINE_string("box", None, "Box x0,y0,x1,y1."),
    out=flags.DEFINE_string("out", "overlay.png", "Output PNG."),
    single_mask=flags.DEFINE_bool("single_mask", False, "SAM's single-mask output."),
    verbose=flags.DEFINE_bool("verbose", False, "Show the traceback of user errors too."),
    refine=flags.DEFINE_bool(
      "refine",
      False,
      "UltraSam's refinement: single mask, then its "
      "box and logits as the prompt of a multimask pass.",
    ),
  )


def parse_numbers(flag: str, text: str, count: int) -> list[float]:
  """'12,34' -> [12.0, 34.0]; anything else raises app.UsageError naming the flag."""
  try:
    values = [float(v) for v in text.split(",")]
  except ValueError:
    values = []
  if len(values) != count:
    raise app.UsageError(f"--{flag}={text!r}: expected {count} comma-separated numbers")
  return values


def read_image(path) -> np.ndarray:
  """[H, W, 3] uint8 RGB from an image file (grey and RGBA become RGB)."""
  from PIL import Image

  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no image at {path}")
  try:
    with Image.open(path) as image:
      return np.array(image.convert("RGB"))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise configlib.DataError(f"cannot decode image {path}: {e}") from None


def overlay(
  image: np.ndarray, mask: np.ndarray, points=(), labels=(), box=None, color=(30, 144, 255)
) -> np.ndarray:
  """image [H, W, 3] uint8, mask [H, W] bool -> [H, W, 3] uint8: mask tinted (alpha 0.45) with
  a solid outline, clicks as dots, box as a rectangle."""
  from PIL import Image, ImageDraw
  from scipy import ndimage

  out = image.astype(np.float32)
  out[mask] = 0.55 * out[mask] + 0.45 * np.asarray(color, np.float32)
  edge = mask & ~ndimage.binary_erosion(mask)
  out[edge] = color
  canvas = Image.fromarray(out.astype(np.uint8))
  draw = ImageDraw.Draw(canvas)
  r = max(3, round(max(image.shape[:2]) / 120))
  for (x, y), label in zip(points, labels):
    fill = (0, 220, 0) if label == 1 else (230, 0, 0)
    draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(255, 255, 255))
  if box is not None:
    draw.rectangle(list(box), outline=(255, 215, 0), width=max(1, r // 2))
  return np.array(canvas)


def mask_box(mask: np.ndarray) -> list[float] | None:
  """bool [H, W] -> [x0, y0, x1, y1] (inclusive pixel indices, sam_objectives.mask_boxes), None
  for an empty mask."""
  from ultrajax.train import sam_objectives

  if not np.any(mask):
    return None
  return [float(v) for v in np.asarray(sam_objectives.mask_boxes(np.asarray(mask, bool)[None]))[0]]


def predict_refined(predictor, point_coords=None, point_labels=None, box=None):
  """UltraSam's test-time refinement with a SamPredictor whose image is set (seed_systems.md
  3.3): pass 1 the single-mask output; pass 2 multimask with pass 1's low-res logits as the
  mask prompt and, unless `box` is given, the box around pass 1's mask instead of the clicks
  (kept when that mask is empty). Returns predict's (masks [3, H, W], iou [3], low_res)."""
  masks, _, low_res = predictor.predict(point_coords, point_labels, box, multimask_output=False)
  if box is None and (found := mask_box(masks[0])) is not None:
    point_coords, point_labels, box = None, None, np.asarray(found, np.float32)
  return predictor.predict(
    point_coords, point_labels, box, mask_input=low_res[:1], multimask_output=True
  )


def segment(
  checkpoint,
  image_path,
  out,
  *,
  points=(),
  negatives=(),
  box=None,
  multimask: bool = True,
  refine: bool = False,
) -> dict:
  """Runs the predictor and writes the overlay; returns dict(iou, area, out, candidates)."""
  from PIL import Image

  from ultrajax.eval import sam_predictor

  if not points and not negatives and box is None:
    raise ValueError("give at least one --point or a --box")
  image = read_image(image_path)
  model, _ = sam_predictor.load_model(checkpoint)
  predictor = sam_predictor.SamPredictor(model)
  predictor.set_image(image)
  clicks = list(points) + list(negatives)
  labels = [1] * len(points) + [0] * len(negatives)
  prompts = dict(
    point_coords=np.array(clicks, np.float32) if clicks else None,
    point_labels=np.array(labels) if clicks else None,
    box=None if box is None else np.array(box, np.float32),
  )
  if refine:
    masks, iou, _ = predict_refined(predictor, **prompts)
  else:
    masks, iou, _ = predictor.predict(**prompts, multimask_output=multimask)
  best = int(np.argmax(iou))
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(overlay(image, masks[best], clicks, labels, box)).save(out)
  return dict(
    iou=float(iou[best]),
    area=int(masks[best].sum()),
    out=str(out),
    candidates=[float(v) for v in iou],
  )


def main(argv, f: dict):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("checkpoint", "image"):
    if not f[name].value:
      raise app.UsageError(f"--{name} is required")
  points = [parse_numbers("point", p, 2) for p in f["point"].value]
  negatives = [parse_numbers("negative", p, 2) for p in f["negative"].value]
  box = parse_numbers("box", f["box"].value, 4) if f["box"].value else None
  if not points and not negatives and box is None:
    raise app.UsageError("give at least one --point=x,y or a --box=x0,y0,x1,y1")
  if f["refine"].value and f["single_mask"].value:
    raise app.UsageError("--refine already chooses its outputs; drop --single_mask")
  done = segment(
    f["checkpoint"].value,
    f["image"].value,
    f["out"].value,
    points=points,
    negatives=negatives,
    box=box,
    multimask=not f["single_mask"].value,
    refine=f["refine"].value,
  )
  print(
    f"wrote {done['out']}: mask of {done['area']} px, predicted IoU {done['iou']:.3f} "
    f"(candidates {', '.join(f'{v:.3f}' for v in done['candidates'])})"
  )


if __name__ == "__main__":
  _flags = define_flags()
  app.run(
    configlib.report_user_errors(lambda argv: main(argv, _flags), lambda: _flags["verbose"].value)
  )
