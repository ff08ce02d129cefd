"""Random-access image sources for training: synthetic faces, prepared folders, TFDS's catalogue.

Every source answers `len(source)` and `source.get(indices) -> uint8 (n, R, R, 3)`, already
through the seed's Resize + CenterCrop: input_pipeline.py decides whether those bytes go to the
accelerator once (device-resident) or batch by batch (streaming), and both read the same indices.

`config.data.source`:
- "synthetic": procedurally drawn cartoon faces (synthetic.py), the embedded default;
- "tfds": `tfds.data_source(name, data_dir)`. A dataset written by `cspgan prepare-data` is read
  from its files, without TensorFlow. A TFDS catalogue name (e.g. the official `celeb_a`) is built
  by its own builder first, which needs TensorFlow and a working download or manual files.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
from typing import Optional, Sequence

import numpy as np

from cspgan_jax import preprocess, prepare_data
from cspgan_jax.errors import DataError, first_line

SOURCES = ("synthetic", "tfds")
DEFAULT_SYNTHETIC_SIZE = 10_000


class ArraySource:
  """An in-memory uint8 array (N, R, R, 3)."""

  def __init__(self, images: np.ndarray, description: str):
    self.images = images
    self.description = description

  def __len__(self) -> int:
    return len(self.images)

  def get(self, indices: Sequence[int]) -> np.ndarray:
    return self.images[np.asarray(indices)]


class TfdsSource:
  """A TFDS random-access data source; images not already R x R go through the seed's transform."""

  def __init__(self, source, resolution: int, description: str, limit: int = 0):
    self._source = source
    self._resolution = resolution
    self._len = min(len(source), limit) if limit else len(source)
    self.description = description
    self._pool = None

  def __len__(self) -> int:
    return self._len

  def get(self, indices: Sequence[int]) -> np.ndarray:
    indices = [int(i) for i in indices]
    if indices and (min(indices) < 0 or max(indices) >= self._len):
      raise IndexError(f"index out of range for {self.description} ({self._len} images)")
    try:
      images = [e["image"] for e in self._source.__getitems__(indices)]
    except (RuntimeError, OSError, ValueError, KeyError) as e:
      # array_record on a truncated or overwritten shard: "Corrupted Riegeli/records file ...".
      raise DataError(f"cannot read {self.description}: {type(e).__name__}: {first_line(e)}; "
                      "its files are damaged: prepare it again (`cspgan prepare-data ... "
                      "--overwrite`)") from e
    r = self._resolution
    if all(im.shape == (r, r, 3) for im in images):
      return np.stack(images).astype(np.uint8, copy=False)
    # A catalogue dataset of full-size images: PIL releases the GIL while resizing, so threads help.
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1)
    return np.stack(list(self._pool.map(
        lambda im: preprocess.resize_and_crop_array(_rgb(im), r), images)))


def _rgb(image: np.ndarray) -> np.ndarray:
  if image.ndim == 2 or image.shape[-1] == 1:
    return np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=-1)
  return image[..., :3]


def synthetic_source(data_config, resolution: int) -> ArraySource:
  from cspgan_jax import synthetic  # pylint: disable=import-outside-toplevel
  n = data_config.num_examples or DEFAULT_SYNTHETIC_SIZE
  images = synthetic.cartoon_faces(n, resolution, seed=data_config.synthetic_seed)
  return ArraySource(images, f"synthetic cartoon faces (seed {data_config.synthetic_seed}, {n})")


def default_data_dir() -> str:
  """TFDS's own default (`~/tensorflow_datasets`, or $TFDS_DATA_DIR)."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def _is_catalogue_name(name: str) -> bool:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    tfds.builder_cls(name)
    return True
  except Exception:  # pylint: disable=broad-except  # DatasetNotFoundError and kin
    return False


def prepared_dataset_path(data_dir: str, name: str) -> str:
  """`data_dir/name/1.0.0` after checking it is complete; one-line errors otherwise."""
  path = prepare_data.dataset_path(data_dir, name)
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise DataError(f"data_dir is not a folder: {data_dir}; set --config.data.data_dir (or "
                    "TFDS_DATA_DIR) to the folder `cspgan prepare-data --out` wrote into")
  if not os.path.isdir(data_dir):
    raise DataError(f"data_dir not found: {data_dir}; prepare CelebA into it with `cspgan "
                    f"prepare-data --input IMAGES --out {data_dir}`, or train on synthetic faces "
                    "(--config.data.source=synthetic)")
  if not os.path.isdir(path):
    aside = prepare_data.set_aside(data_dir, name)
    if len(aside) > 1 and not os.path.lexists(path):  # which to keep is the user's call
      raise DataError(f"{path} is missing: interrupted `cspgan prepare-data --overwrite` runs "
                      f"left what it held in {' and '.join(aside)}; move the one to keep to "
                      f"{path}")
    if aside and not os.path.lexists(path):  # said before the build folder it leaves beside it
      raise DataError(f"{path} is missing: an interrupted `cspgan prepare-data --overwrite` left "
                      f"what it held in {aside[0]}; move it back to {path}, or run "
                      f"`cspgan prepare-data --name {name} --out {data_dir} --input ...`, which "
                      "puts it back first")
    if prepare_data.incomplete_paths(data_dir, name):
      raise DataError(f"the preparation of {name!r} in {data_dir} was interrupted; "
                      f"run `cspgan prepare-data --name {name} --out {data_dir} --input ...` again")
    found = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d))
                   and d != "downloads")
    raise DataError(f"no prepared dataset {name!r} in {data_dir} (found: {', '.join(found) or 'none'}); "
                    f"run `cspgan prepare-data --input IMAGES --out {data_dir} --name {name}`")
  problem = prepare_data.prepared_problem(path)
  if problem:
    raise DataError(f"{problem}; run `cspgan prepare-data` again to rebuild it")
  return path


def tfds_source(data_config, resolution: int, split: str) -> TfdsSource:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  name = data_config.name
  # "~" too: the shell does not expand it inside --config.data.data_dir=~/...
  data_dir = os.path.expanduser(data_config.data_dir or default_data_dir())
  if not _is_catalogue_name(name):
    path = prepared_dataset_path(data_dir, name)
    try:
      builder = tfds.builder_from_directory(path)
    except Exception as e:  # pylint: disable=broad-except  # a damaged features.json and kin
      raise DataError(f"{path} cannot be read as a TFDS dataset ({type(e).__name__}: "
                      f"{first_line(e)}): prepare it again (`cspgan prepare-data ... "
                      "--overwrite`)") from e
  else:
    # The official route (e.g. celeb_a): TFDS's builder downloads (Google Drive, often over quota)
    # and needs TensorFlow to build. Say so before a download is attempted.
    if importlib.util.find_spec("tensorflow") is None:
      raise DataError(f"TFDS's catalogue dataset {name!r} needs TensorFlow to build (pip install "
                      "tensorflow) and a working download; or prepare the image folder with "
                      f"`cspgan prepare-data --input IMAGES --out {data_dir}` and use its name")
    try:
      builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
      builder.download_and_prepare()
    except (ImportError, ModuleNotFoundError) as e:
      raise DataError(f"TFDS's {name!r} builder needs TensorFlow ({e}); prepare the image folder "
                      "with `cspgan prepare-data` instead") from e
    except Exception as e:  # pylint: disable=broad-except  # download quota, missing files, ...
      raise DataError(f"TFDS could not prepare {name!r}: {type(e).__name__}: "
                      f"{first_line(e)}") from e
  try:
    # TFDS's split syntax: a name, "all", sums ("train+validation") and slices ("train[:10%]").
    source = builder.as_data_source(split=split)
  except ValueError as e:
    reason = first_line(e)
    unknown = re.match(r"Unknown split ('[^']*')", reason)  # a name, or one part of a sum
    if unknown:
      reason = f"has no split {unknown.group(1)}"
    raise DataError(f"dataset {name!r} {reason} (it has: {', '.join(builder.info.splits.keys())}; "
                    "'all' reads every one)") from e
  if "image" not in builder.info.features:
    raise DataError(f"dataset {name!r} has no 'image' feature")
  shape = tuple(builder.info.features["image"].shape)
  if len(shape) == 3 and shape[0] is not None and shape[0] == shape[1] != resolution:
    # Already square: it was prepared for another resolution. Resizing it again would not give
    # the seed's transform of the original images.
    raise DataError(f"{name!r} in {data_dir} holds {shape[0]}x{shape[1]} images, the model needs "
                    f"{resolution}x{resolution}: prepare it with --resolution {resolution} "
                    "(under another --name) or set model.resolution")
  return TfdsSource(source, resolution, f"{name}/{split} from {data_dir}",
                    limit=data_config.num_examples)


def load_source(data_config, resolution: int, split: Optional[str] = None):
  """The source named by `config.data` (split: `config.data.split` unless given)."""
  split = split or data_config.get("split", "all")
  if data_config.source == "synthetic":
    return synthetic_source(data_config, resolution)
  if data_config.source == "tfds":
    return tfds_source(data_config, resolution, split)
  raise DataError(f"data.source must be one of {SOURCES}, got {data_config.source!r}")


def read_all(source, indices: np.ndarray, chunk: int = 1024, desc: str = "") -> np.ndarray:
  """source.get over many indices, in chunks, with a progress bar for large reads."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  indices = np.asarray(indices)
  parts = [source.get(indices[i:i + chunk]) for i in tqdm(
      range(0, len(indices), chunk), desc=desc or "read", unit=" chunks",
      disable=len(indices) <= 16 * chunk, leave=False)]
  return np.concatenate(parts) if parts else np.zeros((0,), np.uint8)
