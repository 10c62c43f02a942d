r"""SMAT: linear <-> convex (sector) scan-mode warps (UltraFedFM, seed_systems.md 1.3).

Both directions are inverse maps: every output pixel computes where it comes from and samples the input
bilinearly (clamped at the input's edges), so there are no holes. The maps depend only on static
shapes and arguments and are computed on the host in float64.

Geometry, orientation='correct' (default). A linear image's rows are depth (row 0 = near field, at the
probe) and its columns lateral position. In the fan plane (X right, Y down, apex at the origin, source
pixels as unit) row y sits at radius r = inner_radius + y + 0.5, so the image spans radii
[inner_radius, inner_radius + H]; column x sits at angle theta = -fan/2 + fan * (x + 0.5) / W from the
downward vertical (column 0 on the left). The fan's bounding box is scaled uniformly to fit the H x W
output, centred horizontally and touching the top; the apex lies above the image when inner_radius > 0.

               * apex
              /|\
             / | \  theta
     +------/--|--\------+
     |     / . | . \     |   inner arc, r = inner_radius:      linear row 0   (near field)
     |    /.   |   .\    |
     |   / .   |   . \   |
     |  /_.____|____._\  |   outer arc, r = inner_radius + H:  linear row H-1 (far field)
     |   col 0    col W-1|
     +-------------------+   outside the fan: 0

orientation='official_code' reproduces the official linear_to_convex, whose fan is radially inverted:
    +---------------+
    |               |   square canvas of side 2(H + inner_radius) - 1; its upper half stays empty
    |       *       |   apex at the canvas centre
    |     /1/255\   |   r < inner_radius: the official code's appended band of uint8 value 1
    |   /  far   \  |
    |  /__ near __\ |   outer arc r = H + inner_radius - 1: linear row 0 (near field)
    +---------------+   then mirrored left-right and resized non-uniformly to H x W
The official forward scatter (rounded positions, 20 rays per column) is replaced by exact inverse
mapping. convex_to_linear always inverts the linear_to_convex geometry of the same orientation; the
official convex_to_linear (inner radius detected from pixels, content crop) is data-dependent in shape
and is not reproduced.

Real convex images have their own fans (apex, angle, radii differ by scanner and depth setting), so
SMAT unwarps each with sector_to_linear and that image's geometry.Fan: linear row i samples the arc
at radius inner + (outer - inner)(i + 0.5)/H, column j the ray at angle -fan/2 + fan (j + 0.5)/W
(orientation 'official_code' reverses both, as the inverse of the official linear_to_convex). Only
pixels inside the fan (and, optionally, inside `valid`) feed the output: the others are first
replaced by their nearest valid pixel, so bilinear sampling at the fan's rim never mixes in the black
surround, burnt-in text or calibration bars outside it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from ultrajax.ultramim import geometry

ORIENTATIONS = ("correct", "official_code")
_BAND = 1.0 / 255.0


class _Fan(NamedTuple):
  half: float  # half the fan angle, radians
  r_min: float  # radii inside the fan
  r_max: float
  r_row0: float  # radius = r_row0 + r_step * (source row)
  r_step: float
  v0: float  # output pixel (v, u) = (v0 + sv * Y, u0 + su * X) for fan-plane point (X, Y)
  u0: float
  sv: float
  su: float


def _fan(h: int, w: int, fan_angle_deg: float, inner_radius: float, orientation: str) -> _Fan:
  if not 0.0 < fan_angle_deg < 360.0:
    raise ValueError(f"fan_angle_deg={fan_angle_deg!r} is not in (0, 360)")
  if not inner_radius >= 0.0:
    raise ValueError(f"inner_radius={inner_radius!r} is not >= 0")
  if orientation not in ORIENTATIONS:
    raise ValueError(f"orientation={orientation!r} is not one of {ORIENTATIONS}")
  half = np.deg2rad(fan_angle_deg) / 2
  r0 = float(inner_radius)
  if orientation == "correct":
    r_max = r0 + h
    # Past +-90 degrees the fan's widest and highest points are on the outer arc.
    x_max = r_max * (np.sin(half) if half < np.pi / 2 else 1.0)
    y_min = (r0 if half <= np.pi / 2 else r_max) * np.cos(half)
    s = min(w / (2 * x_max), h / (r_max - y_min))
    return _Fan(half, r0, r_max, r0 + 0.5, 1.0, -y_min * s - 0.5, w / 2 - 0.5, s, s)
  # Official: padded row j (the band is rows H..H+r0-1) at radius H + r0 - 1 - j on the canvas above;
  # the canvas centre lands on the output centre whatever the resize, and the mirror negates X.
  side = 2 * (h + r0) - 1
  return _Fan(
    half, 0.0, h + r0 - 0.5, h + r0 - 1, -1.0, h / 2 - 0.5, w / 2 - 0.5, h / side, -w / side
  )


def _sample(images, rows: np.ndarray, cols: np.ndarray):
  """Bilinear samples of every image and channel at the same points.

  images: [B, H, W, C]; rows, cols: [h, w] -> [B, h, w, C] float32. A numpy input is warped on
  the host with scipy (the same interpolation), for data pipelines that prepare SMAT partners.
  """
  if isinstance(images, np.ndarray):
    planes = images.astype(np.float32).transpose(0, 3, 1, 2)
    out = [
      [scipy.ndimage.map_coordinates(p, [rows, cols], order=1, mode="nearest") for p in img]
      for img in planes
    ]
    return np.asarray(out, np.float32).transpose(0, 2, 3, 1)
  coords = [jnp.asarray(rows, jnp.float32), jnp.asarray(cols, jnp.float32)]

  def plane(x):
    return jax.scipy.ndimage.map_coordinates(x, coords, order=1, mode="nearest")

  return jax.vmap(jax.vmap(plane, in_axes=-1, out_axes=-1))(images.astype(jnp.float32))


def linear_to_convex(
  images, fan_angle_deg: float = 160.0, inner_radius: float = 120.0, orientation: str = "correct"
):
  """Warps linear-probe images into sectors.  images: [B, H, W, C] -> [B, H, W, C], 0 outside the fan.

  jax arrays are warped on device; numpy arrays on the host (same values, float32 out).
  """
  _, h, w, _ = images.shape
  f = _fan(h, w, fan_angle_deg, inner_radius, orientation)
  v, u = np.mgrid[0:h, 0:w].astype(np.float64)
  x, y = (u - f.u0) / f.su, (v - f.v0) / f.sv
  r, theta = np.hypot(x, y), np.arctan2(x, y)
  rows = (r - f.r_row0) / f.r_step
  cols = (theta + f.half) / (2 * f.half) * w - 0.5
  out = _sample(images, rows, cols)
  xp = np if isinstance(out, np.ndarray) else jnp
  if orientation == "official_code":
    out = xp.where((rows > h - 0.5)[..., None], _BAND, out)
  inside = (r >= f.r_min) & (r <= f.r_max) & (np.abs(theta) <= f.half)
  return xp.where(inside[..., None], out, 0.0).astype(np.float32)


def convex_to_linear(
  images, fan_angle_deg: float = 160.0, inner_radius: float = 120.0, orientation: str = "correct"
):
  """Unwarps sectors made by linear_to_convex (same arguments).  images: [B, H, W, C] -> [B, H, W, C]."""
  _, h, w, _ = images.shape
  f = _fan(h, w, fan_angle_deg, inner_radius, orientation)
  rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
  r = f.r_row0 + f.r_step * rows
  theta = (cols + 0.5) / w * 2 * f.half - f.half
  return _sample(images, f.v0 + f.sv * r * np.cos(theta), f.u0 + f.su * r * np.sin(theta))


def _fan_rows_cols(fan: geometry.Fan, shape: tuple[int, int], orientation: str):
  """Radius and angle of every linear pixel ([h, w] each): row i an arc, column j a ray."""
  h, w = shape
  i, j = np.mgrid[0:h, 0:w].astype(np.float64)
  if orientation == "official_code":
    i, j = h - 1 - i, w - 1 - j
  r = fan.inner_radius + (fan.outer_radius - fan.inner_radius) * (i + 0.5) / h
  return r, (j + 0.5) / w * 2 * fan.half - fan.half


def sector_to_linear(
  image: np.ndarray,
  fan,
  out_shape: tuple[int, int] | None = None,
  orientation: str = "correct",
  valid: np.ndarray | None = None,
) -> np.ndarray:
  """Unwarps one convex image with its own fan (host, numpy).

  image: [H, W] or [H, W, C]; fan: a geometry.Fan (or its dict) in this image's pixels;
  out_shape: (h, w) of the linear image (default (H, W)); valid: [H, W] bool, pixels allowed to
  feed the output besides being inside the fan (default: all). Returns float32 [h, w(, C)], every
  pixel a bilinear mix of valid pixels inside the fan.
  """
  if orientation not in ORIENTATIONS:
    raise ValueError(f"orientation={orientation!r} is not one of {ORIENTATIONS}")
  fan = geometry.check_fan(fan)
  image = np.asarray(image, np.float32)
  planes = image[..., None] if image.ndim == 2 else image
  shape = planes.shape[:2]
  nearest, coords = _unwarp_plan(fan, shape, tuple(out_shape or shape), orientation)
  if valid is not None:
    nearest = _nearest_allowed(geometry.fan_mask(fan, shape) & valid, fan)
  out = _sample(planes[nearest[0], nearest[1]][None], *coords)[0]
  return out[..., 0] if image.ndim == 2 else out


def _nearest_allowed(allowed: np.ndarray, fan) -> np.ndarray:
  """[2, H, W]: (row, col) of the nearest allowed pixel of every pixel."""
  if not allowed.any():
    raise ValueError(f"no pixel of the {allowed.shape[0]}x{allowed.shape[1]} image is inside {fan}")
  return scipy.ndimage.distance_transform_edt(~allowed, return_distances=False, return_indices=True)


@functools.lru_cache(maxsize=64)
def _unwarp_plan(fan: geometry.Fan, shape, out_shape, orientation: str):
  """What sector_to_linear needs of a fan alone (a client's images often share one): the nearest
  pixel inside the fan of every pixel [2, H, W] and the sample points [2, h, w]."""
  nearest = _nearest_allowed(geometry.fan_mask(fan, shape), fan)
  r, theta = _fan_rows_cols(fan, out_shape, orientation)
  coords = np.stack([fan.apex_y + r * np.cos(theta), fan.apex_x + r * np.sin(theta)])
  for a in (nearest, coords):
    a.setflags(write=False)
  return nearest, coords


def linear_to_sector(
  image: np.ndarray, fan, out_shape: tuple[int, int], orientation: str = "correct"
) -> np.ndarray:
  """The inverse of sector_to_linear: a linear image [h, w(, C)] drawn into the fan of an image of
  out_shape (H, W) (host, numpy). Returns float32 [H, W(, C)], 0 outside the fan."""
  if orientation not in ORIENTATIONS:
    raise ValueError(f"orientation={orientation!r} is not one of {ORIENTATIONS}")
  fan = geometry.check_fan(fan)
  image = np.asarray(image, np.float32)
  planes = image[..., None] if image.ndim == 2 else image
  h, w = planes.shape[:2]
  r, theta = geometry.polar(fan, out_shape)
  rows = (r - fan.inner_radius) / (fan.outer_radius - fan.inner_radius) * h - 0.5
  cols = (theta + fan.half) / (2 * fan.half) * w - 0.5
  if orientation == "official_code":
    rows, cols = h - 1 - rows, w - 1 - cols
  inside = geometry.fan_mask(fan, out_shape)[..., None]
  out = np.where(inside, _sample(planes[None], rows, cols)[0], 0.0).astype(np.float32)
  return out[..., 0] if image.ndim == 2 else out
