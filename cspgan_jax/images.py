"""Image grids with torchvision's `make_grid(..., padding=2, normalize=True)` semantics, and PNGs."""

from __future__ import annotations

import math
import os

import numpy as np


def make_grid(images: np.ndarray, nrow: int = 8, padding: int = 2, normalize: bool = True,
              pad_value: float = 0.0) -> np.ndarray:
  """(N, H, W, C) -> (rows * (H + p) + p, cols * (W + p) + p, C) float32; one image: (H, W, C).

  normalize: min-max over the whole batch to [0, 1] (torchvision: clamp, then
  (x - min) / max(max - min, 1e-5)), before padding, so the padding stays `pad_value`.
  """
  x = np.asarray(images, np.float32)
  if x.ndim != 4:
    raise ValueError(f"expected (N, H, W, C) images, got shape {x.shape}")
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  if normalize:
    lo, hi = float(x.min()), float(x.max())
    x = (np.clip(x, lo, hi) - lo) / max(hi - lo, 1e-5)
  if len(x) == 1:  # torchvision returns a single image as it is, without the border
    return x[0]
  n, h, w, c = x.shape
  cols = min(nrow, n)
  rows = int(math.ceil(n / cols))
  hp, wp = h + padding, w + padding
  grid = np.full((rows * hp + padding, cols * wp + padding, c), pad_value, np.float32)
  for i in range(n):
    r, k = divmod(i, cols)
    grid[r * hp + padding:r * hp + padding + h, k * wp + padding:k * wp + padding + w] = x[i]
  return grid


def tile_spread(images: np.ndarray) -> float:
  """How much (N, H, W, C) samples differ from one another: the per-pixel standard deviation
  across them, averaged over pixels, over the standard deviation of all their pixels. About 1
  for independent noise, 0.88 for 64 synthetic training faces, 0 for copies of one image (a
  generator collapsed to one output; docs/PARITY.md, "The quickstart's 300 steps")."""
  x = np.asarray(images, np.float64)
  overall = x.std()
  return float(x.std(axis=0).mean() / overall) if overall > 0 else 0.0


def to_uint8(grid: np.ndarray) -> np.ndarray:
  """torchvision.save_image's conversion: x * 255 + 0.5, clamped, truncated."""
  return np.clip(grid * 255 + 0.5, 0, 255).astype(np.uint8)


def save_png(grid: np.ndarray, path: str) -> None:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(to_uint8(grid)).save(path)
