"""prepare-data, the seed's transform, the TFDS reader and both input paths, on a few dozen
JPEGs the tests draw themselves (no download, no TensorFlow)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cspgan_jax import (cli, config_lib, datasets, errors, input_pipeline, prepare_data,
                        preprocess, synthetic)
from cspgan_jax.errors import ConfigError, DataError

R = 32
SIZES = [(178, 218), (218, 178), (200, 200), (64, 40), (33, 90)]  # (width, height)
NUM_GOOD = 36
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smooth_image(rng, width, height):
  """Blurry colour blobs: JPEG keeps them sharp enough to make resizing errors visible."""
  small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
  return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def make_image_folder(root, num_good=NUM_GOOD, seed=0, corrupt=True):
  """num_good images of several sizes and modes in nested folders, plus a corrupt and a truncated JPEG."""
  rng = np.random.default_rng(seed)
  names = []
  for i in range(num_good):
    sub = os.path.join(root, "part_a" if i % 3 else "part_b", "deeper" if i % 7 == 0 else "")
    os.makedirs(sub, exist_ok=True)
    image = _smooth_image(rng, *SIZES[i % len(SIZES)])
    if i % 11 == 5:
      path = os.path.join(sub, f"{i:06d}.png")
      image.convert("L").save(path)  # greyscale: the loader's convert("RGB") must handle it
    elif i % 11 == 2:  # as some cameras and Windows tools name them; torchvision reads them
      path = os.path.join(sub, f"{i:06d}.JPG")
      image.save(path, quality=92)
    else:
      path = os.path.join(sub, f"{i:06d}.jpg")
      image.save(path, quality=92)
    names.append(os.path.relpath(path, root))
  if corrupt:
    with open(os.path.join(root, "corrupt.jpg"), "wb") as f:
      f.write(b"\xff\xd8\xff\xe0 this is not a JPEG")
    whole = open(os.path.join(root, names[0]), "rb").read()
    with open(os.path.join(root, "truncated.jpg"), "wb") as f:
      f.write(whole[:len(whole) // 3])
  with open(os.path.join(root, "notes.txt"), "w") as f:  # not an image: ignored, not "skipped"
    f.write("hello")
  return sorted(names)


def pil_reference(path, size):
  """torchvision's Resize(size) + CenterCrop(size) on a PIL image, written out independently."""
  image = Image.open(path).convert("RGB")
  w, h = image.size
  if w <= h:
    new = (size, int(size * h / w))
  else:
    new = (int(size * w / h), size)
  image = image.resize(new, Image.BILINEAR)
  top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
  return np.asarray(image.crop((left, top, left + size, top + size)), np.int32)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  images = str(root / "img_align_celeba")
  names = make_image_folder(images)
  out = str(root / "tfds")
  summary = prepare_data.prepare(images, out, resolution=R, name="celeba", workers=2)
  return dict(images=images, out=out, names=names, summary=summary)


def data_config(**fields):
  c = ml_collections.ConfigDict(dict(
      source="tfds", name="celeba", data_dir="", split="train", num_examples=0,
      synthetic_seed=0, shuffle_seed=3, pipeline="auto", device_budget_gb=0.0, prefetch=2))
  c.update(fields)
  return c


# ---- preparation ----

def test_data_source_returns_every_readable_image_with_the_seeds_pixels(prepared):
  source = tfds.data_source("celeba", data_dir=prepared["out"])["train"]
  assert len(source) == NUM_GOOD == prepared["summary"].num_written
  examples = source.__getitems__(list(range(len(source))))
  assert [e["file_name"].decode() for e in examples] == prepared["names"]  # file order kept
  worst = 0
  for e in examples:
    image = e["image"]
    assert image.shape == (R, R, 3) and image.dtype == np.uint8
    ref = pil_reference(os.path.join(prepared["images"], e["file_name"].decode()), R)
    worst = max(worst, int(np.abs(image.astype(np.int32) - ref).max()))
  assert worst <= 1
  # Each record holds the pixels as raw bytes (R*R*3 plus a few dozen bytes of framing), not as
  # int64 varints (two bytes for every value >= 128).
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  path = prepared["summary"].data_path
  shard = [f for f in os.listdir(path) if ".array_record-" in f]
  reader = array_record_module.ArrayRecordReader(os.path.join(path, shard[0]))
  sizes = [len(r) for r in reader.read(list(range(NUM_GOOD)))]
  assert all(R * R * 3 < n < R * R * 3 + 100 for n in sizes), sizes


def test_transform_matches_pytorch_antialiased_bilinear_within_one_grey_level():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  for (w, h) in SIZES:
    image = _smooth_image(rng, w, h)
    for size in (32, 64, 128):
      ours = preprocess.resize_and_crop(image, size).astype(np.int32)
      nw, nh = preprocess.resized_size(w, h, size)
      t = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
      resized = torch.nn.functional.interpolate(t, size=(nh, nw), mode="bilinear", antialias=True,
                                                align_corners=False)[0].permute(1, 2, 0).numpy()
      left, top, _, _ = preprocess.center_crop_box(nw, nh, size)
      theirs = resized[top:top + size, left:left + size].astype(np.int32)
      assert ours.shape == theirs.shape == (size, size, 3)
      assert np.abs(ours - theirs).max() <= 1, (w, h, size)


def test_celeba_sizes_follow_torchvision():
  assert preprocess.resized_size(178, 218, 128) == (128, 156)
  assert preprocess.center_crop_box(128, 156, 128) == (0, 14, 128, 142)
  assert preprocess.resized_size(218, 178, 64) == (78, 64)


def test_unreadable_files_are_skipped_and_listed(prepared, capsys):
  skipped = dict(prepared["summary"].skipped)
  assert set(skipped) == {"corrupt.jpg", "truncated.jpg"}
  assert "truncated" in skipped["truncated.jpg"]
  text = "\n".join(prepared["summary"].lines())
  assert "skipped 2 unreadable images: corrupt.jpg" in text and "truncated.jpg" in text
  with open(os.path.join(prepared["summary"].data_path, "metadata.json")) as f:
    meta = json.load(f)
  assert meta["resolution"] == R and sorted(n for n, _ in meta["skipped"]) == sorted(skipped)


def test_linked_folders_are_searched_once_each(tmp_path):
  root = tmp_path / "parent" / "images"
  names = make_image_folder(str(root), num_good=4, corrupt=False)
  (tmp_path / "parent" / "beside.jpg").write_bytes(b"outside the input")
  (tmp_path / "linked").mkdir()
  (tmp_path / "linked" / "x.jpg").write_bytes(b"a linked folder's image")
  os.symlink(".", root / "self")          # loops: without a check, os.walk lists them again
  os.symlink("..", root / "part_a" / "up")  # and again, until the path is too long
  os.symlink(str(root.parent), root / "parent")  # a folder above: would bring in beside.jpg
  os.symlink(str(tmp_path / "linked"), root / "more")
  os.symlink(str(tmp_path / "linked"), root / "part_b" / "same")  # the same folder twice
  assert prepare_data.find_images(str(root)) == sorted(names + ["more/x.jpg"])


def test_celeba_partition_file_gives_splits(tmp_path, config_path):
  images = tmp_path / "CelebA" / "Img" / "img_align_celeba"
  names = make_image_folder(str(images), num_good=9, corrupt=False)
  eval_dir = tmp_path / "CelebA" / "Eval"
  eval_dir.mkdir()
  listed = names[:-1]  # the last file is missing from the list: it goes to train
  (eval_dir / "list_eval_partition.txt").write_text(
      "".join(f"{os.path.basename(n)} {i % 3}\n" for i, n in enumerate(listed)))
  summary = prepare_data.prepare(str(images), str(tmp_path / "out"), resolution=R, workers=1)
  assert summary.written == {"train": 4, "validation": 3, "test": 2}
  assert summary.unlisted == 1
  sources = tfds.data_source("celeba", data_dir=str(tmp_path / "out"))
  assert {k: len(v) for k, v in sources.items()} == summary.written
  test_names = [e["file_name"].decode() for e in sources["test"].__getitems__([0, 1])]
  assert test_names == [listed[2], listed[5]]
  # Training reads every image by default, as the seed's ImageFolder did; TFDS's split syntax
  # picks parts.
  for split, expected in [(config_lib.load_config(config_path("baseline")).data.split, 9), ("train", 4),
                          ("train+test", 6), ("validation[:2]", 2)]:
    config = data_config(data_dir=str(tmp_path / "out"), split=split)
    assert len(datasets.load_source(config, R)) == expected, split
  with pytest.raises(DataError, match=r"has no split 'tset' \(it has: train, validation, test; "
                     r"'all' reads every one\)"):
    datasets.load_source(data_config(data_dir=str(tmp_path / "out"), split="train+tset"), R)
  with pytest.raises(DataError, match=r"'celeba' Error parsing split 'train\[:'"):
    datasets.load_source(data_config(data_dir=str(tmp_path / "out"), split="train[:"), R)


@pytest.mark.parametrize("line", ["000001.jpg seven", "000001.jpg 0 2"])
def test_bad_partition_line_is_one_clear_error(tmp_path, line):
  images = tmp_path / "imgs"
  make_image_folder(str(images), num_good=2, corrupt=False)
  (images / "list_eval_partition.txt").write_text(f"000000.jpg 0\n{line}\n")
  with pytest.raises(DataError, match=rf"list_eval_partition.txt:2: expected '<file name> "
                                      rf"<0\|1\|2>', got '{line}'"):
    prepare_data.prepare(str(images), str(tmp_path / "out"), resolution=R, workers=1)


def test_a_second_prepare_data_of_a_dataset_being_written_is_refused(tmp_path):
  """It removed the first one's build folder as an interrupted run's leftover."""
  import fcntl  # pylint: disable=import-outside-toplevel
  images = tmp_path / "imgs"
  make_image_folder(str(images), num_good=2, corrupt=False)
  parent = tmp_path / "out" / "d"
  building = parent / "incomplete.abc123_1.0.0"  # the first run's
  building.mkdir(parents=True)
  held = os.open(parent, os.O_RDONLY)
  try:
    fcntl.flock(held, fcntl.LOCK_EX)  # as the first run holds it
    with pytest.raises(DataError, match=f"^another `cspgan prepare-data` is writing {parent}: "
                       "wait for it to end, or choose another --out or --name$"):
      prepare_data.prepare(str(images), str(tmp_path / "out"), resolution=R, name="d", workers=1)
    assert building.is_dir()
  finally:
    os.close(held)
  summary = prepare_data.prepare(str(images), str(tmp_path / "out"), resolution=R, name="d",
                                 workers=1)  # that run gone: its leftover is removed
  assert summary.removed_incomplete == [str(building)] and not building.exists()


def test_a_partition_file_that_is_not_utf8_is_one_clear_error(tmp_path):
  images = tmp_path / "imgs"
  make_image_folder(str(images), num_good=2, corrupt=False)
  (images / "list_eval_partition.txt").write_bytes(b"000000.jpg 0\r\n000001.jpg 0\r\n\xff.jpg 1\r\n")
  with pytest.raises(DataError, match=r"list_eval_partition.txt:3: not UTF-8 text \(byte 0xff\)"):
    prepare_data.prepare(str(images), str(tmp_path / "out"), resolution=R, workers=1)
  assert not (tmp_path / "out").exists()
  # Read as text still, in whichever newlines it was written.
  (images / "list_eval_partition.txt").write_bytes(
      b"\xef\xbb\xbf000000.jpg 0\r\n000001.jpg 2\r000002.jpg 1")  # with a BOM, as Notepad saves
  assert prepare_data.read_partition(str(images / "list_eval_partition.txt")) == {
      "000000.jpg": "train", "000001.jpg": "test", "000002.jpg": "validation"}


def test_the_partition_file_is_found_where_celeba_keeps_it(tmp_path):
  """Inside the image folder, beside it, or in `Eval/` beside it or one level up (the
  archive's CelebA/Eval beside CelebA/Img/img_align_celeba), nearest first."""
  images = tmp_path / "CelebA" / "Img" / "img_align_celeba"
  images.mkdir(parents=True)
  assert prepare_data.find_partition_file(str(images)) is None
  for folder in (tmp_path / "CelebA" / "Eval", tmp_path / "CelebA" / "Img" / "Eval",
                 tmp_path / "CelebA" / "Img", images):  # farthest first: each new one wins
    folder.mkdir(exist_ok=True)
    (folder / prepare_data.PARTITION_FILE).write_text("000001.jpg 0\n")
    assert prepare_data.find_partition_file(str(images)) == str(
        folder / prepare_data.PARTITION_FILE)


def test_existing_dataset_is_kept_unless_overwrite(prepared, tmp_path):
  info = os.path.join(prepared["summary"].data_path, "dataset_info.json")
  before = open(info).read()
  with pytest.raises(DataError, match="already holds a prepared dataset"):
    prepare_data.prepare(prepared["images"], prepared["out"], resolution=R, workers=1)
  assert open(info).read() == before
  # overwrite=True replaces it (in a copy: the other tests of this file read the original)
  out = str(tmp_path / "copy")
  shutil.copytree(prepared["out"], out)
  others = str(tmp_path / "others")
  make_image_folder(others, num_good=3, corrupt=False)
  summary = prepare_data.prepare(others, out, resolution=R, workers=1, overwrite=True)
  assert summary.written == {"train": 3}
  assert len(tfds.data_source("celeba", data_dir=out)["train"]) == 3


def test_interrupted_preparation_is_detected_and_rebuilt(tmp_path):
  images = tmp_path / "imgs"
  make_image_folder(str(images), num_good=5, corrupt=False)
  out = tmp_path / "out"
  # What a killed run leaves: TFDS's temporary folder, never renamed to 1.0.0.
  stale = out / "celeba" / "incomplete.ABC123_1.0.0"
  stale.mkdir(parents=True)
  (stale / "celeba-train.array_record-00000-of-00001").write_bytes(b"half a shard")
  config = data_config(data_dir=str(out))
  with pytest.raises(DataError, match="was interrupted"):
    datasets.load_source(config, R)
  summary = prepare_data.prepare(str(images), str(out), resolution=R, workers=1)
  assert summary.removed_incomplete == [str(stale)] and not stale.exists()
  assert len(datasets.load_source(config, R)) == 5
  # A final folder that lost a shard file is not read either, and is rebuilt.
  shard = [f for f in os.listdir(summary.data_path) if ".array_record-" in f][0]
  os.remove(os.path.join(summary.data_path, shard))
  with pytest.raises(DataError, match="lacks its shard file"):
    datasets.load_source(config, R)
  summary = prepare_data.prepare(str(images), str(out), resolution=R, workers=1)
  assert summary.removed_incomplete == [summary.data_path]
  assert len(datasets.load_source(config, R)) == 5


def _files(folder):
  """{relative path: content} of every file under `folder`."""
  return {os.path.relpath(os.path.join(root, f), folder): open(os.path.join(root, f), "rb").read()
          for root, _, files in os.walk(folder) for f in files}


def _interrupted_writer(cls, path, iterator):
  """array_record's writer, stopped by Ctrl-C half way through a shard."""
  del cls, iterator
  with open(os.fspath(path), "wb") as f:
    f.write(b"half a shard")
  raise KeyboardInterrupt


def test_a_failed_overwrite_leaves_the_old_dataset_as_it_was(tmp_path, capsys, monkeypatch):
  """--overwrite keeps the old dataset until the new one is complete: a rebuild that finds no
  readable image, or is interrupted, leaves it readable and unchanged; one that completes
  replaces it."""
  from tensorflow_datasets.core import file_adapters  # pylint: disable=import-outside-toplevel
  good, bad, out = tmp_path / "good", tmp_path / "bad", tmp_path / "out"
  make_image_folder(str(good), num_good=3, corrupt=False)
  bad.mkdir()
  (bad / "x.jpg").write_text("not an image")
  prepare_data.prepare(str(good), str(out), resolution=R, name="keep", workers=1)
  before = _files(out)
  assert cli.main(["prepare-data", "--input", str(bad), "--out", str(out), "--resolution", str(R),
                   "--workers", "1", "--name", "keep", "--overwrite"]) == 2
  assert "cspgan: error: none of the 1 image files" in capsys.readouterr().err
  assert _files(out) == before and os.listdir(out / "keep") == ["1.0.0"]
  assert len(tfds.data_source("keep", data_dir=str(out))["train"]) == 3
  with monkeypatch.context() as m:
    m.setattr(file_adapters.ArrayRecordFileAdapter, "write_examples",
              classmethod(_interrupted_writer))
    with pytest.raises(KeyboardInterrupt):
      prepare_data.prepare(str(good), str(out), resolution=R, name="keep", workers=1,
                           overwrite=True)
  assert _files(out) == before and os.listdir(out / "keep") == ["1.0.0"]
  make_image_folder(str(tmp_path / "two"), num_good=2, corrupt=False)
  summary = prepare_data.prepare(str(tmp_path / "two"), str(out), resolution=R, name="keep",
                                 workers=1, overwrite=True)
  assert f"replaced the dataset prepared before in {summary.data_path}" in summary.lines()
  assert len(tfds.data_source("keep", data_dir=str(out))["train"]) == 2
  assert os.listdir(out / "keep") == ["1.0.0"]  # no build folder left, nor the old dataset


def test_a_ctrl_c_between_the_swaps_renames_puts_the_old_dataset_back(tmp_path, monkeypatch):
  old, build = tmp_path / "keep" / "1.0.0", tmp_path / "keep" / "incomplete.x_1.0.0"
  (build / "keep" / "1.0.0").mkdir(parents=True)
  (build / "keep" / "1.0.0" / "metadata.json").write_text("new")
  old.mkdir()
  (old / "metadata.json").write_text("old")
  renames, rename = [], os.rename

  def interrupted_second(src, dst):
    renames.append(src)
    if len(renames) == 2:
      raise KeyboardInterrupt
    rename(src, dst)

  monkeypatch.setattr(os, "rename", interrupted_second)
  with pytest.raises(KeyboardInterrupt):
    prepare_data.swap_in(str(build / "keep" / "1.0.0"), str(old), str(build / "replaced"))
  assert (old / "metadata.json").read_text() == "old"


KILL_POINTS = {  # where a killed --overwrite leaves the old and the new dataset, in NAME/
    "before the first rename": ("1.0.0", "incomplete.k1_1.0.0/{name}/1.0.0"),
    "between the renames": ("replaced_1.0.0", "incomplete.k1_1.0.0/{name}/1.0.0"),
    "between, by a run before replaced_1.0.0": ("incomplete.k1_1.0.0/replaced",
                                                "incomplete.k1_1.0.0/{name}/1.0.0"),
    "after the second rename": ("replaced_1.0.0", "1.0.0"),
}


def test_an_overwrite_killed_at_any_point_loses_no_dataset(prepared, tmp_path, capsys):
  """A kill between the swap's two renames left the old dataset only in the build folder, which
  the next run removed as an interrupted run's leftover. Now it is put back, and the reader
  names it; no dataset goes until a complete one is in its place."""
  old = prepared["summary"].data_path  # 36 images
  make_image_folder(str(tmp_path / "two"), num_good=2, corrupt=False)
  new = prepare_data.prepare(str(tmp_path / "two"), str(tmp_path / "new"), resolution=R,
                             workers=1).data_path
  make_image_folder(str(tmp_path / "three"), num_good=3, corrupt=False)
  for i, (point, (old_at, new_at)) in enumerate(KILL_POINTS.items()):
    out = tmp_path / f"out{i}"
    parent, path, config = out / "celeba", out / "celeba" / "1.0.0", data_config(data_dir=str(out))
    (parent / "incomplete.k1_1.0.0" / "downloads").mkdir(parents=True)  # TFDS's, left empty
    shutil.copytree(old, parent / old_at)
    shutil.copytree(new, parent / new_at.format(name="celeba"))
    killed_between = point.startswith("between")
    if killed_between:
      with pytest.raises(DataError, match=f"^{path} is missing: an interrupted `cspgan "
                         f"prepare-data --overwrite` left what it held in {parent / old_at}; "
                         f"move it back to {path}, or run "):
        datasets.load_source(config, R)
    else:
      assert len(datasets.load_source(config, R)) == (2 if old_at == "replaced_1.0.0" else
                                                      NUM_GOOD), point
    kept = _files(parent / ("1.0.0" if new_at == "1.0.0" else old_at))
    argv = ["prepare-data", "--input", prepared["images"], "--out", str(out), "--resolution",
            str(R), "--workers", "1"]
    capsys.readouterr()
    assert cli.main(argv) == 2, point  # without --overwrite: refused, once the old one is back
    said = capsys.readouterr()
    assert said.err.strip().splitlines()[-1] == (
        f"cspgan: error: {path} already holds a prepared dataset; pass --overwrite to rebuild it "
        "or choose another --out or --name"), point
    assert (f"[prepare-data] put back {path}, which an interrupted --overwrite had left in "
            f"{parent / old_at}\n" in said.out) == killed_between, point
    assert _files(path) == kept, point
    if old_at == "replaced_1.0.0" and not killed_between:  # replaced as asked, but not unasked
      assert _files(parent / old_at) == _files(old), point
    argv[2] = str(tmp_path / "three")
    assert cli.main(argv + ["--overwrite"]) == 0, point
    assert len(datasets.load_source(config, R)) == 3, point
    assert os.listdir(parent) == ["1.0.0"], point  # no leftover, nor a dataset set aside


def test_what_an_overwrite_set_aside_is_never_removed_while_it_may_be_the_only_copy(tmp_path):
  """Put back whatever it is (here the user's file, which --overwrite was replacing), and where
  two are left, neither is moved: which to keep is the user's call."""
  images, parent = tmp_path / "imgs", tmp_path / "out" / "d"
  make_image_folder(str(images), num_good=1, corrupt=False)
  (parent / "incomplete.k1_1.0.0").mkdir(parents=True)
  (parent / "replaced_1.0.0").write_text("precious")
  (parent / "incomplete.k1_1.0.0" / "replaced").write_text("also precious")
  both = f"{parent}/replaced_1.0.0 and {parent}/incomplete.k1_1.0.0/replaced"
  run = lambda: prepare_data.prepare(str(images), str(tmp_path / "out"), resolution=R, name="d",
                                     workers=1)
  with pytest.raises(DataError, match=f"^{parent}/1.0.0 is missing, and interrupted `--overwrite` "
                     f"runs left what it held in {both}: move the one to keep to {parent}/1.0.0$"):
    run()
  with pytest.raises(DataError, match=f"left what it held in {both}; move the one to keep to "):
    datasets.load_source(data_config(name="d", data_dir=str(tmp_path / "out")), R)
  assert _files(parent) == {"replaced_1.0.0": b"precious",
                            "incomplete.k1_1.0.0/replaced": b"also precious"}
  os.remove(parent / "incomplete.k1_1.0.0" / "replaced")
  with pytest.raises(DataError, match=r"d/1.0.0 is not a dataset prepared by .* \(it is not a "
                     r"folder\): left as it is"):
    run()
  assert _files(parent) == {"1.0.0": b"precious"}  # put back; refused as a user's 1.0.0 is


def test_a_folder_prepare_data_did_not_write_is_never_removed(tmp_path, capsys):
  """Only what is provably ours (TFDS's incomplete.* folders, a 1.0.0 holding nothing but our
  builder's files) is rebuilt unasked; anything else stays, until --overwrite replaces it with a
  complete dataset."""
  images, out = tmp_path / "imgs", tmp_path / "out"
  make_image_folder(str(images), num_good=2, corrupt=False)
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "x.jpg").write_text("not an image")
  mine = out / "mine" / "1.0.0"
  mine.mkdir(parents=True)
  (mine / "important.txt").write_text("precious")
  argv = ["prepare-data", "--out", str(out), "--resolution", str(R), "--workers", "1",
          "--name", "mine"]
  assert cli.main(argv + ["--input", str(images)]) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if "error" in l]
  assert err == [f"cspgan: error: {mine} is not a dataset prepared by `cspgan prepare-data` (it "
                 "holds important.txt, a file our builder does not write): left as it is; move "
                 "it away, pass --overwrite to replace it, or choose another --out or --name"]
  assert _files(out) == {os.path.join("mine", "1.0.0", "important.txt"): b"precious"}
  # --overwrite replaces it, but only with a complete dataset
  assert cli.main(argv + ["--input", str(tmp_path / "bad"), "--overwrite"]) == 2
  assert _files(out) == {os.path.join("mine", "1.0.0", "important.txt"): b"precious"}
  capsys.readouterr()
  assert cli.main(argv + ["--input", str(images), "--overwrite"]) == 0
  assert f"replaced {mine}, which was not a prepared dataset (it holds important.txt" in (
      capsys.readouterr().out)
  assert len(tfds.data_source("mine", data_dir=str(out))["train"]) == 2
  # A file where the dataset's folder goes is not ours either.
  shutil.rmtree(mine)
  mine.write_text("precious")
  with pytest.raises(DataError, match=r"mine/1.0.0 is not a dataset prepared by .* \(it is not a "
                     r"folder\): left as it is"):
    prepare_data.prepare(str(images), str(out), resolution=R, name="mine", workers=1)
  assert mine.read_text() == "precious"
  (out / "other").write_text("precious")  # or where its NAME folder goes
  with pytest.raises(DataError, match=r"out/other is not a folder: the dataset 'other' needs one"):
    prepare_data.prepare(str(images), str(out), resolution=R, name="other", workers=1,
                         overwrite=True)
  assert (out / "other").read_text() == "precious"


def test_a_full_disk_is_one_line_and_leaves_no_partial_dataset(tmp_path, capsys, monkeypatch):
  """What array_record says when the disk fills (seen on a 200 KB tmpfs), raised by a writer
  that got half way: one line with the system's reason, and the partial shard removed."""
  from tensorflow_datasets.core import file_adapters  # pylint: disable=import-outside-toplevel

  def half_written(cls, path, iterator):
    del cls, iterator
    with open(os.fspath(path), "wb") as f:
      f.write(b"half a shard")
    raise RuntimeError(f'Failed to finalize writing of split "train": write() failed: No space '
                       f"left on device; writing {os.fspath(path)}; at byte 204800; Failed to "
                       "close chunk_writer")

  monkeypatch.setattr(file_adapters.ArrayRecordFileAdapter, "write_examples",
                      classmethod(half_written))
  images = tmp_path / "imgs"
  make_image_folder(str(images), num_good=3, corrupt=False)
  out = tmp_path / "out"
  assert cli.main(["prepare-data", "--input", str(images), "--out", str(out), "--resolution",
                   str(R), "--workers", "1"]) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("cspgan:")]
  assert err == [f"cspgan: error: cannot write the dataset in {out}: No space left on device "
                 "(errno 28)"]
  assert not [f for _, _, files in os.walk(out) for f in files]  # no partial file left


def test_ctrl_c_in_prepare_data_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
  from tensorflow_datasets.core import file_adapters  # pylint: disable=import-outside-toplevel

  def interrupted(cls, path, iterator):
    del cls, iterator
    with open(os.fspath(path), "wb") as f:
      f.write(b"half a shard")
    raise KeyboardInterrupt

  monkeypatch.setattr(file_adapters.ArrayRecordFileAdapter, "write_examples",
                      classmethod(interrupted))
  images = tmp_path / "imgs"
  make_image_folder(str(images), num_good=3, corrupt=False)
  out = tmp_path / "out"
  out.mkdir()
  (out / "other").mkdir()  # the user's: kept
  assert cli.main(["prepare-data", "--input", str(images), "--out", str(out), "--resolution",
                   str(R), "--workers", "1"]) == 130
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("cspgan")]
  assert err == ["cspgan: prepare-data interrupted"]
  assert sorted(os.listdir(out)) == ["other"]  # no partial shard, no empty celeba/ or downloads/


def test_io_reason_finds_what_the_system_said():
  assert errors.io_reason(OSError(28, "No space left on device", "/d")) == (
      "No space left on device: /d")
  assert errors.io_reason(ValueError(
      "Error writing \"x\" in OCDBT database: Failed to write 13054 bytes to file 14: No space "
      "left on device [os_error_code='28']")) == "No space left on device (errno 28)"
  wrapped = RuntimeError("could not save")
  wrapped.__cause__ = RuntimeError("write() failed: Read-only file system; writing /ro/x")
  assert errors.io_reason(wrapped) == "Read-only file system (errno 30)"
  assert errors.io_reason(ValueError("No examples were yielded")) is None


@pytest.mark.parametrize("args, message", [
    (["--input", "{tmp}/missing"], "input folder not found"),
    (["--input", "{tmp}/empty"], "no image files"),
    (["--input", "{tmp}/imgs", "--resolution", "48"], "--resolution 48 is not supported"),
    (["--input", "{tmp}/imgs", "--name", "mnist"], "TFDS catalogue"),
    (["--input", "{tmp}/imgs", "--name", "Bad-Name"], "lower_snake_case"),
    (["--input", "{tmp}/only_corrupt"], "none of the 1 image files"),
])
def test_prepare_data_errors_are_one_line(tmp_path, capsys, args, message):
  (tmp_path / "empty").mkdir()
  (tmp_path / "only_corrupt").mkdir()
  (tmp_path / "only_corrupt" / "x.jpg").write_bytes(b"nope")
  make_image_folder(str(tmp_path / "imgs"), num_good=1, corrupt=False)
  argv = ["prepare-data", "--out", str(tmp_path / "out"), "--workers", "1"]
  argv += [a.format(tmp=tmp_path) for a in args]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  errors = [line for line in err if "error" in line.lower()]  # progress bars may precede it
  assert errors == [err[-1]] and err[-1].startswith("cspgan: error: ") and message in err[-1]
  # Nothing left that a later run would take for a dataset (not even empty folders)
  assert not [d for _, d, f in os.walk(tmp_path / "out") if d or f]


def test_prepare_data_cli_prints_the_summary(tmp_path, capsys):
  make_image_folder(str(tmp_path / "imgs"), num_good=3)
  assert cli.main(["prepare-data", "--input", str(tmp_path / "imgs"), "--out",
                   str(tmp_path / "out"), "--resolution", "32", "--workers", "1"]) == 0
  out = capsys.readouterr().out
  assert "wrote 3 images (train 3) at 32x32" in out
  assert "skipped 2 unreadable images: corrupt.jpg" in out and "images/s" in out


# ---- reading for training ----

def test_reader_errors_name_the_problem(prepared, tmp_path):
  with pytest.raises(DataError, match=r"no prepared dataset 'faces' in .* \(found: celeba\)"):
    datasets.load_source(data_config(name="faces", data_dir=prepared["out"]), R)
  with pytest.raises(DataError, match="holds 32x32 images, the model needs 64x64"):
    datasets.load_source(data_config(data_dir=prepared["out"]), 64)
  with pytest.raises(DataError, match="data_dir not found"):
    datasets.load_source(data_config(data_dir=str(tmp_path / "nowhere")), R)
  with pytest.raises(DataError, match="has no split 'test'"):
    datasets.load_source(data_config(data_dir=prepared["out"], split="test"), R)


def test_a_data_dir_that_is_a_file_is_named_so(tmp_path, monkeypatch):
  (tmp_path / "file").write_text("")
  message = (r"data_dir is not a folder: .*file; set --config.data.data_dir \(or TFDS_DATA_DIR\) "
             "to the folder")
  with pytest.raises(DataError, match=message):
    datasets.load_source(data_config(data_dir=str(tmp_path / "file")), R)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "file"))
  with pytest.raises(DataError, match=message):
    datasets.load_source(data_config(data_dir=""), R)


def test_damaged_dataset_files_are_one_clear_error(prepared, tmp_path):
  """A truncated shard fails where it is read, a broken features.json where it is opened."""
  import shutil  # pylint: disable=import-outside-toplevel
  out = str(tmp_path / "tfds")
  shutil.copytree(prepared["out"], out)
  path = os.path.join(out, "celeba", prepare_data.DATASET_VERSION)
  shard = next(os.path.join(path, f) for f in os.listdir(path) if ".array_record-" in f)
  os.truncate(shard, os.path.getsize(shard) // 2)
  source = datasets.load_source(data_config(data_dir=out), R)
  with pytest.raises(DataError, match=r"cannot read celeba/train from .*: RuntimeError: .*; its "
                     r"files are damaged: prepare it again \(`cspgan prepare-data \.\.\. --overwrite`\)"):
    source.get(list(range(len(source))))
  with open(os.path.join(path, "features.json"), "w") as f:
    f.write("{")
  with pytest.raises(DataError, match=r"celeba/1.0.0 cannot be read as a TFDS dataset "
                     r"\(JSONDecodeError: .*\): prepare it again"):
    datasets.load_source(data_config(data_dir=out), R)


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorflow") is not None,
                    reason="TensorFlow installed: the official route would start a download")
def test_official_celeb_a_without_tensorflow_is_one_clear_error(tmp_path):
  with pytest.raises(DataError, match="'celeb_a' needs TensorFlow to build"):
    datasets.load_source(data_config(name="celeb_a", data_dir=str(tmp_path)), R)
  assert not os.path.exists(tmp_path / "celeb_a")  # no half-started download left behind


def test_data_dir_may_start_with_a_tilde(prepared, monkeypatch):
  # --config.data.data_dir=~/... reaches us unexpanded: the shell expands no "~" after "=".
  monkeypatch.setenv("HOME", os.path.dirname(prepared["out"]))
  source = datasets.load_source(data_config(data_dir="~/" + os.path.basename(prepared["out"])), R)
  assert len(source) == NUM_GOOD


def test_tfds_source_limits_and_reads_in_any_order(prepared):
  source = datasets.load_source(data_config(data_dir=prepared["out"], num_examples=10), R)
  assert len(source) == 10
  full = tfds.data_source("celeba", data_dir=prepared["out"])["train"]
  got = source.get([7, 2, 7])
  assert got.shape == (3, R, R, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got[1], full[2]["image"])
  np.testing.assert_array_equal(got[0], got[2])
  with pytest.raises(IndexError):
    source.get([10])


def test_full_size_images_go_through_the_seeds_transform():
  """A catalogue dataset (e.g. official celeb_a, 218x178) is transformed on the host."""
  rng = np.random.default_rng(2)
  raw = [np.asarray(_smooth_image(rng, 178, 218)) for _ in range(3)]

  class FakeSource:
    def __len__(self):
      return len(raw)

    def __getitems__(self, idx):
      return [{"image": raw[i]} for i in idx]

  # greyscale ones too, (H, W) or (H, W, 1), as PIL's convert("RGB") makes them
  grey = np.asarray(_smooth_image(rng, 178, 218).convert("L"))
  raw += [grey, grey[..., None]]
  source = datasets.TfdsSource(FakeSource(), R, "fake")
  got = source.get([2, 0, 3, 4])
  for g, i in zip(got, [2, 0, 3, 4]):
    pil = Image.fromarray(raw[i] if raw[i].ndim == 2 or raw[i].shape[-1] == 3 else raw[i][..., 0])
    np.testing.assert_array_equal(g, preprocess.resize_and_crop(pil, R))


def test_to_unit_range_is_torchvision_normalize():
  torch = pytest.importorskip("torch")
  x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
  theirs = ((torch.from_numpy(x).float().div(255)).sub(0.5)).div(0.5).numpy()
  ours = np.asarray(input_pipeline.to_unit_range(x))
  np.testing.assert_array_equal(ours, theirs)
  # Also inside a compiled step, where XLA is free to rewrite a division by a constant.
  np.testing.assert_array_equal(np.asarray(jax.jit(input_pipeline.to_unit_range)(x)), theirs)
  assert ours.min() == -1.0 and ours.max() == 1.0


def _indexed_source(n):
  """Image i carries i in its pixels, so a batch says which examples it holds."""
  images = np.zeros((n, 8, 8, 3), np.uint8)
  images[:, :, :, 0] = (np.arange(n) // 256)[:, None, None]
  images[:, :, :, 1] = (np.arange(n) % 256)[:, None, None]
  return datasets.ArraySource(images, "indexed")


def _ids(batch):
  batch = np.asarray(batch)
  return batch[..., 0, 0, 0].astype(np.int64) * 256 + batch[..., 0, 0, 1]


def test_read_all_reads_every_chunk_in_order():
  source = _indexed_source(10)
  indices = np.array([9, 0, 4, 7, 1, 8, 2])
  np.testing.assert_array_equal(_ids(datasets.read_all(source, indices, chunk=3)), indices)


def test_each_process_holds_its_own_devices_shards(monkeypatch):
  """Process 1 of two, four devices each: global shards 4-7 (process 0 holds 0-3)."""
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(jax, "local_device_count", lambda: 4)
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  lay = input_pipeline.make_layout(203, 32)
  assert (lay.num_shards, lay.first_shard, lay.local_shards) == (8, 4, 4)
  np.testing.assert_array_equal(lay.local_shard_ids(), [4, 5, 6, 7])


def test_the_configs_data_seeds_are_the_ones_used(tiny_config):
  """data.synthetic_seed draws the faces and data.shuffle_seed orders every epoch; both are 0
  in every shipped config, as train.seed is, so a mix-up would not show there."""
  config = tiny_config("data.pipeline=streaming", "data.shuffle_seed=7", "data.synthetic_seed=3")
  inp = input_pipeline.make_input(config)
  lay = inp.layout
  faces = synthetic.cartoon_faces(config.data.num_examples, R, seed=3)
  positions = lambda seed, step: np.asarray(input_pipeline.batch_positions(
      seed, step, 0, shard_size=lay.shard_size, per_device_batch=lay.per_device_batch,
      steps_per_epoch=lay.steps_per_epoch))
  for step in (0, lay.steps_per_epoch + 1):
    np.testing.assert_array_equal(inp.host_batch(step)[0],
                                  faces[lay.shard_indices(0)[positions(7, step)]])
    assert not np.array_equal(positions(7, step), positions(0, step))
  assert not np.array_equal(faces, synthetic.cartoon_faces(config.data.num_examples, R, seed=0))


def test_layout_and_its_errors():
  lay = input_pipeline.make_layout(103, 8, num_shards=4, first_shard=0, local_shards=4)
  assert (lay.shard_size, lay.per_device_batch, lay.steps_per_epoch, lay.used_examples) == (25, 2, 12, 96)
  all_indices = np.concatenate([lay.shard_indices(s) for s in range(4)])
  assert len(set(all_indices.tolist())) == 100 and all_indices.max() < 103
  with pytest.raises(ConfigError, match="does not divide evenly over 4 devices"):
    input_pipeline.make_layout(103, 6, num_shards=4, first_shard=0, local_shards=4)
  with pytest.raises(DataError, match="fewer than one batch"):
    input_pipeline.make_layout(7, 8, num_shards=1, first_shard=0, local_shards=1)


def test_device_resident_and_streaming_give_identical_batches(prepared):
  source = datasets.load_source(data_config(data_dir=prepared["out"]), R)
  layout = input_pipeline.make_layout(len(source), 8)
  seed = 3
  resident = input_pipeline.DeviceResidentInput(source, layout, seed)
  streaming = input_pipeline.StreamingInput(source, layout, seed)
  gather = jax.jit(resident.batch_fn())
  steps = 2 * layout.steps_per_epoch + 1  # across two epoch boundaries
  streamed = list(streaming.batches(0, steps))
  seen = []
  for step in range(steps):
    on_device = gather(resident.images[0], resident.shard_ids[0], np.int32(step))
    from_host = input_pipeline.to_unit_range(streamed[step][0])
    np.testing.assert_array_equal(np.asarray(on_device), np.asarray(from_host))
    np.testing.assert_array_equal(np.asarray(streamed[step][0]), streaming.host_batch(step)[0])
    seen.append(np.asarray(on_device))
  # An epoch visits distinct examples; the next epoch visits them in another order.
  epoch = np.concatenate(seen[:layout.steps_per_epoch]).reshape(layout.steps_per_epoch * 8, -1)
  assert len({row.tobytes() for row in epoch}) == len(epoch)
  assert not np.array_equal(seen[0], seen[layout.steps_per_epoch])


def test_epoch_order_depends_on_seed_and_epoch_only():
  source = _indexed_source(64)
  layout = input_pipeline.make_layout(64, 8, num_shards=1, first_shard=0, local_shards=1)
  a = input_pipeline.StreamingInput(source, layout, seed=0)
  b = input_pipeline.StreamingInput(source, layout, seed=0)
  c = input_pipeline.StreamingInput(source, layout, seed=1)
  epoch0 = np.concatenate([_ids(a.host_batch(s)[0]) for s in range(8)])
  assert sorted(epoch0.tolist()) == list(range(64))
  np.testing.assert_array_equal(_ids(b.host_batch(13)[0]), _ids(a.host_batch(13)[0]))
  assert not np.array_equal(_ids(c.host_batch(0)[0]), _ids(a.host_batch(0)[0]))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 4097])
def test_epoch_order_is_a_permutation_that_changes_with_epoch_seed_and_shard(n):
  order = lambda seed, epoch, shard: np.asarray(jax.jit(
      input_pipeline.epoch_order, static_argnums=(0, 4))(seed, epoch, shard, np.arange(n), n))
  base = order(0, 0, 0)
  assert sorted(base.tolist()) == list(range(n))
  if n >= 64:
    for other in (order(0, 1, 0), order(1, 0, 0), order(0, 0, 1)):
      assert sorted(other.tolist()) == list(range(n))
      assert np.mean(other != base) > 0.9
    # Shuffled, not shifted: position and example are uncorrelated.
    assert abs(np.corrcoef(np.arange(n), base)[0, 1]) < 0.3


def test_pipeline_choice_follows_the_budget():
  layout = input_pipeline.make_layout(1000, 8, num_shards=1, first_shard=0, local_shards=1)
  shape = (128, 128, 3)  # 1000 images: 47 MiB
  assert input_pipeline.choose_pipeline(data_config(device_budget_gb=1.0), layout, shape) == "device"
  assert input_pipeline.choose_pipeline(data_config(device_budget_gb=0.01), layout, shape) == "streaming"
  assert input_pipeline.choose_pipeline(data_config(pipeline="device", device_budget_gb=0.01),
                                        layout, shape) == "device"
  with pytest.raises(ConfigError, match="data.pipeline must be one of"):
    input_pipeline.choose_pipeline(data_config(pipeline="gpu"), layout, shape)


def test_make_input_uses_synthetic_faces_by_config(tiny_config):
  config = tiny_config()
  config.data.pipeline = "device"
  resident = input_pipeline.make_input(config)
  assert resident.kind == "device"
  assert resident.images.shape == (1, config.data.num_examples, 32, 32, 3)
  config.data.pipeline = "streaming"
  streaming = input_pipeline.make_input(config)
  batch = next(iter(streaming.batches(5, 1)))
  gather = jax.jit(resident.batch_fn())
  np.testing.assert_array_equal(
      np.asarray(gather(resident.images[0], resident.shard_ids[0], np.int32(5))),
      np.asarray(input_pipeline.to_unit_range(batch[0])))


FOUR_DEVICES = r"""
import jax, numpy as np
from cspgan_jax import datasets, input_pipeline
assert jax.local_device_count() == 4
n = 203
images = np.zeros((n, 8, 8, 3), np.uint8)
images[..., 0] = (np.arange(n) // 256)[:, None, None]
images[..., 1] = (np.arange(n) % 256)[:, None, None]
source = datasets.ArraySource(images, "indexed")
ids = lambda b: np.asarray(b)[..., 0, 0, 0].astype(int) * 256 + np.asarray(b)[..., 0, 0, 1]
result = {}
# This process alone (4 shards), and as process 1 of 2 (shards 4..7 of 8).
for name, kw in [("single", {}), ("second_host", dict(num_shards=8, first_shard=4, local_shards=4))]:
  layout = input_pipeline.make_layout(n, 16 if not kw else 32, **kw)
  resident = input_pipeline.DeviceResidentInput(source, layout, seed=5)
  held = [sorted(ids(s.data[0]).tolist()) for s in
          sorted(resident.images.addressable_shards, key=lambda s: s.index[0].start)]
  pmapped = jax.pmap(resident.batch_fn(), in_axes=(0, 0, None))
  streaming = input_pipeline.StreamingInput(source, layout, seed=5)
  batches = []
  for step in range(layout.steps_per_epoch + 2):
    dev = np.asarray(pmapped(resident.images, resident.shard_ids, np.int32(step)))
    host = np.asarray(input_pipeline.to_unit_range(streaming.host_batch(step)))
    assert np.array_equal(dev, host), (name, step)
    batches.append(np.asarray(ids(((dev + 1) / 2 * 255).round().astype(np.uint8))).tolist())
  result[name] = dict(held=held, batches=batches, steps=layout.steps_per_epoch,
                      shard_size=layout.shard_size)
import json; print("RESULT" + json.dumps(result))
"""


def test_four_devices_each_draw_from_a_disjoint_shard():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", FOUR_DEVICES], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split("RESULT", 1)[1])
  for name, num_shards, first in [("single", 4, 0), ("second_host", 8, 4)]:
    r = result[name]
    shard_size = 203 // num_shards
    assert r["shard_size"] == shard_size
    # Each device holds exactly its shard, in memory on that device.
    assert r["held"] == [[first + d + k * num_shards for k in range(shard_size)] for d in range(4)]
    for step_batches in r["batches"]:
      per_device = [set(b) for b in step_batches]
      for d, ids in enumerate(per_device):
        # Device d only ever sees its own shard: examples first + d (mod num_shards).
        assert all(i % num_shards == first + d and i < shard_size * num_shards for i in ids)
      assert len(set().union(*per_device)) == sum(len(b) for b in step_batches)
    # Over one epoch each device visits distinct examples of its shard.
    for d in range(4):
      epoch = [i for step in r["batches"][:r["steps"]] for i in step[d]]
      assert len(epoch) == len(set(epoch))
