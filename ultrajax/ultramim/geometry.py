r"""Probe geometry of a convex (sector) image, in the pixels of that image (numpy, host).

A fan is symmetric about the vertical line through its apex and opens downwards. Pixel (row i,
column j) has its centre at (y, x) = (i, j); a pixel belongs to the fan when its centre does:

            * (apex_x, apex_y)       apex_y < 0: above the image (the usual convex probe)
           /|\
          / | \   fan_angle_deg (full angle)
         / _|_ \    inner arc: r = inner_radius  (probe face, near field)
        /  |||  \
       /___|||___\  outer arc: r = outer_radius  (deepest echoes)

SMAT's convex -> linear warp (scanmode.sector_to_linear) needs each image's own fan: the phantom
records it (phantom.generate's 'fan'), a manifest can give it (data/sources.py), and otherwise
estimate_fan fits it to the image's non-zero region. Records carry it as a plain dict of the Fan
fields, so it pickles and prints as is.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.ndimage
import scipy.optimize


class Fan(NamedTuple):
  apex_x: float  # column of the apex, pixels (may lie outside the image)
  apex_y: float  # row of the apex, pixels (negative: above the image)
  fan_angle_deg: float  # full opening angle, symmetric about the downward vertical
  inner_radius: float  # pixels from the apex to the probe face
  outer_radius: float  # pixels from the apex to the deepest arc

  @property
  def half(self) -> float:
    """Half the fan angle, radians."""
    return math.radians(self.fan_angle_deg) / 2


FIELDS = Fan._fields


class NotASector(ValueError):
  """An image whose non-zero region is not a fan (a linear, cropped or mostly black image)."""


def check_fan(fan, what: str = "fan") -> Fan:
  """A Fan from a Fan, a sequence or a dict of the FIELDS; ValueError naming `what` and the
  field at fault with its value."""
  if isinstance(fan, dict):
    missing = [f for f in FIELDS if f not in fan]
    if missing:
      raise ValueError(f"{what} lacks {missing}; a fan needs {list(FIELDS)}")
    fan = [fan[f] for f in FIELDS]
  elif not isinstance(fan, (tuple, list, np.ndarray)) or len(fan) != len(FIELDS):
    raise ValueError(f"{what} is {fan!r}; a fan needs the {len(FIELDS)} values {list(FIELDS)}")
  numbers = []
  for name, value in zip(FIELDS, fan):
    try:
      numbers.append(float(value))
    except (TypeError, ValueError):
      numbers.append(math.nan)
    if not math.isfinite(numbers[-1]):
      raise ValueError(f"{what}: {name}={value!r} is not a finite number")
  fan = Fan(*numbers)
  if not 0.0 < fan.fan_angle_deg < 360.0:
    raise ValueError(f"{what}: fan_angle_deg={fan.fan_angle_deg!r} is not in (0, 360)")
  if fan.inner_radius < 0.0:
    raise ValueError(f"{what}: inner_radius={fan.inner_radius!r} is below 0")
  if not fan.outer_radius > fan.inner_radius:
    raise ValueError(
      f"{what}: outer_radius={fan.outer_radius!r} is not above inner_radius={fan.inner_radius!r}"
    )
  return fan


def polar(fan: Fan, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(radius, angle) of every pixel centre about the apex: 2 x [H, W] float64; the angle is
  measured from the downward vertical, positive towards increasing columns."""
  y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
  dx, dy = x - fan.apex_x, y - fan.apex_y
  return np.hypot(dx, dy), np.arctan2(dx, dy)


def fan_mask(fan: Fan, shape: tuple[int, int]) -> np.ndarray:
  """[H, W] bool: pixel centres inside the fan."""
  r, theta = polar(fan, shape)
  return (r >= fan.inner_radius) & (r <= fan.outer_radius) & (np.abs(theta) <= fan.half)


def support(image: np.ndarray, black_level: int = 0) -> np.ndarray:
  """[H, W] bool: the image's echo region, its largest connected region brighter than
  black_level after removing specks and strokes 1-2 px wide (burnt-in text, calibration
  ticks), with enclosed dark areas (cysts, vessels) filled in.  image: [H, W] or [H, W, C]."""
  grey = np.asarray(image)
  grey = grey.max(-1) if grey.ndim == 3 else grey
  m = scipy.ndimage.binary_opening(grey > black_level, np.ones((3, 3), bool))
  labels, n = scipy.ndimage.label(m)
  if n == 0:
    return m
  sizes = np.bincount(labels.ravel())
  sizes[0] = 0
  return scipy.ndimage.binary_fill_holes(labels == sizes.argmax())


def _outline(m: np.ndarray) -> np.ndarray:
  """[P, 2] (y, x) midpoints between a region pixel and each 4-neighbour outside it (neighbours
  within the image only: the image border cuts a fan, it is not the fan's edge)."""
  rows, cols = np.nonzero(m[1:] != m[:-1])  # between rows i and i + 1
  across_rows = np.stack([rows + 0.5, cols], 1)
  rows, cols = np.nonzero(m[:, 1:] != m[:, :-1])  # between columns j and j + 1
  return np.concatenate([across_rows, np.stack([rows, cols + 0.5], 1)])


def _distance_to_outline(params, y, x):
  """Distance of points (y, x) to the outline of the fan (apex_x, apex_y, half, r_in, r_out)."""
  ax, ay, half, r_in, r_out = params
  dx, dy = x - ax, y - ay
  r, off = np.hypot(dx, dy), np.abs(np.arctan2(dx, dy)) - half  # off > 0: beyond the edge ray

  def arc(rho):
    return np.where(
      off <= 0,
      np.abs(r - rho),
      np.sqrt(np.maximum(r * r + rho * rho - 2 * r * rho * np.cos(off), 0.0)),
    )

  along = r * np.cos(off)
  edge = np.where(
    (along >= r_in) & (along <= r_out), np.abs(r * np.sin(off)), np.minimum(arc(r_in), arc(r_out))
  )
  return np.minimum(np.minimum(arc(r_in), arc(r_out)), edge)


def _circle(y, x):
  """Least-squares circle through points: (centre_y, centre_x, radius)."""
  a = np.stack([x, y, np.ones_like(x)], 1)
  d, e, f = np.linalg.lstsq(a, -(x * x + y * y), rcond=None)[0]
  cx, cy = -d / 2, -e / 2
  return cy, cx, math.sqrt(max(cx * cx + cy * cy - f, 0.0))


def estimate_fan(
  image: np.ndarray,
  black_level: int = 0,
  min_fraction: float = 0.1,
  max_fill: float = 0.9,
  tolerance: float = 0.015,
  min_angle_deg: float = 20.0,
  min_iou: float = 0.85,
) -> Fan:
  """The fan of a convex image, fitted to the outline of its echo region (see `support`).

  image: uint8 [H, W] or [H, W, C]. The outline's points on the image border are left out (a
  fan clipped by the border keeps the geometry of its visible edges). Raises NotASector, with
  the reason, for an image whose echo region covers under `min_fraction` of it (mostly black),
  fills over `max_fill` of its bounding box (a linear image's rectangle), or whose outline
  strays from the fitted fan (median distance over `tolerance` x outer radius; apex not above
  the echoes; angle outside (min_angle_deg, 180); IoU of fan and echo region below min_iou).
  """
  m = support(image, black_level)
  h = m.shape[0]
  if m.mean() < min_fraction:
    raise NotASector(
      f"mostly black: the echo region covers {m.mean():.0%} of the image (< {min_fraction:.0%})"
    )
  rows, cols = np.nonzero(m)
  fill = m.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1))
  if fill > max_fill:
    raise NotASector(
      f"not a sector: the echo region fills {fill:.0%} of its bounding box "
      f"(> {max_fill:.0%}), as a linear probe's rectangle does"
    )
  # Initial guess: the deepest echo of each column lies on the outer arc (for fans up to 180
  # degrees); fit a circle, trimming columns cut by the border or an overlay.
  deepest = h - 1 - np.argmax(m[::-1], axis=0)
  keep = m.any(0) & (deepest < h - 1)
  y, x = deepest[keep] + 0.5, np.flatnonzero(keep).astype(np.float64)
  if len(x) < 8:
    raise NotASector("not a sector: no deep arc (the echo region reaches the bottom border)")
  for _ in range(3):
    cy, cx, radius = _circle(y, x)
    residual = np.abs(np.hypot(y - cy, x - cx) - radius)
    inlier = residual <= max(1.5, 2 * np.median(residual))
    if inlier.sum() < 8:
      break
    y, x = y[inlier], x[inlier]
  if not (math.isfinite(radius) and cy < rows.min()):
    raise NotASector(
      f"not a sector: its deepest echoes do not lie on an arc below an apex "
      f"(fitted centre row {cy:.1f}, echoes start at row {rows.min()})"
    )
  r, theta = np.hypot(cols - cx, rows - cy), np.arctan2(cols - cx, rows - cy)
  half = max(np.percentile(np.abs(theta), 99.5), 1e-3)
  central = np.abs(theta) < half / 2
  r_in = float(np.percentile(r[central], 0.5)) if central.any() else 0.0
  points = _outline(m)
  params = [cx, cy, half, r_in, radius]
  # Plain least squares first: from a rough start the robust loss can settle on a degenerate
  # fan (inner arc shrunk to the apex, its points counted as outliers); then the robust loss
  # discounts overlays and cut corners.
  for loss in ("linear", "soft_l1"):
    params = scipy.optimize.least_squares(
      lambda p: _distance_to_outline(p, points[:, 0], points[:, 1]),
      params,
      loss=loss,
      f_scale=1.0,
      x_scale="jac",
    ).x
  ax, ay, half, r_in, r_out = params
  spread = np.median(_distance_to_outline(params, points[:, 0], points[:, 1]))
  angle = math.degrees(2 * half)
  if not min_angle_deg < angle < 180.0:
    raise NotASector(
      f"not a sector: fitted fan angle {angle:.1f} degrees is outside "
      f"({min_angle_deg:g}, 180): a nearly straight outline (linear image or "
      "zoomed crop)"
    )
  if not (ay < rows.min() and 0 <= r_in < r_out):
    raise NotASector(
      f"not a sector: fitted apex row {ay:.1f} is not above the echoes (row "
      f"{rows.min()}) or radii {r_in:.1f}, {r_out:.1f} are not 0 <= inner < outer"
    )
  if spread > tolerance * r_out:
    raise NotASector(
      f"not a sector: its outline lies a median {spread:.1f} px from the best "
      f"fitting fan (> {tolerance:.1%} of the outer radius {r_out:.0f} px)"
    )
  fan = Fan(float(ax), float(ay), angle, float(r_in), float(r_out))
  inside = fan_mask(fan, m.shape)
  iou = (inside & m).sum() / (inside | m).sum()
  if iou < min_iou:
    raise NotASector(
      f"not a sector: the fitted fan and the echo region overlap with IoU {iou:.2f} (< {min_iou:g})"
    )
  return fan
