"""`cspgan prepare-data`: a folder of images -> a TFDS `array_record` dataset, without TensorFlow.

Why prepare at all: decoding CelebA's JPEGs runs at about 2,500 images/s per CPU core, while one
GPU trains on well over 10,000 images/s. So the seed's transform (preprocess.py) runs once, on
every core, and training reads uint8 pixels from memory.

Why a TFDS builder of our own: TFDS's `celeb_a` downloads from the same Google Drive whose quota
stopped the seed's author, and building it needs TensorFlow. A `GeneratorBasedBuilder` writing
`array_record` needs neither, and the result is an ordinary TFDS dataset:
`tfds.data_source(NAME, data_dir=DATA_DIR)` reads it (feature `image`, uint8 (R, R, 3)).
Pixels are stored as raw bytes (`Encoding.BYTES`): 49 KB per 128x128 image instead of 77 KB of
int64 varints, and decoding is a `np.frombuffer`.

TFDS writes into `incomplete.*` folders and renames them only when every split is written, so an
interrupted preparation never looks finished; `prepare` removes such leftovers and rebuilds.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from cspgan_jax import preprocess
from cspgan_jax.errors import DataError, io_reason

DATASET_VERSION = "1.0.0"
PARTITION_FILE = "list_eval_partition.txt"
PARTITION_SPLITS = {"0": "train", "1": "validation", "2": "test"}
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
CHUNK = 32  # files per worker task: large enough to amortise IPC, small enough to stream


@dataclasses.dataclass
class Summary:
  """What a preparation did; printed by the CLI, also stored in the dataset's metadata."""
  data_path: str
  resolution: int
  written: Dict[str, int]
  skipped: List[Tuple[str, str]]
  seconds: float
  workers: int
  unlisted: int = 0  # files missing from list_eval_partition.txt (put in train)
  removed_incomplete: List[str] = dataclasses.field(default_factory=list)

  @property
  def num_written(self) -> int:
    return sum(self.written.values())

  @property
  def images_per_second(self) -> float:
    return (self.num_written + len(self.skipped)) / max(self.seconds, 1e-9)

  def lines(self, show_skipped: int = 5) -> List[str]:
    splits = ", ".join(f"{k} {v}" for k, v in self.written.items())
    r = self.resolution
    out = [f"wrote {self.num_written} images ({splits}) at {r}x{r} to {self.data_path}"]
    for path in self.removed_incomplete:
      out.append(f"removed an interrupted preparation: {path}")
    if self.unlisted:
      out.append(f"{self.unlisted} images not in {PARTITION_FILE}: put in train")
    if self.skipped:
      first = "; ".join(f"{n} ({why})" for n, why in self.skipped[:show_skipped])
      more = f"; and {len(self.skipped) - show_skipped} more" if len(self.skipped) > show_skipped else ""
      out.append(f"skipped {len(self.skipped)} unreadable images: {first}{more}")
    else:
      out.append("skipped 0 images")
    out.append(f"{self.seconds:.1f} s, {self.images_per_second:.0f} images/s "
               f"with {self.workers} worker processes")
    return out


# ---- finding the input ----

def find_images(input_dir: str) -> List[str]:
  """Image files under `input_dir`, recursively, as sorted relative paths.

  Links to folders are followed (image folders are often linked in), each real folder once:
  a link back to the folder or one above it would otherwise list images again and again."""
  found = []
  root_real = os.path.realpath(input_dir)
  seen = set()
  for root, dirs, files in os.walk(input_dir, followlinks=True):
    stat = os.stat(root)
    if (stat.st_dev, stat.st_ino) in seen:
      dirs.clear()
      continue
    seen.add((stat.st_dev, stat.st_ino))
    # A folder above the input (`up -> ..`) would bring in everything beside it.
    dirs[:] = sorted(d for d in dirs if not (root_real + os.sep).startswith(
        os.path.realpath(os.path.join(root, d)) + os.sep))
    for f in files:
      if preprocess.is_image_file(f):
        found.append(os.path.relpath(os.path.join(root, f), input_dir))
  return sorted(found)


def find_partition_file(input_dir: str) -> Optional[str]:
  """CelebA's split list: inside the image folder, beside it, or in the archive's `Eval/`."""
  parent = os.path.dirname(os.path.abspath(input_dir))
  for d in (input_dir, parent, os.path.join(parent, "Eval"),
            os.path.join(os.path.dirname(parent), "Eval")):
    path = os.path.join(d, PARTITION_FILE)
    if os.path.isfile(path):
      return path
  return None


def read_partition(path: str) -> Dict[str, str]:
  """`000001.jpg 0` lines -> {file name: split name}."""
  partition = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) != 2 or fields[1] not in PARTITION_SPLITS:
        raise DataError(f"{path}:{number}: expected '<file name> <0|1|2>', got {line.strip()!r}")
      partition[fields[0]] = PARTITION_SPLITS[fields[1]]
  return partition


def assign_splits(files: Sequence[str], partition: Optional[Dict[str, str]]):
  """{split: [relative paths]} and the number of files the partition does not list."""
  if partition is None:
    return {"train": list(files)}, 0
  splits = collections.OrderedDict((s, []) for s in PARTITION_SPLITS.values())
  unlisted = 0
  for f in files:
    split = partition.get(os.path.basename(f))
    if split is None:
      unlisted += 1
      split = "train"
    splits[split].append(f)
  return collections.OrderedDict((k, v) for k, v in splits.items() if v), unlisted


# ---- the builder ----

def _decode_in_order(executor, input_dir: str, files: Sequence[str], resolution: int,
                     window: int) -> Iterator[Tuple[str, Optional[bytes], Optional[str]]]:
  """(relative path, pixels or None, reason) in file order, at most `window` chunks in flight."""
  chunks = [files[i:i + CHUNK] for i in range(0, len(files), CHUNK)]
  pending = collections.deque()
  next_chunk = 0
  while next_chunk < len(chunks) or pending:
    while next_chunk < len(chunks) and len(pending) < window:
      paths = [os.path.join(input_dir, f) for f in chunks[next_chunk]]
      pending.append((chunks[next_chunk],
                      executor.submit(preprocess.load_images, paths, resolution)))
      next_chunk += 1
    names, future = pending.popleft()
    for name, (pixels, reason) in zip(names, future.result()):
      yield name, pixels, reason


def make_builder_class(name: str):
  """A `GeneratorBasedBuilder` subclass called `name` (TFDS takes a dataset's name from its class).

  Not registered in TFDS's catalogue: readers find the dataset through its files in `data_dir`.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class ImageFolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images of a folder after the seed's Resize + CenterCrop, as raw uint8 pixels."""
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Resize(R) + CenterCrop(R) as torchvision does it; raw uint8 bytes."}

    def __init__(self, *, input_dir: str, splits, resolution: int, executor, workers: int,
                 skipped: list, **kwargs):
      self._input_dir = input_dir
      self._splits = splits
      self._resolution = resolution
      self._executor = executor
      self._window = 4 * workers
      self._skipped = skipped
      super().__init__(**kwargs)

    def _info(self):
      r = self._resolution
      return self.dataset_info_from_configs(
          description=f"Images of {self._input_dir}, resized and center-cropped to {r}x{r}.",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Tensor(shape=(r, r, 3), dtype=np.uint8,
                                            encoding=tfds.features.Encoding.BYTES),
              "file_name": tfds.features.Text(),
          }),
          # Training shuffles with its own (seed, epoch) permutation: keep file order on disk.
          disable_shuffling=True,
          metadata=tfds.core.MetadataDict(resolution=r, skipped=self._skipped),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split, files)
              for split, files in self._splits.items()}

    def _generate_examples(self, split, files):
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      r = self._resolution
      items = _decode_in_order(self._executor, self._input_dir, files, r, self._window)
      for name, pixels, reason in tqdm(items, total=len(files), desc=f"prepare {split}",
                                       unit=" images", smoothing=0.05, mininterval=1.0):
        if pixels is None:
          self._skipped.append((name, reason))
          continue
        yield name, {"image": np.frombuffer(pixels, np.uint8).reshape(r, r, 3),
                     "file_name": name}

  ImageFolderBuilder.name = name
  ImageFolderBuilder.__name__ = ImageFolderBuilder.__qualname__ = f"ImageFolderBuilder_{name}"
  return ImageFolderBuilder


# ---- output folder states ----

def dataset_path(out_dir: str, name: str) -> str:
  return os.path.join(out_dir, name, DATASET_VERSION)


def incomplete_paths(out_dir: str, name: str) -> List[str]:
  """Leftovers of interrupted preparations of this dataset (TFDS's `incomplete.*` folders)."""
  parent = os.path.join(out_dir, name)
  if not os.path.isdir(parent):
    return []
  return sorted(os.path.join(parent, d) for d in os.listdir(parent)
                if d.startswith("incomplete.") and d.endswith("_" + DATASET_VERSION))


def prepared_problem(path: str) -> Optional[str]:
  """None if `path` holds a complete prepared dataset, else what is wrong with it."""
  info_path = os.path.join(path, "dataset_info.json")
  if not os.path.isfile(info_path):
    return f"{path} has no dataset_info.json (an interrupted or foreign preparation)"
  try:
    with open(info_path, encoding="utf-8") as f:
      info = json.load(f)
    for split in info["splits"]:
      lengths = [int(n) for n in split.get("shardLengths", [])]
      template = split.get("filepathTemplate", "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
      for i in range(len(lengths)):
        shard = (template.replace("{DATASET}", info["name"]).replace("{SPLIT}", split["name"])
                 .replace("{FILEFORMAT}", "array_record")
                 .replace("{SHARD_X_OF_Y}", f"{i:05d}-of-{len(lengths):05d}"))
        if not os.path.isfile(os.path.join(path, shard)):
          return f"{path} lacks its shard file {shard}"
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{info_path} is unreadable ({type(e).__name__}: {e})"
  return None


def _remove_empty_tree(path: str) -> None:
  for root, _, _ in sorted(os.walk(path, topdown=False), reverse=True):
    try:
      os.rmdir(root)
    except OSError:  # not empty: leave it
      pass


# ---- the command ----

def check_arguments(input_dir: str, out_dir: str, resolution: int, name: str) -> None:
  from cspgan_jax import models  # pylint: disable=import-outside-toplevel
  if not os.path.exists(input_dir):
    raise DataError(f"input folder not found: {input_dir}")
  if not os.path.isdir(input_dir):
    raise DataError(f"--input must be a folder of images, got a file: {input_dir}")
  try:
    models.check_resolution(resolution)
  except ValueError as e:
    raise DataError(f"--resolution {resolution} is not supported by the model: {e}") from e
  if not NAME_PATTERN.match(name):
    raise DataError(f"--name must be lower_snake_case (TFDS dataset names), got {name!r}")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise DataError(f"--out must be a folder, got a file: {out_dir}")
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    tfds.builder_cls(name)
  except Exception:  # pylint: disable=broad-except  # not a catalogue name: what we want
    return
  raise DataError(f"--name {name!r} is a dataset of the TFDS catalogue; `tfds.data_source` would "
                  "read it with that builder: choose another name")


def prepare(input_dir: str, out_dir: str, resolution: int = 128, name: str = "celeba",
            workers: Optional[int] = None, overwrite: bool = False) -> Summary:
  """Builds `out_dir/name/1.0.0` from the images under `input_dir`; returns the summary."""
  check_arguments(input_dir, out_dir, resolution, name)
  files = find_images(input_dir)
  if not files:
    raise DataError(f"no image files ({', '.join(preprocess.IMAGE_EXTENSIONS)}) under {input_dir}")
  partition_path = find_partition_file(input_dir)
  partition = read_partition(partition_path) if partition_path else None
  splits, unlisted = assign_splits(files, partition)

  path = dataset_path(out_dir, name)
  removed = []
  if os.path.isdir(path):
    problem = prepared_problem(path)
    if problem is None and not overwrite:
      raise DataError(f"{path} already holds a prepared dataset; pass --overwrite to rebuild it "
                      "or choose another --out or --name")
    if problem is not None:  # a broken output of ours: rebuild rather than read it
      shutil.rmtree(path)
      removed.append(path)
  for stale in incomplete_paths(out_dir, name):
    shutil.rmtree(stale, ignore_errors=True)
    removed.append(stale)

  downloads = os.path.join(out_dir, "downloads")
  had_downloads = os.path.exists(downloads)
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  tfds.disable_progress_bar()  # ours (per split, with a total) replaces TFDS's
  workers = workers or os.cpu_count() or 1
  skipped: List[Tuple[str, str]] = []
  start = time.perf_counter()
  # "spawn": workers need only numpy and PIL; forking a process that may hold JAX's threads is unsafe.
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn")) as executor:
    builder = make_builder_class(name)(
        input_dir=input_dir, splits=splits, resolution=resolution, executor=executor,
        workers=workers, skipped=skipped, data_dir=out_dir, file_format="array_record")
    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(download_mode=mode))
    except BaseException as e:  # pylint: disable=broad-except
      # Whatever stopped it (a full disk, no readable image, Ctrl-C): this run's partial files
      # go, and the folders it made if they are empty; nothing else is touched.
      for partial in incomplete_paths(out_dir, name):
        shutil.rmtree(partial, ignore_errors=True)
      _remove_empty_tree(os.path.join(out_dir, name))
      if not had_downloads:
        _remove_empty_tree(downloads)
      if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit
        raise
      reason = io_reason(e)
      if reason is not None:
        raise DataError(f"cannot write the dataset in {out_dir}: {reason}") from e
      if "No examples were yielded" not in str(e):
        raise
      empty = [s for s, fs in splits.items() if len(fs) == sum(n in set(fs) for n, _ in skipped)]
      split = empty[0] if empty else "?"
      raise DataError(f"none of the {len(splits.get(split, files))} image files of split {split!r} "
                      f"under {input_dir} could be read (first: {skipped[0][0]}: "
                      f"{skipped[0][1]})") from e
  seconds = time.perf_counter() - start
  if not had_downloads:  # TFDS makes an empty download folder we never use
    _remove_empty_tree(downloads)
  written = {s: int(builder.info.splits[s].num_examples) for s in splits}
  return Summary(data_path=path, resolution=resolution, written=written, skipped=skipped,
                 seconds=seconds, workers=workers, unlisted=unlisted, removed_incomplete=removed)
