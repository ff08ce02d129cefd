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

Each preparation builds in a folder of its own, `NAME/incomplete.*_1.0.0` (TFDS's name for a
dataset being written), and moves the result to `NAME/1.0.0` only when every split is written: an
interrupted preparation never looks finished, and what was at `NAME/1.0.0` (the dataset
`--overwrite` rebuilds) stays there, readable, until then. `prepare` removes such leftovers and
rebuilds; a `NAME/1.0.0` holding anything our builder does not write is never removed unasked.
The swap is two renames, the old dataset to `NAME/replaced_1.0.0` and the new one into place: a
run killed between them leaves the old one there, where training's reader names it and the next
run moves it back before anything else; one killed after them leaves it for the next swap to remove.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import io
import json
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from cspgan_jax import output_files, preprocess
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
  replaced: str = ""  # what --overwrite replaced, in words ("" if nothing)

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
    if self.replaced:
      out.append(f"replaced {self.replaced}")
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
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8-sig")  # a BOM (Windows editors) would start the first name
  except UnicodeDecodeError as e:  # decoded whole, so that the error can name its line
    number = data.count(b"\n", 0, e.start) + 1
    raise DataError(f"{path}:{number}: not UTF-8 text (byte 0x{data[e.start]:02x}); CelebA's "
                    "list holds '<file name> <0|1|2>' lines") from e
  partition = {}
  with io.StringIO(text, newline=None) as f:  # newline=None: \r\n and \r end lines, as open() does
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

    # TFDS prints where it writes: our build folder, not where the dataset ends up. The summary
    # says that instead.
    def _log_download_bytes(self):
      pass

    def _log_download_done(self):
      pass

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

# What our builder writes into NAME/1.0.0: TFDS's three JSON files and the split's shards.
BUILDER_FILES = ("dataset_info.json", "features.json", "metadata.json")
SHARD_PATTERN = r"^{name}-[a-z_]+\.array_record-\d{{5}}-of-\d{{5}}$"
# A dataset being written: TFDS's `incomplete.XXXXXX_1.0.0`, and our build folders, named alike.
INCOMPLETE_PATTERN = re.compile(r"^incomplete\.[A-Za-z0-9_]+_" + re.escape(DATASET_VERSION) + "$")
# Where --overwrite moves the old dataset between its two renames: outside the build folder,
# whose leftovers the next run removes, and not a version's name, which TFDS would read.
REPLACED = "replaced_" + DATASET_VERSION


def dataset_path(out_dir: str, name: str) -> str:
  return os.path.join(out_dir, name, DATASET_VERSION)


def incomplete_paths(out_dir: str, name: str) -> List[str]:
  """Leftovers of interrupted preparations of this dataset (`incomplete.*_1.0.0` folders)."""
  parent = os.path.join(out_dir, name)
  if not os.path.isdir(parent):
    return []
  return sorted(os.path.join(parent, d) for d in os.listdir(parent)
                if INCOMPLETE_PATTERN.match(d) and os.path.isdir(os.path.join(parent, d))
                and not os.path.islink(os.path.join(parent, d)))


def set_aside(out_dir: str, name: str) -> List[str]:
  """What interrupted --overwrite runs moved away from NAME/1.0.0: `NAME/replaced_1.0.0`, and
  `incomplete.*_1.0.0/replaced`, where earlier versions put it."""
  found = [os.path.join(out_dir, name, REPLACED)]
  found += [os.path.join(d, "replaced") for d in incomplete_paths(out_dir, name)]
  return [p for p in found if os.path.lexists(p)]


def put_back(out_dir: str, name: str) -> Optional[str]:
  """Moves what a run killed between the swap's two renames set aside back to NAME/1.0.0, if
  that is empty; returns where it was (None if nothing was moved)."""
  path, aside = dataset_path(out_dir, name), set_aside(out_dir, name)
  if os.path.lexists(path) or not aside:
    return None
  if len(aside) > 1:  # not one run's leftover: which to keep is the user's call
    raise DataError(f"{path} is missing, and interrupted `--overwrite` runs left what it held in "
                    f"{' and '.join(aside)}: move the one to keep to {path}")
  os.rename(aside[0], path)
  return aside[0]


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


def foreign_entry(path: str, name: str) -> Optional[str]:
  """None if `path` holds only files our builder writes (a damaged or half-removed dataset of
  ours, or nothing), so that removing it loses nothing of the user's; else what it holds that is
  not ours."""
  if os.path.islink(path) or not os.path.isdir(path):
    return "it is not a folder"
  shard = re.compile(SHARD_PATTERN.format(name=re.escape(name)))
  for entry in sorted(os.scandir(path), key=lambda e: e.name):
    if not entry.is_file(follow_symlinks=False):
      return f"it holds {entry.name}, not a file our builder writes"
    if entry.name not in BUILDER_FILES and not shard.match(entry.name):
      return f"it holds {entry.name}, a file our builder does not write"
  return None


def check_existing(path: str, name: str, overwrite: bool) -> str:
  """What a successful build replaces at `path`, in words ("" if nothing), or a DataError where
  what is there must stay: a complete dataset without --overwrite, anything not ours without it."""
  if not os.path.lexists(path):
    return ""
  if os.path.isdir(path) and prepared_problem(path) is None:
    if not overwrite:
      raise DataError(f"{path} already holds a prepared dataset; pass --overwrite to rebuild it "
                      "or choose another --out or --name")
    return f"the dataset prepared before in {path}"
  foreign = foreign_entry(path, name)
  if foreign is None:
    return ""  # a broken output of ours: rebuilt without asking, listed as removed
  if not overwrite:
    raise DataError(f"{path} is not a dataset prepared by `cspgan prepare-data` ({foreign}): left "
                    "as it is; move it away, pass --overwrite to replace it, or choose another "
                    "--out or --name")
  return f"{path}, which was not a prepared dataset ({foreign})"


def swap_in(built: str, path: str, aside: str) -> bool:
  """Moves `built` to `path`, what was at `path` to `aside` first (True if there was something).
  A Ctrl-C between the two renames puts the old one back; a kill leaves it for `put_back`."""
  had = os.path.lexists(path)
  if had:
    _remove(aside)  # what an earlier swap replaced, then killed before removing it
    os.rename(path, aside)
  try:
    os.rename(built, path)
  except BaseException:
    if had and not os.path.lexists(path):
      os.rename(aside, path)
    raise
  return had


def _remove(path: str) -> None:
  """Removes a folder's tree, a file or a link, if there."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


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
  """Builds `out_dir/name/1.0.0` from the images under `input_dir`; returns the summary.

  The dataset is built in `out_dir/name/incomplete.*_1.0.0` and moved into place only once
  complete: whatever stops it (no readable image, a full disk, Ctrl-C), `out_dir/name/1.0.0` is
  as it was."""
  check_arguments(input_dir, out_dir, resolution, name)
  files = find_images(input_dir)
  if not files:
    raise DataError(f"no image files ({', '.join(preprocess.IMAGE_EXTENSIONS)}) under {input_dir}")
  partition_path = find_partition_file(input_dir)
  partition = read_partition(partition_path) if partition_path else None
  splits, unlisted = assign_splits(files, partition)

  parent, path = os.path.join(out_dir, name), dataset_path(out_dir, name)
  if os.path.lexists(parent) and not os.path.isdir(parent):
    raise DataError(f"{parent} is not a folder: the dataset {name!r} needs one there; move it "
                    "away or choose another --out or --name")
  made = output_files.missing_folders(parent)
  os.makedirs(parent, exist_ok=True)
  try:
    with _writing(parent):
      return _prepare_in(parent, path, input_dir, out_dir, name, files, splits, unlisted,
                         workers or os.cpu_count() or 1, overwrite, resolution)
  except BaseException:
    output_files.remove_folders(made)  # where it stopped before its dataset was in place
    raise


@contextlib.contextmanager
def _writing(parent: str):
  """Holds an flock on the dataset's folder (`out/name`) while one `prepare` writes there: a
  second one would remove the first's build folder as an interrupted run's leftover. Nothing
  is written for it, and a file system without locks on folders is written unguarded."""
  fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
        raise DataError(f"another `cspgan prepare-data` is writing {parent}: wait for it to "
                        "end, or choose another --out or --name") from None
    yield
  finally:
    os.close(fd)


def _prepare_in(parent, path, input_dir, out_dir, name, files, splits, unlisted, workers,
                overwrite, resolution) -> Summary:
  """`prepare`'s build, its folder made and held."""
  restored = put_back(out_dir, name)
  if restored:  # said now: a refusal below must not hide that the dataset moved
    print(f"[prepare-data] put back {path}, which an interrupted --overwrite had left in "
          f"{restored}", flush=True)
  replaced = check_existing(path, name, overwrite)
  damaged = os.path.lexists(path) and not replaced  # ours, but broken: rebuilt
  removed = incomplete_paths(out_dir, name)
  for stale in removed:
    shutil.rmtree(stale, ignore_errors=True)
  build_dir = None
  skipped: List[Tuple[str, str]] = []
  try:
    build_dir = tempfile.mkdtemp(prefix="incomplete.", suffix="_" + DATASET_VERSION, dir=parent)
    start = time.perf_counter()
    builder = _build(build_dir, input_dir, splits, resolution, name, workers, skipped)
    seconds = time.perf_counter() - start
    aside = os.path.join(parent, REPLACED)
    had = swap_in(dataset_path(build_dir, name), path, aside)
  except BaseException as e:  # pylint: disable=broad-except
    # Whatever stopped it (a full disk, no readable image, Ctrl-C): this run's files go, and
    # (in `prepare`) the folders it made; nothing else is touched.
    if build_dir is not None:
      shutil.rmtree(build_dir, ignore_errors=True)
    error = _build_error(e, input_dir, out_dir, files, splits, skipped)
    if error is e:  # KeyboardInterrupt, SystemExit, a DataError, or not the user's to fix
      raise
    raise error from e
  shutil.rmtree(build_dir)  # TFDS's empty download folder
  if had:
    _remove(aside)  # what was replaced
  if damaged:
    removed.append(path)
  written = {s: int(builder.info.splits[s].num_examples) for s in splits}
  return Summary(data_path=path, resolution=resolution, written=written, skipped=skipped,
                 seconds=seconds, workers=workers, unlisted=unlisted, removed_incomplete=removed,
                 replaced=replaced)


def _build(data_dir: str, input_dir: str, splits, resolution: int, name: str, workers: int,
           skipped: List[Tuple[str, str]]):
  """Writes `data_dir/name/1.0.0` with our builder; returns the builder."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  tfds.disable_progress_bar()  # ours (per split, with a total) replaces TFDS's
  # "spawn": workers need only numpy and PIL; forking a process that may hold JAX's threads is unsafe.
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn")) as executor:
    builder = make_builder_class(name)(
        input_dir=input_dir, splits=splits, resolution=resolution, executor=executor,
        workers=workers, skipped=skipped, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return builder


def _build_error(e: BaseException, input_dir: str, out_dir: str, files, splits, skipped):
  """The one-line DataError for a failed build; `e` itself where it is not the user's to fix."""
  if not isinstance(e, Exception) or isinstance(e, DataError):
    return e
  reason = io_reason(e)
  if reason is not None:
    return DataError(f"cannot write the dataset in {out_dir}: {reason}")
  if "No examples were yielded" not in str(e) or not skipped:
    return e
  empty = [s for s, fs in splits.items() if len(fs) == sum(n in set(fs) for n, _ in skipped)]
  split = empty[0] if empty else "?"
  return DataError(f"none of the {len(splits.get(split, files))} image files of split {split!r} "
                   f"under {input_dir} could be read (first: {skipped[0][0]}: {skipped[0][1]})")
