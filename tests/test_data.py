"""Datasets and the sampler: the offline MNIST-5k, TFDS array_record sources, synthetic sets."""

import importlib.resources
import sys
import time

import numpy as np
import pytest

from sharpness_jax import data
from sharpness_jax.data import DatasetNotFoundError, load_dataset


@pytest.fixture(scope="module")
def tfds():
    return pytest.importorskip("tensorflow_datasets")


# ----------------------------------------------------------------------------- mnist5k


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k")


def _row_keys(x):
    return {row.tobytes() for row in np.asarray(x).reshape(x.shape[0], -1)}


def test_mnist5k_shapes_ranges_and_class_balance(mnist5k):
    train, test = mnist5k.train, mnist5k.test
    assert (mnist5k.name, mnist5k.num_classes) == ("mnist5k", 10)
    assert train.inputs.shape == (4000, 28, 28, 1) and test.inputs.shape == (1000, 28, 28, 1)
    assert train.inputs.dtype == np.float32 and train.targets.dtype == np.int32
    assert train.inputs.min() == 0.0 and train.inputs.max() == 1.0
    assert np.all(np.bincount(train.targets, minlength=10) == 400)
    assert np.all(np.bincount(test.targets, minlength=10) == 100)
    # Seeded order, not sorted by class (so "the first k" are mixed classes).
    assert len(set(train.targets[:50].tolist())) > 5


def test_mnist5k_split_is_disjoint_and_covers_the_5000_images(mnist5k):
    train, test = _row_keys(mnist5k.train.inputs), _row_keys(mnist5k.test.inputs)
    raw, _ = data._mnist5k_arrays()
    everything = _row_keys(raw.astype(np.float32) / np.float32(255.0))
    assert len(everything) == 5000  # no duplicate images, so the sets below are exact
    assert not train & test
    assert train | test == everything


def test_mnist5k_split_is_seeded(mnist5k):
    again = load_dataset("mnist5k", seed=0)
    np.testing.assert_array_equal(again.train.inputs, mnist5k.train.inputs)
    np.testing.assert_array_equal(again.test.targets, mnist5k.test.targets)
    other = load_dataset("mnist5k", seed=1, test_per_class=50, flatten=True, dtype="float64")
    assert other.train.inputs.shape == (4500, 784) and other.train.inputs.dtype == np.float64
    assert _row_keys(other.test.inputs.astype(np.float32)) != _row_keys(mnist5k.test.inputs)


def test_feature_standardisation_uses_full_train_statistics():
    full = load_dataset("mnist5k", standardize="feature", flatten=True, dtype="float64")
    x = full.train.inputs
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-12)
    std = x.std(0)
    constant = std == 0  # always-empty pixels are only centred
    assert 0 < constant.sum() < 784
    np.testing.assert_allclose(std[~constant], 1.0, rtol=1e-10)
    # The statistics are those of the full split, applied before the subset is taken.
    first = load_dataset("mnist5k", standardize="feature", flatten=True, dtype="float64",
                         num_train=300, num_test=20)  # fmt: skip
    np.testing.assert_array_equal(first.train.inputs, x[:300])
    np.testing.assert_array_equal(first.test.inputs, full.test.inputs[:20])


def test_synthetic_standardisation_per_feature():
    ds = load_dataset("gaussian_mixture", num_train=100, standardize="channel", dtype="float64")
    np.testing.assert_allclose(ds.train.inputs.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(ds.train.inputs.std(0), 1.0, rtol=1e-12)


def test_balanced_and_first_subsets(mnist5k):
    balanced = load_dataset("mnist5k", subset="balanced", per_class=7, num_test=30, seed=3)
    assert np.all(np.bincount(balanced.train.targets, minlength=10) == 7)
    assert np.all(np.bincount(balanced.test.targets, minlength=10) == 3)
    again = load_dataset("mnist5k", subset="balanced", per_class=7, num_test=30, seed=3)
    np.testing.assert_array_equal(balanced.train.inputs, again.train.inputs)
    # The subset keeps the stored order of the (seed-3) split it is drawn from.
    full = load_dataset("mnist5k", seed=3)
    position = {r.tobytes(): p for p, r in enumerate(full.train.inputs.reshape(4000, -1))}
    positions = [position[r.tobytes()] for r in balanced.train.inputs.reshape(70, -1)]
    assert positions == sorted(positions)

    by_count = load_dataset("mnist5k", subset="balanced", num_train=50)
    assert np.all(np.bincount(by_count.train.targets, minlength=10) == 5)

    first = load_dataset("mnist5k", per_class=4)  # the first 4 of each class, stored order
    expected = np.sort(
        np.concatenate([np.flatnonzero(mnist5k.train.targets == k)[:4] for k in range(10)])
    )
    np.testing.assert_array_equal(first.train.inputs, mnist5k.train.inputs[expected])
    np.testing.assert_array_equal(first.test.targets, mnist5k.test.targets)


def test_one_hot_targets(mnist5k):
    ds = load_dataset("mnist5k", num_train=20, one_hot=True, dtype="float64")
    assert ds.train.targets.shape == (20, 10) and ds.train.targets.dtype == np.float64
    np.testing.assert_array_equal(ds.train.targets, np.eye(10)[mnist5k.train.targets[:20]])


# ----------------------------------------------------------------------------- synthetic sets


def test_teacher_student_linear_teacher_is_exact_without_noise():
    ds = load_dataset("teacher_student", num_train=64, num_test=16, input_dim=5, num_outputs=2,
                      dtype="float64", seed=4)  # fmt: skip
    x, y = ds.train
    assert x.shape == (64, 5) and y.shape == (64, 2) and y.dtype == np.float64
    assert ds.num_classes == 2
    w, *_ = np.linalg.lstsq(x, y, rcond=None)
    np.testing.assert_allclose(x @ w, y, atol=1e-12)
    np.testing.assert_allclose(ds.test.inputs @ w, ds.test.targets, atol=1e-12)  # same teacher


def test_teacher_student_noise_and_nonlinear_teacher():
    clean = load_dataset("teacher_student", num_train=2000, num_test=4, teacher_width=8,
                         dtype="float64")  # fmt: skip
    noisy = load_dataset("teacher_student", num_train=2000, num_test=4, teacher_width=8,
                         noise_std=0.5, dtype="float64")  # fmt: skip
    np.testing.assert_array_equal(clean.train.inputs, noisy.train.inputs)
    residual = noisy.train.targets - clean.train.targets
    assert abs(residual.std() - 0.5) < 0.03
    # A tanh teacher is not linear: least squares leaves a residual.
    x, y = clean.train
    w, *_ = np.linalg.lstsq(x, y, rcond=None)
    assert np.abs(x @ w - y).max() > 1e-3


def test_gaussian_mixture_is_balanced_and_separable():
    ds = load_dataset("gaussian_mixture", num_train=300, num_test=90, num_classes=3,
                      separation=8.0, noise_std=0.3, input_dim=10, dtype="float64")  # fmt: skip
    x, y = ds.train
    assert ds.num_classes == 3 and y.dtype == np.int32
    assert np.all(np.bincount(y) == 100) and np.all(np.bincount(ds.test.targets) == 30)
    means = np.stack([x[y == k].mean(0) for k in range(3)])
    nearest = np.argmin(((ds.test.inputs[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(nearest == ds.test.targets) > 0.95
    again = load_dataset("gaussian_mixture", num_train=300, num_test=90, num_classes=3,
                         separation=8.0, noise_std=0.3, input_dim=10, dtype="float64")  # fmt: skip
    np.testing.assert_array_equal(again.train.inputs, x)


# ----------------------------------------------------------------------------- TFDS sources


def _tiny_builder(tfds, tfds_name, shape, num_train, num_test):
    """A builder that writes a tiny split in the layout of a real TFDS image set."""
    import PIL.Image

    version = str(tfds.builder_cls(tfds_name).VERSION)

    class Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = tfds_name
        VERSION = tfds.core.Version(version)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=shape),
                        "label": tfds.features.ClassLabel(num_classes=10),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {
                "train": self._generate_examples(num_train, 0),
                "test": self._generate_examples(num_test, 100),
            }

        def _generate_examples(self, n, offset):
            for i in range(n):
                value = offset + i  # the pixel value encodes the example; label = value mod 10
                image = np.full(shape, value, np.uint8)
                pil = PIL.Image.fromarray(image[..., 0] if shape[-1] == 1 else image)
                yield i, {"image": pil, "label": value % 10}

    return Tiny


@pytest.fixture(scope="module")
def prepared_dir(tfds, tmp_path_factory):
    """Tiny ``mnist`` and ``cifar10`` prepared as array_record files (images encoded by PIL).

    TFDS 4.9.10 imports ``importlib_resources`` while building even on Python ≥ 3.9, where it
    does not require it; the standard library module stands in when it is not installed.
    """
    root = tmp_path_factory.mktemp("tfds")
    with pytest.MonkeyPatch.context() as mp:
        try:
            import importlib_resources  # noqa: F401
        except ImportError:
            mp.setitem(sys.modules, "importlib_resources", importlib.resources)
        for name, shape, n_train, n_test in [("mnist", (28, 28, 1), 30, 10),
                                             ("cifar10", (32, 32, 3), 20, 10)]:  # fmt: skip
            builder = _tiny_builder(tfds, name, shape, n_train, n_test)(
                data_dir=str(root), file_format="array_record"
            )
            builder.download_and_prepare()
    return root


@pytest.fixture
def no_download(tfds, monkeypatch):
    """Any attempt to download or prepare fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a download/prepare was attempted")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)


def test_tfds_reads_prepared_array_record(prepared_dir, no_download):
    ds = load_dataset("mnist", data_dir=prepared_dir, dtype="float64")
    assert ds.train.inputs.shape == (30, 28, 28, 1) and ds.test.inputs.shape == (10, 28, 28, 1)
    assert ds.num_classes == 10
    values = np.rint(ds.train.inputs[:, 0, 0, 0] * 255).astype(int)
    assert sorted(values.tolist()) == list(range(30))  # every stored example, once
    np.testing.assert_array_equal(ds.train.targets, values % 10)
    np.testing.assert_array_equal(ds.train.inputs, np.broadcast_to(
        ds.train.inputs[:, :1, :1, :], ds.train.inputs.shape))  # fmt: skip
    test_values = np.rint(ds.test.inputs[:, 0, 0, 0] * 255).astype(int)
    assert sorted(test_values.tolist()) == list(range(100, 110))

    first = load_dataset("mnist", data_dir=prepared_dir, num_train=7, flatten=True)
    expected = ds.train.inputs[:7].reshape(7, -1).astype(np.float32)
    np.testing.assert_array_equal(first.train.inputs, expected)
    with pytest.raises(ValueError, match="split holds 30"):
        load_dataset("mnist", data_dir=prepared_dir, num_train=31)


def test_tfds_channel_standardisation(prepared_dir, no_download):
    ds = load_dataset("cifar10", data_dir=prepared_dir, standardize="channel", dtype="float64")
    x = ds.train.inputs
    assert x.shape == (20, 32, 32, 3)
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=1e-12)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1.0, rtol=1e-12)


def test_tfds_mock_data_without_tensorflow(tfds, prepared_dir, no_download):
    """``tfds.testing.mock_data`` mocks ``tfds.data_source`` with random examples."""
    with tfds.testing.mock_data(num_examples=12):
        ds = load_dataset("mnist", data_dir=prepared_dir)
    assert ds.train.inputs.shape == (12, 28, 28, 1) and ds.test.inputs.shape == (12, 28, 28, 1)
    assert ds.train.targets.dtype == np.int32
    assert np.all((0 <= ds.train.targets) & (ds.train.targets < 10))
    assert 0.0 <= ds.train.inputs.min() and ds.train.inputs.max() <= 1.0
    assert ds.train.inputs.std() > 0.1  # random images, not the prepared constant ones


def test_missing_dataset_raises_without_download(tmp_path, no_download, monkeypatch):
    start = time.perf_counter()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    assert str(tmp_path) in message
    assert "tfds build cifar10" in message and "--file_format=array_record" in message
    assert isinstance(info.value, FileNotFoundError)

    # The default data_dir follows $TFDS_DATA_DIR.
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(DatasetNotFoundError, match="elsewhere"):
        load_dataset("fashion_mnist")


def test_dataset_prepared_in_another_format_is_reported(tfds, tmp_path, no_download):
    version = str(tfds.builder_cls("cifar100").VERSION)
    folder = tmp_path / "cifar100" / version
    folder.mkdir(parents=True)
    (folder / "dataset_info.json").write_text("{}")
    (folder / "cifar100-train.tfrecord-00000-of-00001").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match="array_record"):
        load_dataset("cifar100", data_dir=tmp_path)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("imagenet", {}, "choose one of"),
        ("cifar10", {"num_train": 50_001}, "exceeds the 50000"),
        ("cifar10", {"num_test": 10_001}, "exceeds the 10000"),
        ("cifar100", {"per_class": 501}, "smallest class"),
        ("mnist", {"per_class": 10, "num_train": 100}, "not both"),
        ("cifar10", {"subset": "balanced", "num_train": 105}, "divisible"),
        ("cifar10", {"subset": "random"}, "choose one of"),
        ("cifar10", {"standardize": "global"}, "choose one of"),
        ("cifar10", {"num_train": -5}, "at least 1"),
        ("cifar10", {"num_test": 0}, "at least 1"),
        ("cifar10", {"seed": -1}, "at least 0"),
        ("cifar10", {"dtype": "int8"}, "choose one of"),
        ("cifar10", {"input_dim": 3}, "its options"),
        ("mnist5k", {"test_per_class": 500}, "below 500"),
        ("mnist5k", {"num_train": 4001}, "exceeds"),
        ("teacher_student", {"one_hot": True}, "real"),
        ("teacher_student", {"teacher_activation": "sin"}, "choose one of"),
        ("gaussian_mixture", {"per_class": 3}, "num_train"),
        ("gaussian_mixture", {"num_classes": 1}, "at least 2"),
    ],
)
def test_invalid_options_raise_before_loading(tmp_path, name, kwargs, match):
    # data_dir is empty: a ValueError (not DatasetNotFoundError) shows nothing was read.
    with pytest.raises(ValueError, match=match) as info:
        load_dataset(name, data_dir=tmp_path, **kwargs)
    assert not isinstance(info.value, DatasetNotFoundError)


def test_dataset_names():
    assert set(data.DATASETS) == {"mnist5k", "mnist", "fashion_mnist", "cifar10", "cifar100",
                                  "teacher_student", "gaussian_mixture"}  # fmt: skip


def test_gaussian_mixture_example_shape_reshapes_the_same_draws():
    flat = data.load_dataset("gaussian_mixture", input_dim=12, num_train=6, num_test=3)
    images = data.load_dataset(
        "gaussian_mixture", input_dim=12, num_train=6, num_test=3, example_shape=(2, 2, 3)
    )
    assert images.train.inputs.shape == (6, 2, 2, 3)
    np.testing.assert_array_equal(images.train.inputs.reshape(6, 12), flat.train.inputs)
    np.testing.assert_array_equal(images.test.targets, flat.test.targets)
    with pytest.raises(ValueError, match="example_shape"):
        data.load_dataset("gaussian_mixture", input_dim=12, example_shape=(2, 2, 2))
