"""Procedurally drawn cartoon faces: the embedded default dataset.

Training has to run on a fresh machine with no download, so the default data source draws simple
cartoon faces (background, hair, head, ears, eyes, brows, nose, mouth, neck, shirt) instead of
reading CelebA. The faces are centred and fill about 60-80% of the image height, like aligned
CelebA crops, so the same architectures and hyper-parameters apply.

Determinism: image i depends only on (seed, i, resolution). Its parameters are row i of
`np.random.default_rng(seed).random((N, NUM_PARAMS))`, for any N > i. That way the device-resident
and the streaming input paths, and runs with different process counts (each process rendering its
own range of indices through `start`), all see the same image i. The row is reached with
`PCG64.advance` instead of drawing and discarding the rows before it, so a huge `start` costs
neither memory nor time: `random()` consumes exactly one 64-bit output per float64, and PCG64 fills
C-order, so row i starts at output i * NUM_PARAMS.

Geometry is in resolution-independent units (the image is [0, 1]^2, pixel centres at
(k + 0.5) / resolution), so a face rendered at 32, 64 and 128 is the same face. Edges are
anti-aliased with a soft coverage from a distance-like function (about one pixel wide at every
resolution), layers are alpha-composited in float32 and rounded to uint8 once at the end.

Everything is pure numpy and vectorised over images; images are rendered in chunks so memory stays
bounded (a few tens of MB) whatever `num_images` is. Each feature is drawn only inside the union of
its bounding boxes over the chunk: pixels outside it would get coverage exactly 0, and compositing
with alpha 0 leaves a pixel bit-identical, so the window (which depends on the chunk) never changes
the result, only the cost.
"""

from __future__ import annotations

import numpy as np

# One uniform [0, 1) number per name, per image, in this order. Appending a name changes every
# image with index > 0 (rows get longer), so the order is part of the dataset's definition.
_PARAM_NAMES = (
    # background: hue, saturation, value; gradient flag; second colour's hue shift and value
    "bg_hue", "bg_sat", "bg_val", "bg_grad", "bg_hue2", "bg_val2",
    # head ellipse: centre jitter, half-width, half-height
    "head_cx", "head_cy", "head_a", "head_b",
    # skin tone along a light -> dark palette, and brightness jitter
    "skin_tone", "skin_jit",
    # hair: palette entry, shade jitter, hairline height, hairline curvature at the sides,
    # side (long) hair flag, its length and width
    "hair_col", "hair_jit", "hair_top", "hair_curve", "hair_side", "hair_len", "hair_wide",
    # eyes: vertical position, spacing, size, aspect, gaze x / y, iris colour, iris size
    "eye_y", "eye_dx", "eye_size", "eye_aspect", "gaze_x", "gaze_y", "iris_col", "iris_size",
    # eyebrows: presence, tilt, gap above the eye, thickness
    "brow_on", "brow_tilt", "brow_gap", "brow_thick",
    # nose: style (blob or line), size, vertical position
    "nose_style", "nose_size", "nose_y",
    # mouth: vertical position, width, smile (corner lift), openness, colour
    "mouth_y", "mouth_w", "mouth_smile", "mouth_open", "mouth_col",
    # ears presence, shirt hue and value, neck width, blush presence
    "ears_on", "shirt_hue", "shirt_val", "neck_w", "blush_on",
)
NUM_PARAMS: int = len(_PARAM_NAMES)

# Plausible skin tones, light to dark (sRGB / 255); a tone is interpolated along this list.
_SKIN = np.array([(255, 226, 200), (241, 196, 163), (226, 174, 137), (200, 138, 98),
                  (165, 106, 72), (125, 80, 52), (92, 60, 40)], np.float64) / 255
# Hair palette: black, dark brown, brown, blond, red, grey, and how often each is picked (roughly
# CelebA's mix: mostly dark, few grey).
_HAIR = np.array([(28, 24, 24), (62, 40, 28), (112, 74, 44), (214, 178, 106), (160, 72, 38),
                  (160, 160, 160)], np.float64) / 255
_HAIR_FREQ = np.array([0.27, 0.25, 0.18, 0.15, 0.07, 0.08])
# Iris colours: dark brown, brown, blue, green, near black.
_IRIS = np.array([(70, 42, 24), (110, 72, 40), (50, 90, 150), (60, 110, 70), (22, 20, 22)],
                 np.float64) / 255
_SCLERA = np.array([0.96, 0.96, 0.93])

# Pixels per chunk: ~1M pixels -> a 12 MB float32 RGB canvas plus a few coverage buffers.
_CHUNK_PIXELS = 1 << 20


def cartoon_faces(num_images: int, resolution: int, seed: int = 0, start: int = 0) -> np.ndarray:
  """uint8 array (num_images, resolution, resolution, 3): images start .. start+num_images-1
  of the dataset for `seed`.

  Raises ValueError unless num_images >= 0, resolution >= 8, start >= 0 and seed >= 0 are ints.
  """
  for name, value, low in (("num_images", num_images, 0), ("resolution", resolution, 8),
                           ("start", start, 0)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"cartoon_faces: {name} must be an int >= {low}, got {value!r}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"cartoon_faces: seed must be an int >= 0, got {seed!r}")
  num_images, resolution, seed, start = int(num_images), int(resolution), int(seed), int(start)

  out = np.empty((num_images, resolution, resolution, 3), np.uint8)
  bitgen = np.random.PCG64(seed)  # the bit generator of np.random.default_rng(seed)
  bitgen.advance(start * NUM_PARAMS)  # skip rows 0 .. start-1 without drawing them
  rng = np.random.Generator(bitgen)
  chunk = max(1, _CHUNK_PIXELS // (resolution * resolution))
  for lo in range(0, num_images, chunk):
    hi = min(num_images, lo + chunk)
    params = rng.random((hi - lo, NUM_PARAMS))  # rows start+lo .. start+hi-1, in order
    out[lo:hi] = _render(params, resolution)
  return out


# --------------------------------------------------------------------------------------------
# Parameters


def _lerp(lo, hi, t):
  return lo + (hi - lo) * t


def _hsv(h, s, v):
  """Vectorised HSV -> RGB, (n,) each -> (n, 3), all in [0, 1]."""
  k = (np.array([5.0, 3.0, 1.0]) + (h[:, None] % 1.0) * 6) % 6
  return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def _palette(table, t):
  """Piecewise-linear interpolation along the rows of `table` at t in [0, 1]: (n,) -> (n, 3)."""
  x = t * (len(table) - 1)
  i = np.minimum(x.astype(np.int64), len(table) - 2)
  f = (x - i)[:, None]
  return table[i] * (1 - f) + table[i + 1] * f


def _pick(table, t, freq=None):
  """Row of `table` for t in [0, 1): equally likely rows, or with probabilities `freq`."""
  if freq is None:
    return table[np.minimum((t * len(table)).astype(np.int64), len(table) - 1)]
  return table[np.minimum(np.searchsorted(np.cumsum(freq), t, side="right"), len(table) - 1)]


def _face_params(params: np.ndarray) -> dict:
  """Uniform draws (n, NUM_PARAMS) -> face geometry (image units) and colours, float64."""
  p = dict(zip(_PARAM_NAMES, params.T))
  f = {}
  # Background: a muted random colour, half of the time a vertical gradient to a second one.
  f["bg1"] = _hsv(p["bg_hue"], _lerp(0.12, 0.55, p["bg_sat"]), _lerp(0.45, 0.95, p["bg_val"]))
  f["bg2"] = _hsv(p["bg_hue"] + _lerp(-0.2, 0.2, p["bg_hue2"]), _lerp(0.12, 0.55, p["bg_sat"]),
                  _lerp(0.3, 0.95, p["bg_val2"]))
  f["bg_grad"] = (p["bg_grad"] < 0.5).astype(np.float64)

  # Head: centred with a little jitter; the head spans 2b = 0.56 .. 0.70 of the image height,
  # plus hair on top and neck below, like an aligned CelebA crop.
  f["cx"] = _lerp(0.47, 0.53, p["head_cx"])
  cy = f["cy"] = _lerp(0.50, 0.56, p["head_cy"])
  a = f["a"] = _lerp(0.21, 0.27, p["head_a"])
  b = f["b"] = _lerp(0.28, 0.35, p["head_b"])
  skin = _palette(_SKIN, p["skin_tone"]) * _lerp(0.92, 1.06, p["skin_jit"])[:, None]
  f["skin"] = np.clip(skin, 0, 1)
  f["skin_dark"] = f["skin"] * np.array([0.80, 0.72, 0.70])

  # Hair: palette colour with a shade jitter; the cap is the part of a slightly larger ellipse
  # above a hairline that curves down towards the temples.
  hair = _pick(_HAIR, p["hair_col"], _HAIR_FREQ) * _lerp(0.8, 1.2, p["hair_jit"])[:, None]
  f["hair"] = np.clip(hair, 0, 1)
  f["hair_top"] = cy - b * _lerp(0.38, 0.75, p["hair_top"])  # hairline at the centre
  f["hair_curve"] = b * _lerp(0.1, 0.8, p["hair_curve"])     # drop at the head's sides
  f["side"] = p["hair_side"] < 0.5                          # long hair behind the head
  f["side_len"] = cy + b * _lerp(0.2, 1.3, p["hair_len"])   # where it ends (image units)
  f["side_a"] = a * _lerp(1.15, 1.4, p["hair_wide"])

  # Eyes: sclera ellipse + iris/pupil disc clipped to it, offset by the gaze.
  f["ey"] = cy - b * _lerp(0.0, 0.22, p["eye_y"])
  f["edx"] = a * _lerp(0.36, 0.50, p["eye_dx"])
  ew = f["ew"] = a * _lerp(0.14, 0.21, p["eye_size"])
  eh = f["eh"] = ew * _lerp(0.55, 0.9, p["eye_aspect"])
  pr = f["pr"] = eh * _lerp(0.6, 0.95, p["iris_size"])
  f["gx"] = (ew - pr) * _lerp(-0.8, 0.8, p["gaze_x"])
  f["gy"] = (eh - pr) * _lerp(-0.6, 0.6, p["gaze_y"])
  f["iris"] = _pick(_IRIS, p["iris_col"])

  # Eyebrows (3 faces in 4), mirrored tilt, in a darker shade of the hair.
  f["brow"] = p["brow_on"] < 0.75
  f["brow_y"] = f["ey"] - eh - _lerp(0.012, 0.035, p["brow_gap"])
  f["brow_a"] = ew * 1.2
  f["brow_b"] = _lerp(0.009, 0.02, p["brow_thick"])
  f["brow_tilt"] = _lerp(-0.35, 0.35, p["brow_tilt"])
  f["brow_col"] = f["hair"] * 0.6

  # Nose: a shaded blob, or (2 in 5) a thin vertical line.
  line = p["nose_style"] >= 0.6
  size = _lerp(0.8, 1.25, p["nose_size"])
  f["nose_a"] = np.where(line, 0.011, a * 0.12) * size
  f["nose_b"] = np.where(line, b * 0.12, b * 0.06) * size
  f["nose_y"] = f["ey"] + b * np.where(line, 0.24, 0.34) * _lerp(0.9, 1.1, p["nose_y"])
  f["nose_alpha"] = np.where(line, 0.9, 0.7)

  # Mouth: the band between two curves following y = my - smile * x^2 (x in [-1, 1] across the
  # mouth), a thin line when closed and a lens or open grin (dark inside) when open.
  f["my"] = cy + b * _lerp(0.52, 0.66, p["mouth_y"])
  f["mw"] = a * _lerp(0.28, 0.48, p["mouth_w"])
  f["smile"] = _lerp(-0.012, 0.05, p["mouth_smile"])
  f["m_up"] = 0.006 + _lerp(0.0, 0.012, p["mouth_open"])
  f["m_lo"] = 0.006 + _lerp(0.0, 0.05, p["mouth_open"] ** 2)
  lips = _hsv(_lerp(0.95, 1.01, p["mouth_col"]), _lerp(0.35, 0.65, p["mouth_col"]),
              _lerp(0.45, 0.75, p["mouth_col"]))
  inside = np.array([0.28, 0.08, 0.1])
  t_open = np.clip((p["mouth_open"] - 0.5) * 2.5, 0, 1)[:, None]
  f["mouth_col"] = lips * (1 - t_open) + inside * t_open

  f["ears"] = p["ears_on"] < 0.7
  f["shirt"] = _hsv(p["shirt_hue"], np.full_like(p["shirt_hue"], 0.45),
                   _lerp(0.25, 0.8, p["shirt_val"]))
  f["neck_w"] = a * _lerp(0.38, 0.5, p["neck_w"])
  f["blush"] = p["blush_on"] < 0.3
  return f


# --------------------------------------------------------------------------------------------
# Rasterisation


class _Canvas:
  """A float32 RGB canvas for a chunk of n images, with windowed coverage and compositing."""

  def __init__(self, n: int, resolution: int):
    self.n, self.res = n, resolution
    # Channel-first, so compositing runs over long contiguous rows (a trailing axis of 3 makes
    # numpy's inner loops 3 elements long, several times slower).
    self.img = np.empty((3, n, resolution, resolution), np.float32)
    self.coord = (np.arange(resolution) + 0.5) / resolution  # pixel centres, image units

  def window(self, lo, hi, pad):
    """Rows (or columns) covering [lo, hi] (image units, per image) plus `pad` pixels: a slice."""
    first = int(np.floor(np.min(lo) * self.res - pad))
    last = int(np.ceil(np.max(hi) * self.res + pad))
    return slice(max(first, 0), min(last, self.res))

  def axis(self, sl, centre, scale):
    """(coord - centre) / scale over a window's coordinates: (n, len) float32."""
    return ((self.coord[sl][None, :] - centre[:, None]) / scale[:, None]).astype(np.float32)

  def ellipse_box(self, cx, cy, a, b, shear=None):
    # Coverage is > 0 up to r < 1 + 0.5 / (min(a, b) * res): up to 0.5 * max/min pixels outside.
    # A shear moves the ends up or down by shear * a.
    bb = b if shear is None else b + np.abs(shear) * a
    pad = 0.5 * float(np.max(np.maximum(a, bb) / np.minimum(a, b))) + 2
    return self.window(cy - bb, cy + bb, pad), self.window(cx - a, cx + a, pad)

  def ellipse(self, ys, xs, cx, cy, a, b, shear=None):
    """Soft coverage (n, h, w) of ellipses; `shear` tilts them (y -= shear * (x - cx))."""
    dx = self.axis(xs, cx, a)
    dy = self.axis(ys, cy, b)
    if shear is None:
      r = dy[:, :, None] ** 2 + (dx ** 2)[:, None, :]
    else:
      r = dy[:, :, None] - (dx * (shear * a / b)[:, None].astype(np.float32))[:, None, :]
      r *= r
      r += (dx ** 2)[:, None, :]
    np.sqrt(r, out=r)
    # (1 - r) * min(a, b) approximates the distance to the edge in image units; * res -> pixels.
    np.subtract(1, r, out=r)
    r *= (np.minimum(a, b) * self.res).astype(np.float32)[:, None, None]
    r += 0.5
    return np.clip(r, 0, 1, out=r)

  def edge(self, dist):
    """Coverage from a signed distance (image units, > 0 inside), in place."""
    dist *= self.res
    dist += 0.5
    return np.clip(dist, 0, 1, out=dist)

  def paint(self, ys, xs, cov, colour, mask=None):
    """Composite `colour` (n, 3) over the window with coverage `cov` (n, h, w); `mask` (n,) bool
    leaves the images where it is False untouched."""
    if mask is not None:
      cov *= mask.astype(np.float32)[:, None, None]
    colour = colour.astype(np.float32)
    tmp = np.empty_like(cov)
    for ch in range(3):
      sub = self.img[ch, :, ys, xs]  # a view: the update below writes into the canvas
      np.subtract(colour[:, ch, None, None], sub, out=tmp)
      tmp *= cov
      sub += tmp

  def draw_ellipse(self, cx, cy, a, b, colour, mask=None, alpha=None, shear=None):
    ys, xs = self.ellipse_box(cx, cy, a, b, shear)
    if ys.stop <= ys.start or xs.stop <= xs.start:
      return
    cov = self.ellipse(ys, xs, cx, cy, a, b, shear)
    if alpha is not None:
      cov *= np.asarray(alpha, np.float32)[:, None, None] if np.ndim(alpha) else np.float32(alpha)
    self.paint(ys, xs, cov, colour, mask)


def _render(params: np.ndarray, res: int) -> np.ndarray:
  """Uniform draws (n, NUM_PARAMS) -> uint8 faces (n, res, res, 3)."""
  f = _face_params(params)
  n = params.shape[0]
  c = _Canvas(n, res)
  cx, cy, a, b = f["cx"], f["cy"], f["a"], f["b"]

  # Background: per-row colour, broadcast along the rows (no per-pixel arithmetic).
  t = c.coord[None, :, None] * f["bg_grad"][:, None, None]  # (n, res, 1)
  rows = f["bg1"][:, None, :] + (f["bg2"] - f["bg1"])[:, None, :] * t
  c.img[:] = rows.astype(np.float32).transpose(2, 0, 1)[:, :, :, None]

  # Long hair behind the head: an ellipse wider than the head, cut off at `side_len`.
  sa, sb, scy = f["side_a"], b * 1.12, cy - b * 0.02
  ys, xs = c.ellipse_box(cx, scy, sa, sb)
  ys = slice(ys.start, min(ys.stop, c.window(cy, f["side_len"], 2).stop))
  cov = c.ellipse(ys, xs, cx, scy, sa, sb)
  cut = c.edge((f["side_len"][:, None] - c.coord[ys][None, :]).astype(np.float32))  # (n, h)
  cov *= cut[:, :, None]
  c.paint(ys, xs, cov, f["hair"], f["side"])

  # Neck: a vertical band from the head's centre down to the image bottom (the shirt covers it).
  # Its top edge is explicit so that the coverage never depends on the chunk's window.
  ys, xs = c.window(cy, np.ones(n), 2), c.window(cx - f["neck_w"], cx + f["neck_w"], 2)
  band = c.edge((f["neck_w"][:, None] - np.abs(c.coord[xs][None, :] - cx[:, None]))
                .astype(np.float32))  # (n, w)
  top = c.edge((c.coord[ys][None, :] - cy[:, None]).astype(np.float32))  # (n, h)
  c.paint(ys, xs, top[:, :, None] * band[:, None, :], f["skin_dark"] * 0.5 + f["skin"] * 0.5)

  # Shirt: a wide ellipse rising from below the image; its top sits just under the chin.
  sh_cy, sh_b = cy + b + 0.22, np.full(n, 0.2)
  c.draw_ellipse(cx, sh_cy, a * 2.0, sh_b, f["shirt"])

  # Ears (peeking out at eye level), then the head.
  for side in (-1, 1):
    c.draw_ellipse(cx + side * a * 0.97, f["ey"] + b * 0.08, a * 0.14, b * 0.17,
                   f["skin_dark"] * 0.4 + f["skin"] * 0.6, f["ears"])
  c.draw_ellipse(cx, cy, a, b, f["skin"])

  # Blush on the cheeks (3 faces in 10): translucent.
  for side in (-1, 1):
    c.draw_ellipse(cx + side * f["edx"] * 1.1, f["ey"] + b * 0.3, a * 0.16, b * 0.09,
                   np.array([[0.93, 0.45, 0.45]]).repeat(n, 0), f["blush"], alpha=0.35)

  # Hair cap: inside a slightly larger ellipse than the head and above a hairline
  # y = hair_top + hair_curve * ((x - cx) / a)^2 that curves down towards the temples.
  ha, hb, hcy = a * 1.1, b * 1.08, cy - b * 0.04
  ys, xs = c.ellipse_box(cx, hcy, ha, hb)
  # The hairline's lowest point where the ellipse's coverage can be > 0 (its soft edge included).
  reach = (ha + 0.5 * ha / (np.minimum(ha, hb) * res)) / a
  low = f["hair_top"] + f["hair_curve"] * reach ** 2
  ys = slice(ys.start, min(ys.stop, c.window(low, low, 2).stop))
  cov = c.ellipse(ys, xs, cx, hcy, ha, hb)
  hx = c.axis(xs, cx, a)  # (n, w)
  line = (f["hair_top"][:, None] + f["hair_curve"][:, None] * hx.astype(np.float64) ** 2)
  below = line[:, None, :] - c.coord[ys][None, :, None]  # > 0 above the hairline
  np.minimum(cov, c.edge(below.astype(np.float32)), out=cov)
  c.paint(ys, xs, cov, f["hair"])

  # Eyes: sclera, then the iris clipped to it, then a pupil and a small highlight.
  for side in (-1, 1):
    ex = cx + side * f["edx"]
    ys, xs = c.ellipse_box(ex, f["ey"], f["ew"], f["eh"])
    sclera = c.ellipse(ys, xs, ex, f["ey"], f["ew"], f["eh"])
    c.paint(ys, xs, sclera, np.broadcast_to(_SCLERA, (n, 3)))
    px, py = ex + f["gx"], f["ey"] + f["gy"]
    iris = c.ellipse(ys, xs, px, py, f["pr"], f["pr"])
    iris *= sclera
    c.paint(ys, xs, iris, f["iris"])
    pupil = c.ellipse(ys, xs, px, py, f["pr"] * 0.5, f["pr"] * 0.5)
    pupil *= sclera
    c.paint(ys, xs, pupil, np.zeros((n, 3)) + 0.05)
    hl = c.ellipse(ys, xs, px + f["pr"] * 0.35, py - f["pr"] * 0.35, f["pr"] * 0.25,
                   f["pr"] * 0.25)
    hl *= sclera
    c.paint(ys, xs, hl, np.ones((n, 3)))

    # Eyebrow above it, tilted symmetrically (side * tilt).
    c.draw_ellipse(ex, f["brow_y"], f["brow_a"], f["brow_b"], f["brow_col"], f["brow"],
                   shear=side * f["brow_tilt"])

  # Nose.
  c.draw_ellipse(cx, f["nose_y"], f["nose_a"], f["nose_b"], f["skin_dark"],
                 alpha=f["nose_alpha"])

  # Mouth: between upper U(x) = centre(x) - m_up (1 - x^2) and lower L(x) = centre(x) + m_lo
  # (1 - x^2), with centre(x) = my - smile x^2, for |x| < 1 (x = (u - cx) / mw).
  mx, my, mw = cx, f["my"], f["mw"]
  # Both curves are linear in x^2, so their extremes are at x = 0 or |x| = 1.
  ys = c.window(my - np.maximum(f["m_up"], f["smile"]), my + np.maximum(f["m_lo"], -f["smile"]), 2)
  xs = c.window(mx - mw, mx + mw, 2)
  x = c.axis(xs, mx, mw).astype(np.float64)  # (n, w)
  x2 = np.minimum(x ** 2, 1.0)
  centre = my[:, None] - f["smile"][:, None] * x2
  upper = (centre - f["m_up"][:, None] * (1 - x2)).astype(np.float32)
  lower = (centre + f["m_lo"][:, None] * (1 - x2)).astype(np.float32)
  v = c.coord[ys].astype(np.float32)[None, :, None]
  cov = c.edge(v - upper[:, None, :])
  cov *= c.edge(lower[:, None, :] - v)
  ends = c.edge((mw[:, None] - np.abs(x * mw[:, None])).astype(np.float32))  # (n, w)
  cov *= ends[:, None, :]
  c.paint(ys, xs, cov, f["mouth_col"])

  img = c.img
  img *= 255
  img += 0.5
  np.clip(img, 0, 255, out=img)
  return img.astype(np.uint8).transpose(1, 2, 3, 0)
