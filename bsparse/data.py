"""Image classification data: in-memory splits and deterministic grain batches.

Splits are read whole into memory as ``Split(image=uint8 (N, H, W, C), label=int32 (N,))``,
a dict that remembers its dataset (for the normalisation statistics), from TFDS
(``tfds.data_source``: array_record files, no TensorFlow needed to read) or, for
Fashion-MNIST, from the Debian package ``dataset-fashion-mnist`` (MNIST idx files).

Training batches come from a ``grain.MapDataset`` whose element ``t`` is the batch of
global step ``t``: a pure function of ``(seed, t)``, so a resumed run sees exactly the
data it would have seen. ``batch_size`` is always the global batch; with several
processes each one yields its contiguous slice of the same global batch.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
import socket
import sys
import urllib.parse
from typing import Any, Iterator, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

Arrays = dict[str, np.ndarray]

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
SOURCES = ("auto", "tfds", "debian")
CROP_PADDING = 4

_DEBIAN_PREFIX = {"train": "train", "test": "t10k"}
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
_CONNECT_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class _Spec:
  image_shape: tuple[int, int, int]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  url: str  # where TFDS downloads the raw files from


_SPECS = {
    "mnist": _Spec((28, 28, 1), 10, (0.1307,), (0.3081,),
                   "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    "fashion_mnist": _Spec((28, 28, 1), 10, (0.2860,), (0.3530,),
                           "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
    "cifar10": _Spec((32, 32, 3), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                     "https://www.cs.toronto.edu/~kriz/"),
    "cifar100": _Spec((32, 32, 3), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                      "https://www.cs.toronto.edu/~kriz/"),
}
DATASETS = tuple(_SPECS)


class DatasetUnavailableError(RuntimeError):
  """The dataset is not on this machine and could not be downloaded."""


class Split(dict):
  """``dict(image=..., label=...)`` of one split that remembers its dataset's name.

  The batch functions take their normalisation statistics from ``dataset``.
  """

  def __init__(self, dataset: str, **arrays: np.ndarray):
    super().__init__(**arrays)
    self.dataset = dataset


@dataclasses.dataclass(frozen=True)
class Datasets:
  """In-memory splits of one dataset; ``val`` is None when none was carved out."""
  name: str
  train: Split
  val: Split | None
  test: Split
  num_classes: int
  image_shape: tuple[int, int, int]


# --------------------------------------------------------------------------- loading


def _spec(name: str) -> _Spec:
  if name not in _SPECS:
    raise ValueError(f"Unknown dataset {name!r}. Valid names: {', '.join(DATASETS)}.")
  return _SPECS[name]


def read_idx(path: str) -> np.ndarray:
  """Reads an unsigned-byte MNIST idx file (optionally gzip-compressed) into an array."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
    raise ValueError(f"{path}: not an unsigned-byte idx file (header {raw[:4].hex()}).")
  ndim = raw[3]
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  return np.frombuffer(raw, np.uint8, count=math.prod(shape), offset=4 + 4 * ndim).reshape(shape)


def _debian_paths(split: str) -> tuple[str, str]:
  prefix = _DEBIAN_PREFIX[split]
  return (os.path.join(DEBIAN_DIR, f"{prefix}-images-idx3-ubyte.gz"),
          os.path.join(DEBIAN_DIR, f"{prefix}-labels-idx1-ubyte.gz"))


def _debian_available() -> bool:
  return all(os.path.exists(p) for split in _DEBIAN_PREFIX for p in _debian_paths(split))


def _load_debian(name: str, split: str) -> Split:
  """Reads Fashion-MNIST from the idx files of the Debian package."""
  if name != "fashion_mnist":
    raise ValueError(f"source='debian' provides only fashion_mnist, not {name!r}.")
  if split not in _DEBIAN_PREFIX:
    raise ValueError(f"source='debian' has splits {sorted(_DEBIAN_PREFIX)}, not {split!r}.")
  if not _debian_available():
    raise DatasetUnavailableError(
        f"Fashion-MNIST idx files not found in {DEBIAN_DIR}. Install them with "
        "`apt-get install dataset-fashion-mnist`, or use source='tfds' with a prepared "
        "--config.dataset.data_dir.")
  images, labels = (read_idx(p) for p in _debian_paths(split))
  return Split(name, image=images[..., None], label=labels.astype(np.int32))


def _reachable(url: str) -> bool:
  """Whether a TCP connection to the host of ``url`` opens within a few seconds."""
  parts = urllib.parse.urlsplit(url)
  port = parts.port or (443 if parts.scheme == "https" else 80)
  try:
    with socket.create_connection((parts.hostname, port), timeout=_CONNECT_TIMEOUT_S):
      return True
  except OSError:
    return False


def _unavailable(name: str, data_dir: str | None, reason: str) -> DatasetUnavailableError:
  """The error for a TFDS dataset that is neither prepared nor downloadable."""
  where = tfds.builder(name, data_dir=data_dir).data_dir
  lines = [f"Dataset {name!r} is not prepared at {where} and was not downloaded: {reason}.",
           "To get it:"]
  if name == "fashion_mnist":
    lines.append("  - `apt-get install dataset-fashion-mnist`, then use source='auto' or "
                 "'debian' (no TFDS needed);")
  lines.append(f"  - on a machine with internet and TensorFlow run `tfds build {name} "
               "--file_format=array_record --data_dir=DIR`, copy DIR here and pass "
               "--config.dataset.data_dir=DIR (or set TFDS_DATA_DIR).")
  return DatasetUnavailableError("\n".join(lines))


def _tfds_source(name: str, split: str, data_dir: str | None, download: bool) -> Sequence[Any]:
  """Opens a TFDS split as a random-access source, downloading it only if asked.

  TFDS retries an unreachable host for minutes, so the host is probed first.
  """
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception:
    if tfds.builder(name, data_dir=data_dir).is_prepared():
      raise  # the data is there: a genuine error, not a missing dataset
  if not download:
    raise _unavailable(name, data_dir, "download=False")
  url = _SPECS[name].url
  if not _reachable(url):
    raise _unavailable(name, data_dir, f"no connection to {urllib.parse.urlsplit(url).hostname}")
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=True)
  except Exception as err:  # any download/prepare failure becomes the explanation
    cause = (str(err).splitlines() or [""])[0][:300]
    raise _unavailable(name, data_dir, f"{type(err).__name__}: {cause}") from None


def _load_tfds(name: str, split: str, data_dir: str | None, download: bool) -> Split:
  """Reads every record of a TFDS split into memory.

  Record by record, the access that ``tfds.testing.mock_data`` (tfds 4.9.10) mocks
  correctly; its batched ``__getitems__`` is broken, though ~2x faster on real data.
  """
  source = _tfds_source(name, split, data_dir, download)
  images = np.empty((len(source), *_SPECS[name].image_shape), np.uint8)
  labels = np.empty((len(source),), np.int32)
  for i in range(len(source)):
    example = source[i]
    images[i] = example["image"]
    labels[i] = example["label"]
  return Split(name, image=images, label=labels)


def load_split(name: str, split: str, *, source: str = "auto", data_dir: str | None = None,
               download: bool = True) -> Split:
  """Loads a whole split as ``Split(image=uint8 (N, H, W, C), label=int32 (N,))``.

  ``source``: 'tfds', 'debian' (Fashion-MNIST idx files of the Debian package) or 'auto'
  (Debian files for Fashion-MNIST when installed, TFDS otherwise). ``download``: whether
  TFDS may try to download and prepare a dataset missing from ``data_dir``. Raises
  DatasetUnavailableError, with instructions, when the data is neither here nor
  downloadable.
  """
  _spec(name)
  if source not in SOURCES:
    raise ValueError(f"Unknown source {source!r}. Valid sources: {', '.join(SOURCES)}.")
  if source == "debian" or (source == "auto" and name == "fashion_mnist" and _debian_available()):
    return _load_debian(name, split)
  return _load_tfds(name, split, data_dir, download)


def _subset(arrays: Arrays, idx: np.ndarray) -> Arrays:
  """The examples ``idx`` of ``arrays``, keeping the Split type and dataset name."""
  out = {k: v[idx] for k, v in arrays.items()}
  return Split(arrays.dataset, **out) if isinstance(arrays, Split) else out


def split_validation(arrays: Arrays, val_size: int, seed: int) -> tuple[Arrays, Arrays | None]:
  """Splits off the last ``val_size`` examples of a seeded permutation as validation.

  Returns ``(train, val)``; ``val`` is None when ``val_size`` is 0. Both keep the
  original example order.
  """
  n = len(arrays["label"])
  if not 0 <= val_size < n:
    raise ValueError(f"val_size must be in [0, {n}) for a split of {n} examples, got {val_size}.")
  if val_size == 0:
    return arrays, None
  perm = np.random.default_rng(seed).permutation(n)
  return (_subset(arrays, np.sort(perm[:n - val_size])),
          _subset(arrays, np.sort(perm[n - val_size:])))


def get_datasets(config) -> Datasets:
  """Loads train/val/test for ``config.dataset`` (name, source, data_dir, val_size).

  Validation is carved from train with ``config.seed``; the test split is meant for the
  final number only. ``config.dataset.download`` (optional, default True) lets TFDS try
  to download. ``config.dataset.augment`` is for the caller to pass to train_batches.
  """
  cfg = config.dataset
  spec = _spec(cfg.name)
  kwargs = dict(source=cfg.source, data_dir=cfg.data_dir, download=cfg.get("download", True))
  train, val = split_validation(load_split(cfg.name, "train", **kwargs), cfg.val_size,
                                config.seed)
  return Datasets(name=cfg.name, train=train, val=val,
                  test=load_split(cfg.name, "test", **kwargs),
                  num_classes=spec.num_classes, image_shape=spec.image_shape)


# --------------------------------------------------------------------------- batches


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Training steps in one epoch (the last partial batch is dropped)."""
  return num_examples // batch_size


def _process_slice(batch_size: int, process_index: int, process_count: int) -> slice:
  """This process's contiguous part of a global batch."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
  if batch_size % process_count:
    raise ValueError(f"Global batch size {batch_size} is not divisible by the "
                     f"{process_count} processes.")
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def _normalizer(arrays: Arrays, mean: Sequence[float] | None, std: Sequence[float] | None):
  """Returns ``f(uint8 images) = (images / 255 - mean) / std`` as float32.

  ``mean``/``std`` (per channel, 0..1 scale) default to the statistics of the dataset a
  Split comes from.
  """
  if mean is None or std is None:
    if not isinstance(arrays, Split):
      raise ValueError("Pass mean= and std= for arrays that are not a Split from load_split.")
    spec = _spec(arrays.dataset)
    mean = spec.mean if mean is None else mean
    std = spec.std if std is None else std
  channels = arrays["image"].shape[-1]
  if not len(mean) == len(std) == channels:
    raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need one value per channel "
                     f"({channels}).")
  scale = (1.0 / (255.0 * np.asarray(std))).astype(np.float32)
  offset = (-np.asarray(mean) / np.asarray(std)).astype(np.float32)

  def normalize(images: np.ndarray) -> np.ndarray:
    # On flattened images, with the per-channel factors tiled over the pixels: numpy is
    # ~10x slower broadcasting over a last axis of 3 channels.
    out = images.reshape(len(images), -1).astype(np.float32)
    pixels = out.shape[1] // len(scale)
    out *= np.tile(scale, pixels)
    out += np.tile(offset, pixels)
    return out.reshape(images.shape)

  return normalize


def crop_flip(images: np.ndarray, rng: np.random.Generator, batch_size: int,
              part: slice = slice(None)) -> np.ndarray:
  """CIFAR-style augmentation: random crop of the zero-padded image, then random h-flip.

  The offsets and flips are drawn for all ``batch_size`` examples of the global batch
  and ``part`` of them is applied to ``images``, so every process of a multi-process
  run augments its slice exactly as a single process would.
  """
  p = CROP_PADDING
  oy, ox = rng.integers(0, 2 * p + 1, size=(2, batch_size))[:, part]
  flip = (rng.random(batch_size) < 0.5)[part]
  b, h, w, c = images.shape
  padded = np.zeros((b, h + 2 * p, w + 2 * p, c), images.dtype)
  padded[:, p:p + h, p:p + w] = images
  out = np.empty_like(images)
  for i in range(b):  # per-image slices beat one fancy-indexed gather
    crop = padded[i, oy[i]:oy[i] + h, ox[i]:ox[i] + w]
    out[i] = crop[:, ::-1] if flip[i] else crop
  return out


def _epoch_order(num_examples: int, seed: int):
  """Returns ``order(epoch)``: the seeded permutation of the examples for that epoch."""
  @functools.lru_cache(maxsize=2)
  def order(epoch: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch)).permutation(num_examples)
  return order


def train_dataset(arrays: Arrays, *, batch_size: int, seed: int, augment: bool = False,
                  process_index: int = 0, process_count: int = 1,
                  mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> grain.MapDataset:
  """Infinite random-access dataset whose element ``t`` is this process's batch of step ``t``.

  Each epoch is a fresh seeded permutation of the examples cut into ``batch_size``
  batches (the remainder is dropped). Batches are ``dict(image=float32 NHWC,
  label=int32)``, normalised with the per-channel ``mean``/``std`` (default: those of
  the Split's dataset); the augmentation of batch ``t`` depends only on ``(seed, t)``.
  One grain element is one batch, gathered and transformed with vectorised numpy.
  """
  n = len(arrays["label"])
  if n < batch_size:
    raise ValueError(f"batch_size {batch_size} is larger than the {n} training examples.")
  part = _process_slice(batch_size, process_index, process_count)
  steps = steps_per_epoch(n, batch_size)
  order = _epoch_order(n, seed)
  images, labels = arrays["image"], arrays["label"]
  normalize = _normalizer(arrays, mean, std)

  def gather(step: int) -> Arrays:
    epoch, k = divmod(step, steps)
    idx = order(epoch)[k * batch_size:(k + 1) * batch_size][part]
    return dict(image=images[idx], label=labels[idx])

  ds = grain.MapDataset.range(sys.maxsize).seed(seed).map(gather)
  if augment:
    ds = ds.random_map(
        lambda b, rng: dict(b, image=crop_flip(b["image"], rng, batch_size, part)))
  return ds.map(lambda b: dict(image=normalize(b["image"]), label=b["label"]))


def train_batches(arrays: Arrays, *, batch_size: int, seed: int, start_step: int = 0,
                  augment: bool = False, process_index: int = 0, process_count: int = 1,
                  mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> Iterator[Arrays]:
  """Yields the training batches of steps ``start_step, start_step + 1, ...`` forever.

  Batch ``t`` is element ``t`` of train_dataset, whatever ``start_step`` is; batches
  are prepared ahead in background threads.
  """
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  ds = train_dataset(arrays, batch_size=batch_size, seed=seed, augment=augment,
                     process_index=process_index, process_count=process_count,
                     mean=mean, std=std)
  return iter(ds[start_step:].to_iter_dataset(_READ_OPTIONS))


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  """Evaluation batches needed to cover every example (the last one padded)."""
  return math.ceil(num_examples / batch_size)


def eval_batches(arrays: Arrays, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> Iterator[Arrays]:
  """Yields every example exactly once, in order, in batches of static shape.

  Global batch ``k`` holds examples ``k*batch_size ... (k+1)*batch_size - 1``; the last
  one is padded past the end with all-zero (normalised) images and label 0. ``mask``
  (float32) is 1 for real examples and 0 for padding. Each process yields its slice of
  every global batch, so all processes yield num_eval_batches batches and together
  cover the split once.
  """
  n = len(arrays["label"])
  part = _process_slice(batch_size, process_index, process_count)
  positions = np.arange(batch_size)[part]
  normalize = _normalizer(arrays, mean, std)

  def batch(k: int) -> Arrays:
    pos = k * batch_size + positions
    mask = pos < n
    idx = np.minimum(pos, n - 1)
    image = normalize(arrays["image"][idx]) * mask[:, None, None, None]
    return dict(image=image, label=arrays["label"][idx] * mask,
                mask=mask.astype(np.float32))

  ds = grain.MapDataset.range(num_eval_batches(n, batch_size)).map(batch)
  return iter(ds.to_iter_dataset(_READ_OPTIONS))
