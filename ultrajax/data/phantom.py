r"""The built-in synthetic ultrasound phantom: B-mode-like images with organ and lesion masks (numpy, host).

Every image is drawn from an explicit numpy Generator, so (seed, organ, probe, size) fixes it.

Tissue. A scene is a list of analytic regions (ellipses, rings, layers under the probe face, fibre
stripes, spiculated stars) painted in order onto an echogenicity map (mean backscattered intensity,
soft tissue ~ 1, fluid ~ 0.002, fat ~ 0.3, specular interfaces and bone > 2) and an attenuation map.
Scene coordinates are in units of the imaging depth: x lateral (0 on the probe axis), y depth along the
probe axis, d distance from the probe face along the beam (d = y for a linear probe). Superficial layers
are bands in d, so they follow the probe face; organs are shapes in (x, y), so a linear and a convex
scan of the same scene show the same anatomy.

Echoes. Each sample point holds a scatterer with a circular complex Gaussian amplitude scaled by
sqrt(echogenicity * two-way transmission); transmission integrates the attenuation along the beam,
which gives depth fall-off, acoustic shadows behind bone and malignant lesions and enhancement behind
fluid. The point-spread function is separable: a Gaussian-modulated pulse along the beam times a
Gaussian beam profile across it. The simulation runs in complex baseband (IQ): the envelope of the
RF pulse g(z) cos(k z) is |g * (s e^{-ikz})|, and for circular scatterers s e^{-ikz} has the same law
as s, so convolving s with the Gaussian g alone gives the envelope of the modulated pulse. Envelope
= |IQ|, which is Rayleigh distributed in uniform tissue (fully developed speckle, mean / std = 1.913).
Log compression maps [TOP_DB - dynamic range, TOP_DB] dB onto grey levels 1..255; 0 is kept for pixels
without echo data (outside the fan), so a sector stays recoverable from the pixels alone.

Probes. 'linear': the echo grid is the image (depth down the rows, width 1 across). 'convex': echoes
are simulated on a polar grid (rows = radius, columns = beam angle, so the PSF is axial along each
beam and widens with depth as a real sector's does) and scan-converted with bilinear interpolation
into a fan whose apex lies above the image:

          * apex (APEX_RADIUS above the probe face)
         / \     FAN_ANGLE_DEG
    +---/---\---+     probe face: arc at r = APEX_RADIUS (d = 0)
    |  /     \  |
    | /       \ |
    |/_________\|     deepest arc: r = APEX_RADIUS + 1 (d = 1)
    |   0 here  |
    +-----------+

generate's fan_angle_deg and apex_radius change the fan; a convex record carries its exact fan in
pixels (`fan`), which SMAT's convex -> linear warp unwarps.

Labels. 0 normal (no lesion), 1 benign (oval, parallel, smooth margin; a solid hypoechoic nodule or an
anechoic cyst with posterior enhancement), 2 malignant (irregular spiculated outline, very hypoechoic,
posterior acoustic shadow). Lesions lie inside the organ; `lesion_mask` is exactly the painted lesion.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import scipy.ndimage

PROBES = ("linear", "convex")
LABELS = ("normal", "benign", "malignant")
LABEL_PROBS = (0.4, 0.3, 0.3)  # how often each label is drawn

DYNAMIC_RANGE_DB = 50.0
# Grey 255 sits this many dB above the mean intensity of unit-echogenicity tissue, so soft tissue lands
# mid-grey (~150), fat darker and specular interfaces near white.
TOP_DB = 18.0
FAN_ANGLE_DEG = 60.0
APEX_RADIUS = 0.3  # radius of the convex probe face, in units of the imaging depth
FLUID = 0.002  # echogenicity of blood, bile, urine, amniotic fluid: near black after compression
# Scene points every probe sees (|x| <= 0.2, 0.15 <= y <= 0.85), where lesion centres are placed so
# that a lesion is visible whatever the probe.
_VIEW_X, _VIEW_Y = 0.2, (0.15, 0.85)


class _Grid(NamedTuple):
  """Scene coordinates of sample points, each [H, W] float32 (units of the imaging depth)."""

  x: np.ndarray  # lateral offset from the probe axis
  y: np.ndarray  # depth along the probe axis
  d: np.ndarray  # distance from the probe face along the beam


class _Ellipse(NamedTuple):
  cx: float
  cy: float
  a: float  # semi-axis along the rotated x axis
  b: float  # semi-axis along the rotated y axis
  angle: float = 0.0  # radians
  hole: float = 0.0  # > 0: a ring, the inner ellipse scaled by `hole` left out

  def inside(self, g: _Grid) -> np.ndarray:
    # float(): a numpy float64 parameter would promote the float32 grid to float64 (slower).
    dx, dy = g.x - float(self.cx), g.y - float(self.cy)
    c, s = math.cos(self.angle), math.sin(self.angle)
    q = ((c * dx + s * dy) / float(self.a)) ** 2 + ((c * dy - s * dx) / float(self.b)) ** 2
    m = q <= 1.0
    return m & (q > float(self.hole) ** 2) if self.hole else m

  def half_height(self) -> float:
    return math.hypot(self.a * math.sin(self.angle), self.b * math.cos(self.angle))

  def point(self, u: float, v: float) -> tuple[float, float]:
    """(x, y) of ellipse coordinates (u, v) (the rim is u^2 + v^2 = 1)."""
    c, s = math.cos(self.angle), math.sin(self.angle)
    return self.cx + self.a * u * c - self.b * v * s, self.cy + self.a * u * s + self.b * v * c


class _Surface(NamedTuple):
  """A boundary at distance depth + amp * sin(freq * x + phase) from the probe face."""

  depth: float
  amp: float = 0.0
  freq: float = 0.0
  phase: float = 0.0

  def at(self, x):
    if not self.amp:
      return float(self.depth)
    return float(self.depth) + float(self.amp) * np.sin(float(self.freq) * x + float(self.phase))


class _Layer(NamedTuple):
  top: _Surface
  bottom: _Surface

  def inside(self, g: _Grid) -> np.ndarray:
    return (g.d >= self.top.at(g.x)) & (g.d < self.bottom.at(g.x))


def _layer(top: float | _Surface, bottom: float | _Surface) -> _Layer:
  return _Layer(*(s if isinstance(s, _Surface) else _Surface(s) for s in (top, bottom)))


class _Stripes(NamedTuple):
  """Thin parallel lines (muscle fibres, septa, ligaments) clipped to `within`."""

  within: object
  period: float
  angle: float  # of the lines' normal, from the x axis
  duty: float  # fraction of each period that is line
  phase: float

  def inside(self, g: _Grid) -> np.ndarray:
    across = g.x * math.cos(self.angle) + g.y * math.sin(self.angle)
    t = across / float(self.period) + float(self.phase)
    return ((t - np.floor(t)) < self.duty) & self.within.inside(g)


class _Star(NamedTuple):
  """Irregular spiculated outline.

  Radius at angle phi: r * (1 + sum_k a_k cos(k phi + p_k) + h * max(0, cos(n phi + p))^6).
  """

  cx: float
  cy: float
  r: float
  harmonics: tuple[tuple[int, float, float], ...]  # (k, a_k, p_k)
  spikes: int
  spike_height: float
  spike_phase: float

  def inside(self, g: _Grid) -> np.ndarray:
    dx, dy = g.x - float(self.cx), g.y - float(self.cy)
    rho2 = dx * dx + dy * dy
    reach = self.r * (1.0 + sum(a for _, a, _ in self.harmonics) + self.spike_height)
    m = rho2 <= reach**2
    # The angle (arctan2, cosines) only where the outline can reach: a few percent of the points.
    near = np.nonzero(m)
    phi = np.arctan2(dy[near], dx[near])
    edge = 1.0 + sum(a * np.cos(k * phi + p) for k, a, p in self.harmonics)
    spikes = np.maximum(np.cos(self.spikes * phi + self.spike_phase), 0.0) ** 6
    edge = edge + self.spike_height * spikes
    m[near] = rho2[near] <= (self.r * edge) ** 2
    return m


class _Within(NamedTuple):
  shape: object
  within: object

  def inside(self, g: _Grid) -> np.ndarray:
    return self.shape.inside(g) & self.within.inside(g)


class _Scene(NamedTuple):
  background: float  # echogenicity where no region is painted
  regions: list  # (shape, echogenicity, extra attenuation per depth unit)
  organ: object  # the shape behind organ_mask
  site: tuple[float, float, float]  # (x, y, largest radius) of a lesion in the organ


def _wall(rng, fat=(0.04, 0.1), muscle=None) -> tuple[list, float]:
  """Skin, subcutaneous fat, optionally a muscle layer, then a fascia line: (regions, depth below)."""
  skin = rng.uniform(0.015, 0.03)
  top = skin + rng.uniform(*fat)
  regions = [(_layer(0.0, skin), 1.8, 0.0), (_layer(skin, top), 0.3, 0.0)]
  if muscle is not None:
    bottom = top + 0.012 + rng.uniform(*muscle)
    regions += [(_layer(top, top + 0.012), 2.0, 0.0), (_layer(top + 0.012, bottom), 0.5, 0.0)]
    top = bottom
  regions.append((_layer(top, top + 0.012), 2.0, 0.0))
  return regions, top + 0.012


def _organ(rng, top: float, x: float, a, b, tilt: float, gap) -> _Ellipse:
  """An organ ellipse drawn in this order: centre in [-x, x], semi-axes in the (low, high) ranges
  a and b, rotation in [-tilt, tilt]; then moved below `top` by a gap (a (low, high) range, or a
  fixed number), so that it never overlaps the wall layers above it."""
  e = _Ellipse(rng.uniform(-x, x), 0.0, rng.uniform(*a), rng.uniform(*b), rng.uniform(-tilt, tilt))
  depth = top + (rng.uniform(*gap) if isinstance(gap, tuple) else gap)
  return e._replace(cy=depth + e.half_height())


def _site_in(rng, e: _Ellipse, max_radius: float) -> tuple[float, float, float]:
  """A lesion site in the inner half of ellipse e that every probe sees (else e's centre)."""
  for _ in range(16):
    x, y = e.point(*rng.uniform(-0.5, 0.5, 2))
    if abs(x) <= _VIEW_X and _VIEW_Y[0] <= y <= _VIEW_Y[1]:
      return x, y, max_radius
  return e.cx, e.cy, max_radius


def _mid_site(rng, layer: _Layer, x: float, max_radius: float) -> tuple[float, float, float]:
  """A lesion site half-way through `layer`, at a lateral offset drawn in [-x, x]."""
  x = rng.uniform(-x, x)
  return x, (layer.top.at(x) + layer.bottom.at(x)) / 2, max_radius


def _in_frame(e: _Ellipse, du: float, dv: float, a: float, b: float) -> _Ellipse:
  """An ellipse at offset (du, dv) in e's rotated frame (units of e's semi-axes), sharing its rotation."""
  x, y = e.point(du, dv)
  return _Ellipse(x, y, a, b, e.angle)


def _liver(rng) -> _Scene:
  regions, below = _wall(rng, muscle=(0.04, 0.08))
  liver = _organ(rng, below, 0.1, (0.7, 0.9), (0.42, 0.52), 0.3, (0.0, 0.05))
  regions.append((liver, 1.0, 0.0))
  for _ in range(rng.integers(2, 5)):
    r = rng.uniform(0.02, 0.05)
    vessel = _Ellipse(
      *liver.point(*rng.uniform(-0.6, 0.6, 2)), r, r * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
    )
    regions.append((_Within(vessel, liver), FLUID, -4.0))
  return _Scene(0.7, regions, liver, _site_in(rng, liver, 0.12))


def _thyroid(rng) -> _Scene:
  regions, below = _wall(rng, fat=(0.02, 0.04), muscle=(0.05, 0.09))  # strap muscles
  lobe = _organ(rng, below, 0.08, (0.28, 0.36), (0.15, 0.2), 0.15, 0.01)
  side = rng.choice((-1.0, 1.0))
  r = rng.uniform(0.06, 0.08)
  carotid = _Ellipse(lobe.cx + side * (lobe.a + r + 0.02), lobe.cy + rng.uniform(0.0, 0.06), r, r)
  # Trachea: the air behind its cartilage ring reflects everything, so it casts a full shadow.
  trachea = _Ellipse(lobe.cx - side * (lobe.a + 0.1), lobe.cy, 0.13, 0.11, 0.0, 0.8)
  regions += [
    (carotid._replace(a=r + 0.012, b=r + 0.012), 2.0, 0.0),
    (carotid, FLUID, -4.0),
    (lobe, 1.3, 0.0),
    (trachea, 3.0, 80.0),
  ]
  return _Scene(0.6, regions, lobe, _site_in(rng, lobe, 0.45 * lobe.b))


def _breast(rng) -> _Scene:
  skin = rng.uniform(0.015, 0.03)
  wave = (rng.uniform(0.01, 0.03), rng.uniform(4, 9), rng.uniform(0, 2 * np.pi))
  top, bottom = skin + rng.uniform(0.1, 0.18), skin + rng.uniform(0.42, 0.55)
  gland = _layer(_Surface(top, *wave), _Surface(bottom, *wave))
  fat = _layer(skin, gland.top)
  pec = bottom + rng.uniform(0.06, 0.1)
  pec_bottom = pec + rng.uniform(0.08, 0.12)
  rib = _Ellipse(rng.uniform(-0.3, 0.3), pec_bottom + 0.06, 0.12, 0.05)
  regions = [
    (_layer(0.0, skin), 1.8, 0.0),
    (fat, 0.3, 0.0),
    # Cooper's ligaments cross the subcutaneous fat obliquely.
    (_Stripes(fat, rng.uniform(0.08, 0.12), rng.uniform(0.5, 1.0), 0.08, rng.uniform()), 1.5, 0.0),
    (gland, 1.3, 0.0),
    (_layer(pec, pec_bottom), 0.55, 0.0),
    (rib, 2.5, 150.0),
  ]
  return _Scene(0.3, regions, gland, _mid_site(rng, gland, 0.12, 0.45 * (bottom - top)))


def _kidney(rng) -> _Scene:
  regions, below = _wall(rng, muscle=(0.05, 0.1))
  kidney = _organ(rng, below, 0.08, (0.3, 0.38), (0.17, 0.22), 0.4, (0.03, 0.1))
  regions += [
    (kidney._replace(a=kidney.a + 0.015, b=kidney.b + 0.015), 1.8, 0.0),
    (kidney, 0.55, 0.0),
  ]
  for k in range(5):
    # Medullary pyramids: darker than the cortex, in a ring around the sinus.
    phi = np.pi * (k / 4.0) + rng.uniform(-0.15, 0.15)
    pyramid = _in_frame(
      kidney, 0.62 * np.cos(phi), 0.62 * np.sin(phi), 0.12 * kidney.a, 0.22 * kidney.b
    )
    regions.append((_Within(pyramid, kidney), 0.2, 0.0))
  sinus_fat = _in_frame(kidney, 0.0, 0.0, 0.55 * kidney.a, 0.35 * kidney.b)
  regions.append((sinus_fat, 1.8, 0.0))
  return _Scene(0.9, regions, kidney, _site_in(rng, kidney, min(0.1, 0.45 * kidney.b)))


def _heart(rng) -> _Scene:
  """Apical four-chamber view: ventricles near the apex (top), atria deep."""
  regions, below = _wall(rng, fat=(0.02, 0.04))
  heart = _organ(rng, below, 0.05, (0.34, 0.4), (0.4, 0.46), 0.15, 0.02)
  lv = _in_frame(heart, 0.33, -0.15, 0.28 * heart.a, 0.5 * heart.b)
  chambers = [
    lv,
    _in_frame(heart, -0.37, -0.1, 0.24 * heart.a, 0.42 * heart.b),
    _in_frame(heart, 0.32, 0.57, 0.26 * heart.a, 0.22 * heart.b),
    _in_frame(heart, -0.35, 0.58, 0.24 * heart.a, 0.22 * heart.b),
  ]
  valves = [_in_frame(heart, u, 0.34, 0.2 * heart.a, 0.012) for u in (0.33, -0.36)]
  regions += [(heart._replace(a=heart.a + 0.015, b=heart.b + 0.015), 2.0, 0.0), (heart, 0.8, 0.0)]
  regions += [(_Within(c, heart), FLUID, -3.0) for c in chambers]
  regions += [(_Within(v, heart), 2.0, 0.0) for v in valves]
  return _Scene(0.2, regions, heart, (lv.cx, lv.cy, 0.07))


def _fetal_head(rng) -> _Scene:
  # The maternal abdominal and uterine wall.
  regions, below = _wall(rng, fat=(0.03, 0.06), muscle=(0.04, 0.07))
  head = _organ(rng, below, 0.06, (0.24, 0.3), (0.19, 0.24), 0.6, (0.03, 0.1))
  skull = head._replace(hole=1.0 - rng.uniform(0.06, 0.09))
  regions += [
    (_layer(below, 10.0), FLUID, -1.5),  # amniotic fluid
    (head, 0.25, 0.0),
    (skull, 5.0, 40.0),
    (_in_frame(head, 0.0, 0.0, 0.85 * head.a, 0.008), 2.5, 0.0),  # midline echo
    # cavum septi pellucidi
    (_in_frame(head, 0.35, 0.0, 0.12 * head.a, 0.05 * head.b), FLUID, 0.0),
  ]
  return _Scene(0.5, regions, head, _site_in(rng, head, min(0.08, 0.35 * head.b)))


def _lung(rng) -> _Scene:
  regions, below = _wall(rng, fat=(0.03, 0.06), muscle=(0.05, 0.1))  # chest wall
  pleura = below + rng.uniform(0.02, 0.06)
  lung = _layer(pleura, 10.0)
  regions += [(lung, 0.12, 0.0), (_layer(pleura, pleura + 0.015), 6.0, 0.0)]
  # A-lines: reverberations between probe and pleura repeat the pleural line at its multiples.
  k = 2
  while k * pleura < 1.0:
    regions.append((_layer(k * pleura, k * pleura + 0.012), 1.2 * 0.6 ** (k - 2), 0.0))
    k += 1
  for side in (-1.0, 1.0):
    rib = _Ellipse(side * rng.uniform(0.22, 0.32), pleura - 0.045, 0.07, 0.04)
    regions.append((rib, 3.0, 150.0))
  x = rng.uniform(-0.1, 0.1)
  return _Scene(0.5, regions, lung, (x, pleura + rng.uniform(0.08, 0.15), 0.08))


def _skin(rng) -> _Scene:
  """High-frequency skin: entry echo, dermis (the organ), subcutis with septa, fascia, muscle."""
  wave = (rng.uniform(0.005, 0.02), rng.uniform(5, 12), rng.uniform(0, 2 * np.pi))
  epidermis = rng.uniform(0.02, 0.035)
  bottom = epidermis + rng.uniform(0.2, 0.3)
  fascia = bottom + rng.uniform(0.3, 0.4)
  dermis = _layer(epidermis, _Surface(bottom, *wave))
  subcutis = _layer(_Surface(bottom, *wave), fascia)
  septa = _Stripes(subcutis, rng.uniform(0.1, 0.16), rng.uniform(0.8, 1.3), 0.07, rng.uniform())
  regions = [
    (_layer(0.0, epidermis), 3.0, 0.0),
    (dermis, 1.3, 0.0),
    (subcutis, 0.3, 0.0),
    (septa, 1.2, 0.0),
    (_layer(fascia, fascia + 0.015), 2.0, 0.0),
  ]
  return _Scene(0.5, regions, dermis, _mid_site(rng, dermis, 0.12, 0.45 * (bottom - epidermis)))


def _muscle(rng) -> _Scene:
  regions, top = _wall(rng, fat=(0.05, 0.12))
  depth = top + rng.uniform(0.4, 0.55)
  bottom = _Surface(depth, rng.uniform(0.01, 0.03), rng.uniform(3, 7), rng.uniform(0, 2 * np.pi))
  belly = _layer(top, bottom)
  fascia = bottom._replace(depth=bottom.depth + 0.015)
  bone = bottom._replace(depth=fascia.depth + rng.uniform(0.05, 0.15))
  # Perimysium: bright oblique fibre lines of a pennate muscle.
  pennation = rng.choice((-1, 1)) * rng.uniform(0.15, 0.4)
  fibres = _Stripes(belly, rng.uniform(0.04, 0.07), np.pi / 2 + pennation, 0.15, rng.uniform())
  regions += [
    (belly, 0.45, 0.0),
    (fibres, 1.5, 0.0),
    (_layer(bottom, fascia), 2.2, 0.0),
    (_layer(bone, bone._replace(depth=bone.depth + 0.03)), 4.0, 150.0),
  ]
  return _Scene(0.7, regions, belly, _mid_site(rng, belly, 0.12, 0.3 * (bottom.depth - top)))


def _pancreas(rng) -> _Scene:
  regions, below = _wall(rng, muscle=(0.04, 0.08))
  liver_bottom = below + rng.uniform(0.1, 0.16)
  pancreas = _organ(rng, liver_bottom, 0.08, (0.32, 0.42), (0.07, 0.1), 0.2, (0.02, 0.06))
  # The splenic vein, behind.
  vein = _in_frame(pancreas, 0.0, 1.0 + 0.035 / pancreas.b, 0.7 * pancreas.a, 0.022)
  r = rng.uniform(0.05, 0.07)
  aorta = _Ellipse(pancreas.cx + rng.uniform(-0.05, 0.05), vein.cy + rng.uniform(0.13, 0.18), r, r)
  spine = _Ellipse(aorta.cx + rng.uniform(-0.1, 0.1), aorta.cy + 0.2, 0.15, 0.06)
  regions += [
    (_layer(below, liver_bottom), 1.0, 0.0),
    (vein, FLUID, -3.0),
    (aorta._replace(a=r + 0.012, b=r + 0.012), 2.0, 0.0),
    (aorta, FLUID, -3.0),
    (spine, 3.0, 150.0),
    (pancreas, 1.3, 0.0),
  ]
  return _Scene(0.9, regions, pancreas, _site_in(rng, pancreas, 0.8 * pancreas.b))


def _gallbladder(rng) -> _Scene:
  regions, below = _wall(rng, muscle=(0.04, 0.08))
  gb = _organ(rng, below, 0.08, (0.2, 0.28), (0.09, 0.13), 0.5, (0.08, 0.2))
  lumen = gb._replace(a=gb.a - 0.02, b=gb.b - 0.02)
  regions += [(gb, 1.8, 0.0), (lumen, FLUID, -4.0)]
  if rng.random() < 0.3:
    r = rng.uniform(0.02, 0.035)  # a gallstone rests on the dependent (deep) wall and shadows
    regions.append((_Ellipse(lumen.cx, lumen.cy + lumen.half_height() - r, r, r), 4.0, 150.0))
  return _Scene(1.0, regions, gb, _site_in(rng, gb, min(0.08, 0.7 * gb.b)))


def _colorectum(rng) -> _Scene:
  """Endorectal view: water balloon, then the five-layer rectal wall (the organ), then perirectal fat."""
  wave = (rng.uniform(0.0, 0.015), rng.uniform(2, 5), rng.uniform(0, 2 * np.pi))
  depth = rng.uniform(0.05, 0.1)
  regions = [(_layer(0.0, depth), FLUID, -2.0)]
  top = depth
  # Interface, mucosa, submucosa, muscularis propria, serosa / perirectal fat interface.
  thicknesses = rng.uniform((0.012, 0.02, 0.02, 0.03, 0.012), (0.02, 0.035, 0.035, 0.05, 0.02))
  for thickness, echo in zip(thicknesses, (2.0, 0.35, 1.6, 0.3, 2.0)):
    layer = _layer(_Surface(depth, *wave), _Surface(depth + thickness, *wave))
    regions.append((layer, echo, 0.0))
    depth += thickness
  wall = _layer(_Surface(top, *wave), _Surface(depth, *wave))
  for _ in range(rng.integers(0, 3)):
    r = rng.uniform(0.025, 0.045)
    regions.append(
      (_Ellipse(rng.uniform(-0.3, 0.3), depth + rng.uniform(0.1, 0.4), r, 0.7 * r), 0.3, 0.0)
    )
  return _Scene(1.1, regions, wall, _mid_site(rng, wall, 0.1, 0.6 * (depth - top)))


def _nerve(rng) -> _Scene:
  """Brachial plexus: a honeycomb of dark fascicles in a bright epineurium, beside an artery."""
  regions, below = _wall(rng, fat=(0.03, 0.06), muscle=(0.08, 0.14))
  nerve = _organ(rng, below, 0.08, (0.12, 0.17), (0.07, 0.1), 0.3, (0.05, 0.15))
  r = rng.uniform(0.05, 0.07)
  side = rng.choice((-1, 1))
  artery = _Ellipse(
    nerve.cx + side * rng.uniform(0.25, 0.3), nerve.cy + rng.uniform(-0.05, 0.1), r, r
  )
  regions += [
    (artery._replace(a=r + 0.01, b=r + 0.01), 2.0, 0.0),
    (artery, FLUID, -3.0),
    (nerve, 1.5, 0.0),
  ]
  for _ in range(rng.integers(5, 10)):
    f = rng.uniform(0.018, 0.03)
    fascicle = _Ellipse(*nerve.point(*rng.uniform(-0.6, 0.6, 2)), f, f)
    regions.append((_Within(fascicle, nerve), 0.15, 0.0))
  return _Scene(0.5, regions, nerve, _site_in(rng, nerve, 0.6 * nerve.b))


_SCENES = {
  "liver": _liver,
  "thyroid": _thyroid,
  "breast": _breast,
  "kidney": _kidney,
  "heart": _heart,
  "fetal_head": _fetal_head,
  "lung": _lung,
  "skin": _skin,
  "muscle": _muscle,
  "pancreas": _pancreas,
  "gallbladder": _gallbladder,
  "colorectum": _colorectum,
  "nerve": _nerve,
}
# Record seeds index this order (data/nodes.py, data/sources.py): add organs at the end.
ORGANS = tuple(_SCENES)


def _lesion(rng, label: int, site: tuple[float, float, float], min_radius: float):
  """(shape, echogenicity, extra attenuation) of a benign (1) or malignant (2) lesion at `site`."""
  x, y, max_radius = site
  r = max(min_radius, rng.uniform(0.5, 1.0) * max_radius)
  if label == 1:
    shape = _Ellipse(x, y, r, r * rng.uniform(0.55, 0.9), rng.uniform(-0.3, 0.3))  # wider than tall
    if rng.random() < 0.4:
      return shape, FLUID, -6.0  # cyst: anechoic, posterior enhancement
    return shape, rng.uniform(0.15, 0.4), 0.0
  harmonics = tuple((k, rng.uniform(0.0, 0.1), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
  spikes = (int(rng.integers(7, 14)), rng.uniform(0.4, 0.8), rng.uniform(0, 2 * np.pi))
  shape = _Star(x, y, 0.6 * r, harmonics, *spikes)
  return shape, rng.uniform(0.05, 0.2), rng.uniform(15.0, 30.0)


class _Geometry(NamedTuple):
  echo: _Grid  # where echoes are simulated: rows along the beam, columns across
  image: _Grid  # the output pixels
  fan: np.ndarray | None  # [S, S] bool, pixels with echo data; None: all of them
  scan: np.ndarray | None  # [2, S, S] echo-grid (row, col) of each pixel, for scan conversion
  fan_pixels: dict | None  # a convex record's `fan`
  dz: float  # depth step between echo-grid rows
  pixel: float  # output pixel size


def _frozen(*arrays):
  for a in arrays:
    a.setflags(write=False)
  return arrays


@functools.lru_cache(maxsize=32)
def _geometry(
  probe: str, size: int, fan_angle_deg: float = FAN_ANGLE_DEG, apex_radius: float = APEX_RADIUS
) -> _Geometry:
  if probe == "linear":
    v, u = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    grid = _Grid(*_frozen(u - 0.5, v, v))
    return _Geometry(grid, grid, None, None, None, 1.0 / size, 1.0 / size)
  half, r0 = math.radians(fan_angle_deg) / 2, apex_radius
  r1 = r0 + 1.0
  # Pixels per depth unit: the fan's bounding box fits the image, centred, touching the top.
  s = min(size / (2 * r1 * math.sin(half)), size / (r1 - r0 * math.cos(half)))
  # The fan in pixels (pixel (i, j) centred at row i, column j; the fields of
  # ultramim.geometry.Fan). A pixel has echo data iff its centre is inside.
  pixels = dict(
    apex_x=size / 2 - 0.5,
    apex_y=-r0 * math.cos(half) * s - 0.5,
    fan_angle_deg=float(fan_angle_deg),
    inner_radius=r0 * s,
    outer_radius=r1 * s,
  )
  # About one echo sample per output pixel: radially, and across the beams on the deepest arc.
  nr, nt = math.ceil(s), math.ceil(2 * half * r1 * s)
  r = r0 + (np.arange(nr, dtype=np.float32) + 0.5) / nr
  t = -half + (np.arange(nt, dtype=np.float32) + 0.5) * (2 * half / nt)
  r, t = np.meshgrid(r, t, indexing="ij")
  echo = _Grid(*_frozen(r * np.sin(t), r * np.cos(t) - r0, r - r0))
  v, u = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  x, ya = (u - size / 2) / s, v / s + r0 * math.cos(half)  # ya: depth below the apex
  rr, tt = np.hypot(x, ya), np.arctan2(x, ya)
  fan = (rr >= r0) & (rr <= r1) & (np.abs(tt) <= half)
  scan = np.stack([(rr - r0) * nr - 0.5, (tt + half) / (2 * half) * nt - 0.5])
  image = _Grid(*_frozen(x, ya - r0, rr - r0))
  return _Geometry(echo, image, *_frozen(fan, scan), pixels, 1.0 / nr, 1.0 / s)


def _kernel(sigma: float) -> np.ndarray:
  """Sampled Gaussian with unit energy (sum of squares 1), so filtering keeps the mean intensity."""
  t = np.arange(-math.ceil(3 * sigma), math.ceil(3 * sigma) + 1, dtype=np.float32)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  return k / np.sqrt(np.sum(k * k))


def _envelope(rng, amplitude: np.ndarray, psf_sigma: tuple[float, float]) -> np.ndarray:
  """Speckle envelope of scatterers with rms amplitude `amplitude`.  [H, W] -> [H, W] float32.

  E|envelope|^2 = amplitude^2 wherever amplitude varies slowly on the PSF's scale.
  """
  # Each of I and Q carries half the intensity.
  iq = rng.standard_normal((2, *amplitude.shape), dtype=np.float32)
  iq *= amplitude * np.float32(math.sqrt(0.5))
  iq = scipy.ndimage.correlate1d(iq, _kernel(psf_sigma[0]), axis=1, mode="reflect")
  iq = scipy.ndimage.correlate1d(iq, _kernel(psf_sigma[1]), axis=2, mode="reflect")
  return np.hypot(iq[0], iq[1])


def speckle_envelope(
  rng: np.random.Generator, shape: tuple[int, int], psf_sigma: tuple[float, float] = (1.0, 2.0)
) -> np.ndarray:
  """Envelope of uniform tissue (echogenicity 1) before log compression: [H, W] float32, Rayleigh.

  psf_sigma: (axial, lateral) standard deviations of the PSF in pixels. The same code path images
  the phantom's tissue, so its speckle statistics are the phantom's.
  """
  return _envelope(rng, np.ones(shape, np.float32), psf_sigma)


def _paint(
  scene: _Scene, regions: list, g: _Grid, attenuation: float
) -> tuple[np.ndarray, np.ndarray]:
  """Echogenicity and attenuation maps of the scene at the grid points.  -> 2 x [H, W] float32."""
  echo = np.full(g.x.shape, scene.background, np.float32)
  atten = np.full(g.x.shape, attenuation, np.float32)
  for shape, e, a in regions:
    m = shape.inside(g)
    np.copyto(echo, e, where=m)
    np.copyto(atten, attenuation + a, where=m)
  return echo, atten


def generate(
  rng: np.random.Generator,
  organ: str,
  probe: str,
  image_size: int,
  dynamic_range_db: float = DYNAMIC_RANGE_DB,
  *,
  fan_angle_deg: float = FAN_ANGLE_DEG,
  apex_radius: float = APEX_RADIUS,
) -> dict:
  """One phantom image and its annotations, all drawn from `rng`.

  organ: one of ORGANS; probe: one of PROBES; image_size: S; dynamic_range_db: the dB span that
  log compression maps onto grey levels 1..255; fan_angle_deg, apex_radius: a convex probe's fan
  (apex_radius in units of the imaging depth).
  Returns image uint8 [S, S] (0 only outside a convex fan), organ_mask and lesion_mask uint8 [S, S]
  in {0, 1} (lesion_mask inside organ_mask; empty iff label == 0), label int (index into LABELS),
  organ and probe (the arguments); convex images also `fan`, their exact fan in
  pixels (the fields of ultramim.geometry.Fan; a pixel has echo data iff its centre is inside).
  """
  if organ not in _SCENES:
    raise ValueError(f"organ={organ!r} is not one of {ORGANS}")
  if probe not in PROBES:
    raise ValueError(f"probe={probe!r} is not one of {PROBES}")
  if image_size < 8:
    raise ValueError(f"image_size={image_size!r} is below 8")
  if not (0.0 < fan_angle_deg < 180.0 and apex_radius >= 0.0):
    raise ValueError(
      f"fan_angle_deg={fan_angle_deg!r} is not in (0, 180) or "
      f"apex_radius={apex_radius!r} is below 0"
    )
  geo = _geometry(probe, int(image_size), float(fan_angle_deg), float(apex_radius))
  label = int(rng.choice(len(LABELS), p=LABEL_PROBS))
  scene = _SCENES[organ](rng)
  organ_mask = scene.organ.inside(geo.image)
  regions, lesion_mask = scene.regions, np.zeros_like(organ_mask)
  if label:
    shape, echo, atten = _lesion(rng, label, scene.site, 2.5 * geo.pixel)
    lesion = _Within(shape, scene.organ)
    lesion_mask = lesion.inside(geo.image)
    if geo.fan is not None:
      lesion_mask &= geo.fan
    # Painted last, so the lesion is exactly what the mask says; at tiny sizes a lesion can miss
    # every pixel centre, and the image is then honestly normal.
    if lesion_mask.any():
      regions = regions + [(lesion, echo, atten)]
    else:
      label = 0
  # Tissue attenuation per depth unit that time-gain compensation leaves uncompensated.
  residual_attenuation = rng.uniform(0.5, 1.5)
  echo, atten = _paint(scene, regions, geo.echo, residual_attenuation)
  # Two-way transmission along each beam (rows): the residual depth fall-off, plus shadows and
  # enhancement behind strong and weak attenuators.
  transmission = np.exp(-np.cumsum(atten, axis=0) * np.float32(geo.dz))
  gain = 10.0 ** (rng.uniform(-3.0, 3.0) / 20)
  # Speckle grains shrink with the field of view in pixels, floored so they stay resolved.
  psf_sigma = max(0.75, image_size / 256), max(1.25, 2.0 * image_size / 256)
  envelope = _envelope(rng, np.sqrt(echo * transmission) * np.float32(gain), psf_sigma)
  db = 20.0 * np.log10(envelope + np.float32(1e-6))
  grey = 1.0 + 254.0 * np.clip((db - TOP_DB) / dynamic_range_db + 1.0, 0.0, 1.0)
  if geo.fan is not None:
    organ_mask &= geo.fan
    grey = np.where(
      geo.fan, scipy.ndimage.map_coordinates(grey, geo.scan, order=1, mode="nearest"), 0.0
    )
  record = {
    "image": np.rint(grey).astype(np.uint8),
    "organ_mask": organ_mask.astype(np.uint8),
    "lesion_mask": lesion_mask.astype(np.uint8),
    "label": label,
    "organ": organ,
    "probe": probe,
  }
  if geo.fan is not None:
    record["fan"] = dict(geo.fan_pixels)
  return record
