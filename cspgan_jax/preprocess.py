"""The seed's image transform, done once at preparation time with PIL (SPEC.md, "Data").

The seed uses the PyTorch DCGAN recipe on PIL images:
  Resize(R) -> CenterCrop(R) -> ToTensor() -> Normalize((0.5,) * 3, (0.5,) * 3).
torchvision's Resize on a PIL image *is* PIL's bilinear resize (antialiased: PIL widens the
filter support when it shrinks), so calling PIL with torchvision's size and crop arithmetic
reproduces the seed's uint8 pixels exactly. Only the last two steps (to float, to [-1, 1]) are
left for the device: `to_unit_range` in input_pipeline.py.

This module imports only numpy and PIL: `prepare-data` runs it in worker processes.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np
from PIL import Image

# torchvision's datasets.folder.IMG_EXTENSIONS: what an ImageFolder of the seed would read.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def resized_size(width: int, height: int, size: int) -> Tuple[int, int]:
  """torchvision's Resize(int): the short side becomes `size`, the long side is truncated."""
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_box(width: int, height: int, size: int) -> Tuple[int, int, int, int]:
  """torchvision's CenterCrop offsets (Python's round, as torchvision uses it)."""
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return left, top, left + size, top + size


def resize_and_crop(image: Image.Image, resolution: int) -> np.ndarray:
  """The seed's Resize(R) + CenterCrop(R) on a PIL image: uint8 (R, R, 3)."""
  image = image.convert("RGB")  # torchvision's pil_loader does the same (grey, RGBA, CMYK, P)
  size = resized_size(*image.size, resolution)
  if size != image.size:
    image = image.resize(size, Image.BILINEAR)
  image = image.crop(center_crop_box(*image.size, resolution))
  return np.asarray(image, dtype=np.uint8)


def resize_and_crop_array(array: np.ndarray, resolution: int) -> np.ndarray:
  """`resize_and_crop` for a decoded uint8 (H, W, 3) array (e.g. an official TFDS example)."""
  if array.shape[:2] == (resolution, resolution):
    return np.asarray(array, dtype=np.uint8)
  return resize_and_crop(Image.fromarray(np.asarray(array, dtype=np.uint8)), resolution)


def load_image(path: str, resolution: int) -> Tuple[Optional[bytes], Optional[str]]:
  """Decodes and transforms one file: (raw R*R*3 bytes, None), or (None, why it was skipped).

  `Image.load()` forces the full decode, so truncated files fail here rather than yielding a
  half-grey image (PIL's LOAD_TRUNCATED_IMAGES stays False).
  """
  try:
    with Image.open(path) as image:
      image.load()
      return resize_and_crop(image, resolution).tobytes(), None
  except Exception as e:  # pylint: disable=broad-except  # any undecodable file is skipped, and listed
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return None, f"{type(e).__name__}: {reason}"


def load_images(paths, resolution: int):
  """Worker-process entry point: `load_image` over a chunk of paths."""
  return [load_image(p, resolution) for p in paths]


def is_image_file(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
