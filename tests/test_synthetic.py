"""The embedded cartoon-face dataset: shapes, determinism per image index, variety, layout.

Thresholds come from measured values (seed 0, 32x32, noted next to each) with a wide margin.
"""

import numpy as np
import pytest

from cspgan_jax import synthetic
from cspgan_jax.synthetic import NUM_PARAMS, cartoon_faces


@pytest.fixture(scope="module")
def faces32():
  return cartoon_faces(200, 32, seed=0)


def _mad(a, b, axis=(-3, -2, -1)):
  """Mean absolute difference in uint8 units."""
  return np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(axis=axis)


@pytest.mark.parametrize("n,res", [(0, 32), (1, 8), (3, 37), (5, 64)])
def test_shape_and_dtype(n, res):
  x = cartoon_faces(n, res, seed=3)
  assert x.shape == (n, res, res, 3)
  assert x.dtype == np.uint8


def test_deterministic():
  a = cartoon_faces(12, 48, seed=9, start=5)
  b = cartoon_faces(12, 48, seed=9, start=5)
  assert a.tobytes() == b.tobytes()


def test_image_depends_only_on_index():
  full = cartoon_faces(20, 32, seed=1)
  np.testing.assert_array_equal(cartoon_faces(4, 32, seed=1, start=10), full[10:14])
  np.testing.assert_array_equal(cartoon_faces(1, 32, seed=1, start=19)[0], full[19])
  np.testing.assert_array_equal(cartoon_faces(7, 32, seed=1), full[:7])


def test_params_are_rows_of_the_big_draw():
  # The documented contract: image i uses row i of default_rng(seed).random((N, NUM_PARAMS)).
  rows = np.random.default_rng(5).random((30, NUM_PARAMS))
  np.testing.assert_array_equal(cartoon_faces(5, 32, seed=5, start=25),
                                synthetic._render(rows[25:30], 32))


def test_chunking_does_not_change_images(monkeypatch):
  # Features are drawn in per-chunk windows; the window must never change a pixel.
  ref = cartoon_faces(40, 32, seed=2)
  monkeypatch.setattr(synthetic, "_CHUNK_PIXELS", 3 * 32 * 32)  # chunks of 3 images
  np.testing.assert_array_equal(cartoon_faces(40, 32, seed=2), ref)
  np.testing.assert_array_equal(cartoon_faces(5, 32, seed=2, start=7), ref[7:12])


def test_huge_start_is_cheap_and_consistent():
  start = 10 ** 12  # a materialised draw up to here would need ~350 TB
  a = cartoon_faces(3, 16, seed=4, start=start)
  np.testing.assert_array_equal(cartoon_faces(2, 16, seed=4, start=start + 1), a[1:])
  assert _mad(a[0], cartoon_faces(1, 16, seed=4)[0]) > 5


def test_different_seeds_differ(faces32):
  other = cartoon_faces(200, 32, seed=1)
  d = _mad(faces32, other)  # measured min 25.5
  assert d.min() > 8, d.min()


def test_images_differ_from_each_other(faces32):
  x = faces32[:100].astype(np.float32)
  d = np.abs(x[:, None] - x[None]).mean(axis=(2, 3, 4))
  d[np.arange(len(x)), np.arange(len(x))] = np.inf
  assert d.min() > 5, d.min()  # measured min over 200 images 12.6
  assert np.median(d[np.isfinite(d)]) > 25  # measured 51


def test_images_are_not_trivial(faces32):
  std = faces32.astype(np.float32).std(axis=(1, 2, 3))
  assert std.min() > 10, std.min()  # measured 24
  rgb = faces32.reshape(len(faces32), -1, 3).astype(np.int64)
  codes = rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]
  colours = [len(np.unique(c)) for c in codes]
  assert min(colours) > 20, min(colours)  # measured 131 (anti-aliased edges add many)


def test_faces_are_skin_toned_in_rgb_order(faces32):
  """Channels in RGB order, as PIL and the PNG grids read them: every skin tone of the palette
  has more red than blue (swapped, the faces would come out blue)."""
  centre = faces32.astype(np.float32)[:, 12:20, 12:20].mean(axis=(1, 2))
  assert np.mean(centre[:, 0] > centre[:, 2] + 20) > 0.9  # measured 1.0 (means 171 / 103)


def test_face_is_centred(faces32):
  x = faces32.astype(np.float32)
  centre = x[:, 12:20, 12:20].mean(axis=(1, 2))
  corners = np.concatenate([x[:, :4, :4], x[:, :4, -4:]], axis=1).mean(axis=(1, 2))
  contrast = np.abs(centre - corners).sum(-1)
  assert np.mean(contrast > 30) > 0.9, np.mean(contrast > 30)  # measured 0.985
  # A centred face is close to its mirror image, much closer than to a shifted copy.
  flip = _mad(x, x[:, :, ::-1])
  shift = _mad(x, np.roll(x, 8, axis=2))
  assert np.mean(flip < shift) > 0.9
  assert np.median(flip) < 0.5 * np.median(shift)  # measured 5.6 vs 28.9


def test_same_face_at_every_resolution():
  small = cartoon_faces(32, 32, seed=0)
  big = cartoon_faces(32, 64, seed=0).astype(np.float32)
  pooled = big.reshape(32, 32, 2, 32, 2, 3).mean(axis=(2, 4))
  same = _mad(small, pooled)  # measured max 1.3
  other = _mad(small, np.roll(pooled, 1, axis=0))  # a different face: measured min 24
  assert same.max() < 4, same.max()
  assert other.min() > 8, other.min()
  huge = cartoon_faces(4, 128, seed=0).astype(np.float32)
  pooled4 = huge.reshape(4, 32, 4, 32, 4, 3).mean(axis=(2, 4))
  assert _mad(small[:4], pooled4).max() < 4  # measured 1.5


@pytest.mark.parametrize("kwargs", [
    dict(num_images=-1, resolution=32),
    dict(num_images=2.0, resolution=32),
    dict(num_images=2, resolution=7),
    dict(num_images=2, resolution=32.0),
    dict(num_images=2, resolution=True),
    dict(num_images=2, resolution=32, start=-1),
    dict(num_images=2, resolution=32, seed=-3),
])
def test_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    cartoon_faces(**kwargs)
