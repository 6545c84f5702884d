"""Data loading and the deterministic, resumable, shardable batch pipelines."""
import io
import itertools
import os

import ml_collections
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import registered

from bsparse import data


def id_split(n, shape=(6, 6, 1), dataset="mnist"):
  """A Split whose label is the example id and whose pixels encode it too."""
  image = (np.arange(n, dtype=np.int64)[:, None, None, None] + np.zeros(shape, np.int64)) % 251
  return data.Split(dataset, image=image.astype(np.uint8), label=np.arange(n, dtype=np.int32))


def take(it, k):
  return list(itertools.islice(it, k))


def batches_equal(xs, ys):
  return len(xs) == len(ys) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(xs, ys))


def config(name, source, val_size):
  return ml_collections.ConfigDict(dict(seed=0, dataset=dict(
      name=name, source=source, data_dir=None, val_size=val_size, augment=False)))


# --------------------------------------------------------------------------- loading


@pytest.mark.skipif(not os.path.isdir(data.DEBIAN_DIR),
                    reason=f"{data.DEBIAN_DIR} absent: apt-get install dataset-fashion-mnist")
def test_debian_fashion_mnist():
  train = data.load_split("fashion_mnist", "train", source="debian")
  test = data.load_split("fashion_mnist", "test")  # 'auto' picks the Debian files
  assert train["image"].shape == (60000, 28, 28, 1) and test["image"].shape == (10000, 28, 28, 1)
  for split in (train, test):
    assert split["image"].dtype == np.uint8 and split["label"].dtype == np.int32
    assert split["label"].min() == 0 and split["label"].max() == 9
    assert split.dataset == "fashion_mnist"
  assert np.bincount(train["label"]).tolist() == [6000] * 10
  mean = train["image"].mean() / 255
  assert abs(mean - data._SPECS["fashion_mnist"].mean[0]) < 1e-3


def test_read_idx_rejects_other_files(tmp_path):
  path = tmp_path / "x.idx"
  path.write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + bytes(12))  # float32 idx
  with pytest.raises(ValueError, match="unsigned-byte idx"):
    data.read_idx(str(path))


@pytest.mark.parametrize("name,shape,classes", [("cifar10", (32, 32, 3), 10),
                                                ("mnist", (28, 28, 1), 10)])
def test_tfds_mock_load_split(name, shape, classes):
  with tfds.testing.mock_data(num_examples=12):
    split = data.load_split(name, "train", source="tfds")
  assert split["image"].shape == (12, *shape) and split["image"].dtype == np.uint8
  assert split["label"].shape == (12,) and split["label"].dtype == np.int32
  assert 0 <= split["label"].min() and split["label"].max() < classes


def test_tfds_mock_get_datasets():
  with tfds.testing.mock_data(num_examples=20):
    ds = data.get_datasets(config("cifar10", "auto", val_size=5))
  assert ds.num_classes == 10 and ds.image_shape == (32, 32, 3) and ds.name == "cifar10"
  assert len(ds.train["label"]) == 15 and len(ds.val["label"]) == 5
  assert len(ds.test["label"]) == 20
  assert ds.train.dataset == ds.val.dataset == "cifar10"


def _png(image):
  f = io.BytesIO()
  PIL.Image.fromarray(image[..., 0]).save(f, format="PNG")
  return f.getvalue()


@pytest.fixture(scope="module")
def prepared_mnist(tmp_path_factory):
  """A real array_record TFDS 'mnist' directory (7 random test images), made offline."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  images = np.random.default_rng(0).integers(0, 256, (7, 28, 28, 1), dtype=np.uint8)

  with registered.skip_registration():
    class Mnist(tfds.core.GeneratorBasedBuilder):  # pylint: disable=unused-variable
      VERSION = tfds.core.Version("3.0.1")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            dict(image=tfds.features.Image(shape=(28, 28, 1)),
                 label=tfds.features.ClassLabel(num_classes=10))))

      def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

      def _generate_examples(self):
        for i, image in enumerate(images):
          yield i, dict(image=_png(image), label=i)

    Mnist(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir, images


def test_tfds_prepared_dir_is_read_without_download(prepared_mnist):
  data_dir, images = prepared_mnist
  split = data.load_split("mnist", "test", source="tfds", data_dir=data_dir, download=False)
  assert sorted(split["label"]) == list(range(7))  # TFDS stores examples shuffled
  np.testing.assert_array_equal(split["image"], images[split["label"]])


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ValueError, match="Valid names: mnist, fashion_mnist, cifar10, cifar100"):
    data.load_split("imagenette", "train")
  with pytest.raises(ValueError, match="Valid sources"):
    data.load_split("mnist", "train", source="web")


def test_missing_tfds_data_without_download(tmp_path):
  with pytest.raises(data.DatasetUnavailableError) as err:
    data.load_split("cifar10", "train", source="tfds", data_dir=str(tmp_path), download=False)
  msg = str(err.value)
  assert str(tmp_path) in msg and "download=False" in msg
  assert "tfds build cifar10 --file_format=array_record" in msg
  assert "--config.dataset.data_dir" in msg and "apt-get" not in msg


def test_offline_download_fails_fast_with_instructions(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_reachable", lambda url: False)
  with pytest.raises(data.DatasetUnavailableError) as err:
    data.load_split("fashion_mnist", "train", source="tfds", data_dir=str(tmp_path))
  msg = str(err.value)
  assert "no connection to fashion-mnist.s3-website" in msg
  assert "apt-get install dataset-fashion-mnist" in msg and "tfds build fashion_mnist" in msg


def test_failed_download_is_explained(tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise ConnectionError("Max retries exceeded with url: /cvdf-datasets/mnist/")
  monkeypatch.setattr(data, "_reachable", lambda url: True)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
  with pytest.raises(data.DatasetUnavailableError, match="ConnectionError: Max retries") as err:
    data.load_split("mnist", "train", source="tfds", data_dir=str(tmp_path))
  assert err.value.__cause__ is None and "tfds build mnist" in str(err.value)


def test_missing_debian_files(monkeypatch, tmp_path):
  monkeypatch.setattr(data, "DEBIAN_DIR", str(tmp_path))
  with pytest.raises(data.DatasetUnavailableError, match="apt-get install dataset-fashion-mnist"):
    data.load_split("fashion_mnist", "train", source="debian")
  with pytest.raises(ValueError, match="only fashion_mnist"):
    data.load_split("mnist", "train", source="debian")


def test_validation_split_is_disjoint_and_seeded():
  arrays = id_split(50)
  train, val = data.split_validation(arrays, 12, seed=3)
  assert len(train["label"]) == 38 and len(val["label"]) == 12
  assert set(train["label"]).isdisjoint(val["label"])
  assert sorted([*train["label"], *val["label"]]) == list(range(50))
  assert np.array_equal(train["image"][:, 0, 0, 0], train["label"] % 251)
  assert train.dataset == val.dataset == "mnist"
  assert np.array_equal(data.split_validation(arrays, 12, seed=3)[1]["label"], val["label"])
  assert not np.array_equal(data.split_validation(arrays, 12, seed=4)[1]["label"], val["label"])
  assert data.split_validation(arrays, 0, seed=3) == (arrays, None)
  with pytest.raises(ValueError, match="val_size"):
    data.split_validation(arrays, 50, seed=3)


# --------------------------------------------------------------------------- training batches


def test_train_batches_are_seeded_and_normalised():
  arrays = id_split(40)
  first = take(data.train_batches(arrays, batch_size=8, seed=1), 12)
  assert batches_equal(first, take(data.train_batches(arrays, batch_size=8, seed=1), 12))
  assert not batches_equal(first, take(data.train_batches(arrays, batch_size=8, seed=2), 12))
  b = first[0]
  assert b["image"].shape == (8, 6, 6, 1) and b["image"].dtype == np.float32
  assert b["label"].shape == (8,) and b["label"].dtype == np.int32
  mean, std = data._SPECS["mnist"].mean[0], data._SPECS["mnist"].std[0]
  expected = (arrays["image"][b["label"]] / 255 - mean) / std
  np.testing.assert_allclose(b["image"], expected, rtol=1e-5, atol=1e-5)


def test_normalisation_is_per_channel():
  rng = np.random.default_rng(0)
  arrays = data.Split("cifar10", image=rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8),
                      label=np.arange(5, dtype=np.int32))
  batch = next(data.eval_batches(arrays, batch_size=5))
  spec = data._SPECS["cifar10"]
  expected = (arrays["image"] / 255 - np.array(spec.mean)) / np.array(spec.std)
  np.testing.assert_allclose(batch["image"], expected, rtol=1e-5, atol=1e-5)


def test_epochs_are_permutations_reshuffled_each_epoch():
  arrays = id_split(43)  # 5 steps of 8 per epoch, 3 examples dropped
  assert data.steps_per_epoch(43, 8) == 5
  labels = [b["label"] for b in take(data.train_batches(arrays, batch_size=8, seed=0), 10)]
  epoch0, epoch1 = np.concatenate(labels[:5]), np.concatenate(labels[5:])
  assert len(set(epoch0)) == len(set(epoch1)) == 40
  assert not np.array_equal(epoch0, epoch1)


def test_resume_continues_the_same_sequence():
  arrays = id_split(30)
  for augment in (False, True):
    fresh = take(data.train_batches(arrays, batch_size=4, seed=5, augment=augment), 20)
    resumed = take(data.train_batches(arrays, batch_size=4, seed=5, augment=augment,
                                      start_step=13), 7)
    assert batches_equal(fresh[13:], resumed)
    ds = data.train_dataset(arrays, batch_size=4, seed=5, augment=augment)
    assert batches_equal([ds[17]], [fresh[17]])


def test_process_slices_concatenate_to_the_global_batch():
  arrays = id_split(64, shape=(8, 8, 3), dataset="cifar10")
  kw = dict(batch_size=12, seed=0, augment=True, start_step=4)
  whole = take(data.train_batches(arrays, **kw), 6)
  parts = [take(data.train_batches(arrays, process_index=p, process_count=3, **kw), 6)
           for p in range(3)]
  for t, batch in enumerate(whole):
    for k in batch:
      np.testing.assert_array_equal(np.concatenate([p[t][k] for p in parts]), batch[k])
  with pytest.raises(ValueError, match="not divisible"):
    data.train_batches(arrays, batch_size=10, seed=0, process_count=3)


def _is_crop_flip(out, image, pad=data.CROP_PADDING):
  h, w, _ = image.shape
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  crops = [padded[y:y + h, x:x + w] for y in range(2 * pad + 1) for x in range(2 * pad + 1)]
  return any(np.array_equal(out, c) or np.array_equal(out, c[:, ::-1]) for c in crops)


def test_augmentation_crops_and_flips_reproducibly():
  rng = np.random.default_rng(0)
  arrays = data.Split("cifar10", image=rng.integers(1, 256, (32, 10, 10, 3), dtype=np.uint8),
                      label=np.arange(32, dtype=np.int32))
  kw = dict(batch_size=16, seed=7, mean=(0.0,) * 3, std=(1 / 255,) * 3)
  plain = take(data.train_batches(arrays, **kw), 4)
  aug = take(data.train_batches(arrays, augment=True, **kw), 4)
  assert batches_equal(aug, take(data.train_batches(arrays, augment=True, **kw), 4))
  assert all(np.array_equal(a["label"], p["label"]) for a, p in zip(aug, plain))
  assert not all(np.array_equal(a["image"], p["image"]) for a, p in zip(aug, plain))
  for a in aug:
    assert a["image"].shape == (16, 10, 10, 3) and a["image"].dtype == np.float32
    for out, label in zip(a["image"], a["label"]):
      assert _is_crop_flip(out.round().astype(np.uint8), arrays["image"][label])


def test_plain_dicts_need_explicit_statistics():
  arrays = dict(id_split(10))
  with pytest.raises(ValueError, match="mean= and std="):
    data.train_batches(arrays, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="one value per channel"):
    data.eval_batches(arrays, batch_size=2, mean=(0.5,) * 3, std=(0.5,) * 3)
  batch = next(data.train_batches(arrays, batch_size=2, seed=0, mean=(0.5,), std=(0.5,)))
  assert batch["image"].shape == (2, 6, 6, 1)


# --------------------------------------------------------------------------- eval batches


@pytest.mark.parametrize("n,batch_size,processes", [(37, 8, 1), (37, 8, 2), (5, 8, 2),
                                                    (32, 8, 4)])
def test_eval_batches_cover_every_example_once(n, batch_size, processes):
  arrays = id_split(n)
  seen, counts = [], set()
  for p in range(processes):
    batches = list(data.eval_batches(arrays, batch_size=batch_size, process_index=p,
                                     process_count=processes))
    counts.add(len(batches))
    for b in batches:
      assert b["image"].shape == (batch_size // processes, 6, 6, 1)
      assert b["mask"].dtype == b["image"].dtype == np.float32 and b["label"].dtype == np.int32
      real = b["mask"] == 1
      seen.extend(b["label"][real])
      assert not b["image"][~real].any() and not b["label"][~real].any()
  assert counts == {data.num_eval_batches(n, batch_size)}
  assert sorted(seen) == list(range(n))
