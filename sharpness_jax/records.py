"""The workdir is the record of a run.

A training run writes everything it produces into one directory:

==========================  ===============================================================
``config.json``             the run's configuration, written once; a rerun must match it
``metrics.jsonl``           one JSON object per measurement step (appended, flushed, fsync'd)
``arrays/step_*.npz``       arrays returned by measurements (spectra, ...), referenced from
                            the row of their step under the key ``"arrays"``
``checkpoints/<step>/``     orbax checkpoints: params, optimizer state, measurement state
                            (e.g. warm-start eigenvectors) and a JSON ``meta`` item (step,
                            seed, stop-rule state)
``status.json``             ``{"status": "running" | "completed" | "goal_reached" |
                            "diverged" | "interrupted" | "failed", "step": ...}``
``figures/``                plots made from ``metrics.jsonl``
==========================  ===============================================================

Resume protocol: a rerun restores the latest *complete* checkpoint (orbax writes a checkpoint
into a temporary directory and renames it only when every file is written, so a checkpoint
interrupted by a crash is never picked up), then :func:`truncate_metrics` drops every metric
row with a step after the checkpoint's step by an atomic rewrite (temporary file, fsync,
``os.replace``). Rows are therefore neither duplicated nor lost. A last line cut short by a
crash is ignored when reading and removed before the next append.

JSON has no NaN or infinity. Non-finite floats are stored as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` and decoded back to floats when read, so these three
strings cannot be used as ordinary string values in a row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

PyTree = Any
PathLike = str | os.PathLike

__all__ = [
    "ARRAYS_DIR",
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "FIGURES_DIR",
    "METRICS_FILE",
    "STATUS_FILE",
    "Checkpoint",
    "ConfigMismatchError",
    "append_metrics",
    "checkpoint_manager",
    "config_differences",
    "config_to_dict",
    "decode_value",
    "encode_value",
    "flatten_config",
    "holds_results",
    "init_workdir",
    "latest_checkpoint_step",
    "load_arrays",
    "metric_columns",
    "read_config",
    "read_json",
    "read_metrics",
    "read_status",
    "restore_checkpoint",
    "save_arrays",
    "save_checkpoint",
    "truncate_metrics",
    "write_config",
    "write_json",
    "write_npz",
    "write_status",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
CHECKPOINT_DIR = "checkpoints"
ARRAYS_DIR = "arrays"
FIGURES_DIR = "figures"
_BOOKKEEPING = (CONFIG_FILE, STATUS_FILE)  # files that record no result

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class ConfigMismatchError(ValueError):
    """A stored config differs in result fields: ``path``, ``differences`` (``"f: a -> b"``)."""

    def __init__(self, path: PathLike, differences: Sequence[str]):
        self.path, self.differences = str(path), list(differences)
        super().__init__(
            f"{path} holds a run with a different config; these fields change results:\n  "
            + "\n  ".join(self.differences)
            + "\nUse a new workdir, restore the old values, or pass force=True to continue it."
        )


# ------------------------------------------------------------------------------ files


def _fsync_dir(path: pathlib.Path) -> None:
    """Makes a rename or file creation in ``path`` durable (no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _atomic_file(path: pathlib.Path):
    """A binary file whose content replaces ``path`` when the block ends: it is written to a
    temporary file beside ``path``, fsync'd and renamed over ``path``, so readers see the old
    or the new content, never a mixture. On an error the temporary file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_json(path: PathLike, value: Any, *, sort_keys: bool = True) -> None:
    """Writes ``value`` (encoded by :func:`encode_value`) as indented JSON to ``path``,
    atomically: a temporary file beside it, fsync'd, renamed over it."""
    text = json.dumps(encode_value(value), indent=2, sort_keys=sort_keys, allow_nan=False)
    with _atomic_file(pathlib.Path(path)) as f:
        f.write((text + "\n").encode())


def read_json(path: PathLike) -> Any:
    """The JSON value stored in ``path``, non-finite floats decoded (:func:`decode_value`)."""
    with open(path, encoding="utf-8") as f:
        return decode_value(json.load(f))


def write_npz(path: PathLike, arrays: Mapping[str, Any]) -> None:
    """Saves ``arrays`` as an ``.npz`` file at ``path``, atomically like :func:`write_json`."""
    with _atomic_file(pathlib.Path(path)) as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def init_workdir(workdir: PathLike) -> pathlib.Path:
    """Creates ``workdir`` and its ``figures/`` and ``arrays/``; returns it as a ``Path``."""
    path = pathlib.Path(workdir)
    for sub in ("", FIGURES_DIR, ARRAYS_DIR):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------ JSON values


def encode_value(value: Any) -> Any:
    """A JSON-ready copy of ``value``.

    numpy / JAX scalars and arrays become Python numbers and (nested) lists, tuples become
    lists, mapping keys become strings, and non-finite floats become ``"NaN"``,
    ``"Infinity"`` or ``"-Infinity"``.

    Raises:
      TypeError: for values with no JSON form.
    """
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        value = float(value)
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray | jax.Array):
        return encode_value(np.asarray(value).tolist())
    if isinstance(value, Mapping):
        return {str(k): encode_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode_value(v) for v in value]
    raise TypeError(f"cannot store a value of type {type(value).__name__} as JSON: {value!r}")


def decode_value(value: Any) -> Any:
    """Inverse of :func:`encode_value` for non-finite floats (``"NaN"`` -> ``nan`` etc.)."""
    if isinstance(value, str):
        return _NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {k: decode_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


# ----------------------------------------------------------------------------- config


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain JSON-ready dict of a config.

    Accepts an ``ml_collections.ConfigDict`` / ``FrozenConfigDict`` (anything with
    ``to_dict``), a dataclass or a mapping. Tuples become lists, so a dict that went through
    JSON compares equal to the original.
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"a config must be a ConfigDict, dataclass or mapping, got {type(config)}")
    return json.loads(json.dumps(encode_value(config), allow_nan=False))


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, path + "."))
        else:
            out[path] = value
    return out


def config_differences(stored: Any, new: Any, *, ignore: Iterable[str] = ()) -> list[str]:
    """The fields where two configs differ, as ``"path: stored -> new"`` lines.

    Args:
      stored, new: configs (anything :func:`config_to_dict` accepts).
      ignore: dotted field paths (``"max_steps"``, ``"measure.log_every"``) to leave out;
        a path also ignores everything below it.

    Returns:
      Sorted difference lines; empty when the configs agree outside ``ignore``.
    """
    a = flatten_config(config_to_dict(stored))
    b = flatten_config(config_to_dict(new))
    ignore = tuple(ignore)
    missing = object()
    show = lambda v: "<absent>" if v is missing else json.dumps(v)
    lines = []
    for path in sorted(set(a) | set(b)):
        if any(path == p or path.startswith(p + ".") for p in ignore):
            continue
        va, vb = a.get(path, missing), b.get(path, missing)
        if va != vb:
            lines.append(f"{path}: {show(va)} -> {show(vb)}")
    return lines


def read_config(workdir: PathLike) -> dict[str, Any] | None:
    """The stored ``config.json`` as a dict, or None if there is none."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    return read_json(path) if path.exists() else None


def holds_results(workdir: PathLike) -> bool:
    """Whether ``workdir`` holds anything computed: a non-empty file but a config or status."""
    files = (p for p in pathlib.Path(workdir).rglob("*") if p.name not in _BOOKKEEPING)
    return any(p.is_file() and p.stat().st_size > 0 for p in files)


def write_config(
    workdir: PathLike, config: Any, *, ignore: Iterable[str] = (), force: bool = False
) -> dict[str, Any]:
    """Writes ``config.json`` of ``workdir``, or checks ``config`` against the stored one;
    returns the config as stored (a plain dict).

    A rerun (the file exists) compares the two configs: if they differ in a field outside
    ``ignore`` (dotted paths of fields that may change on resumption, e.g. the step budget)
    it raises :class:`ConfigMismatchError` listing the differences, unless ``force`` is set
    (then it logs a warning) or the workdir holds no results (:func:`holds_results`: a run
    that failed before its first step). Otherwise the new config is stored.
    """
    path = init_workdir(workdir) / CONFIG_FILE
    new = config_to_dict(config)
    if path.exists():
        stored = read_json(path)
        diffs = config_differences(stored, new, ignore=ignore)
        if diffs and not force and holds_results(workdir):
            raise ConfigMismatchError(path, diffs)
        if diffs:
            logging.warning("overriding the stored config of %s:\n  %s", path, "\n  ".join(diffs))
        if config_to_dict(stored) == new:
            return new
    write_json(path, new)
    return new


# ---------------------------------------------------------------------------- metrics


def _metrics_path(workdir: PathLike) -> pathlib.Path:
    return pathlib.Path(workdir) / METRICS_FILE


def _json_line(row: Mapping[str, Any]) -> bytes:
    """One metrics row as a compact JSON line ending in a newline."""
    return (json.dumps(encode_value(row), allow_nan=False, separators=(",", ":")) + "\n").encode()


def _parse_lines(data: bytes, path: pathlib.Path) -> tuple[list[dict[str, Any]], int]:
    """Rows of a metrics file and the byte length of its complete part.

    Every row is written as one line ending in a newline, so whatever follows the last
    newline is a write cut short: it is dropped with a warning. A complete line that is not
    a JSON object is corruption and an error.
    """
    complete, newline, tail = data.rpartition(b"\n")
    if tail.strip():
        logging.warning("%s: ignoring a truncated last line (%d bytes)", path, len(tail))
    rows = []
    for i, line in enumerate(complete.split(b"\n") if complete else []):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}: line {i + 1} is not valid JSON: {e}") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {i + 1} is not a JSON object")
        rows.append(decode_value(row))
    return rows, len(complete) + len(newline)


def read_metrics(workdir: PathLike) -> list[dict[str, Any]]:
    """All rows of ``metrics.jsonl`` (empty list if absent), non-finite floats decoded.

    A truncated last line (a write killed half-way) is ignored.
    """
    path = _metrics_path(workdir)
    if not path.exists():
        return []
    rows, _ = _parse_lines(path.read_bytes(), path)
    return rows


def _repair_tail(path: pathlib.Path) -> None:
    """Removes a partial last line so that the next append starts on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
    data = path.read_bytes()
    _, good = _parse_lines(data, path)
    with _atomic_file(path) as f:
        f.write(data[:good])


def append_metrics(workdir: PathLike, row: Mapping[str, Any]) -> None:
    """Appends one row (a JSON object with an integer ``"step"``) to ``metrics.jsonl``.

    The line is written in one call, flushed and fsync'd. Values may be Python or numpy
    scalars, arrays (stored as lists), strings, bools or None; NaN and ±inf are encoded.

    Raises:
      ValueError: if the row has no integer ``"step"``.
    """
    step = row.get("step")
    if isinstance(step, bool) or not isinstance(step, int | np.integer):
        raise ValueError(f"a metrics row needs an integer 'step', got {step!r}")
    path = _metrics_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(path)
    with open(path, "ab") as f:
        f.write(_json_line(dict(row)))
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(workdir: PathLike, *, max_step: int | None) -> int:
    """Keeps the rows with ``step <= max_step`` (``None``: none), rewriting atomically.

    Also removes a truncated last line and the array files of the dropped rows. This is
    what a resumed run calls with its checkpoint's step before appending new rows.

    Returns:
      The number of rows dropped.
    """
    path = _metrics_path(workdir)
    if not path.exists():
        return 0
    rows = read_metrics(workdir)
    keep = [r for r in rows if max_step is not None and r["step"] <= max_step]
    dropped = [r for r in rows if not (max_step is not None and r["step"] <= max_step)]
    data = b"".join(_json_line(r) for r in keep)
    if data != path.read_bytes():
        with _atomic_file(path) as f:
            f.write(data)
    kept_arrays = {r.get("arrays") for r in keep}
    for r in dropped:
        ref = r.get("arrays")
        if ref and ref not in kept_arrays:
            with contextlib.suppress(FileNotFoundError):
                (pathlib.Path(workdir) / ref).unlink()
    if dropped:
        logging.info("%s: dropped %d row(s) after step %s", path, len(dropped), max_step)
    return len(dropped)


def metric_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """A column view of metric rows, ``{column: np.ndarray}`` (no pandas needed).

    Every column has one entry per row. Numeric columns are float arrays with NaN where a
    row lacks the column (integer arrays when every row has an integer); other columns are
    object arrays with None where missing.
    """
    columns = {}
    for name in dict.fromkeys(k for row in rows for k in row):
        values = [row.get(name) for row in rows]
        present = [v for v in values if v is not None]
        numeric = all(
            isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
            for v in present
        )
        if numeric and all(isinstance(v, int | np.integer) for v in values):  # no None
            columns[name] = np.asarray(values, dtype=np.int64)
        elif numeric and present:
            columns[name] = np.asarray(
                [np.nan if v is None else float(v) for v in values], dtype=np.float64
            )
        else:
            columns[name] = np.empty(len(values), dtype=object)
            columns[name][:] = values
    return columns


# ----------------------------------------------------------------------------- arrays


def save_arrays(workdir: PathLike, step: int, arrays: Mapping[str, Any]) -> str:
    """Saves the arrays of one measurement step to ``arrays/step_<step>.npz`` (atomically).

    Returns:
      The path relative to the workdir, to be stored in the step's row under ``"arrays"``.
    """
    rel = f"{ARRAYS_DIR}/step_{int(step):09d}.npz"
    write_npz(pathlib.Path(workdir) / rel, arrays)
    return rel


def load_arrays(workdir: PathLike, row_or_path: Mapping[str, Any] | str) -> dict[str, np.ndarray]:
    """The arrays saved for a row (a row dict with an ``"arrays"`` entry, or that entry)."""
    rel = row_or_path.get("arrays") if isinstance(row_or_path, Mapping) else row_or_path
    if not rel:
        return {}
    with np.load(pathlib.Path(workdir) / rel) as data:
        return {k: data[k] for k in data.files}


# ----------------------------------------------------------------------------- status


def write_status(workdir: PathLike, status: str, step: int, **extra: Any) -> None:
    """Writes ``status.json`` = ``{"status": status, "step": step, **extra}`` atomically."""
    write_json(pathlib.Path(workdir) / STATUS_FILE, {"status": status, "step": int(step), **extra})


def read_status(workdir: PathLike) -> dict[str, Any] | None:
    """The stored ``status.json``, or None."""
    path = pathlib.Path(workdir) / STATUS_FILE
    return read_json(path) if path.exists() else None


# ------------------------------------------------------------------------ checkpoints


class Checkpoint(NamedTuple):
    """A restored checkpoint.

    Attributes:
      step: the training step it was taken at.
      state: the main state, restored into the structure, dtypes and shardings of the
        template passed to :func:`restore_checkpoint`.
      extra: the free-form extra state (nested dicts of arrays, restored as ``jax.Array``),
        e.g. the measurements' warm-start state.
      meta: the JSON metadata saved with it.
    """

    step: int
    state: PyTree
    extra: dict[str, Any]
    meta: dict[str, Any]


def checkpoint_manager(workdir: PathLike, *, max_to_keep: int | None = 3):
    """An orbax ``CheckpointManager`` on ``<workdir>/checkpoints`` keeping the last few.

    Saving is synchronous: the arrays are on disk when :func:`save_checkpoint` returns, so
    the training step may donate (overwrite) the buffers right after. Each checkpoint is
    written to a temporary directory and renamed into place when complete; temporary
    directories left by a crash are ignored and cleaned up.

    Args:
      workdir: the run directory.
      max_to_keep: number of most recent checkpoints kept (None: all).
    """
    import orbax.checkpoint as ocp

    if max_to_keep is not None and max_to_keep < 1:
        raise ValueError(f"max_to_keep must be positive or None, got {max_to_keep}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
    )
    directory = (pathlib.Path(workdir) / CHECKPOINT_DIR).absolute()
    return ocp.CheckpointManager(directory, options=options)


def save_checkpoint(
    manager,
    step: int,
    state: PyTree,
    *,
    extra: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Saves one checkpoint and waits until it is complete on disk.

    Args:
      manager: from :func:`checkpoint_manager`.
      step: the training step.
      state: the main state pytree (params, optimizer state, ...); restored into a template.
      extra: free-form state restored without a template: nested dicts (string keys) of
        arrays, e.g. ``{"lambda_max": {"vectors": ...}}``. Empty entries are dropped.
      meta: JSON-ready metadata (non-finite floats allowed).
    """
    import orbax.checkpoint as ocp

    items = {
        "state": ocp.args.StandardSave(state),
        "meta": ocp.args.JsonSave(encode_value({"step": int(step), **dict(meta or {})})),
    }
    extra = {k: v for k, v in dict(extra or {}).items() if jax.tree_util.tree_leaves(v)}
    if extra:
        items["extra"] = ocp.args.PyTreeSave(jax.tree_util.tree_map(np.asarray, extra))
    manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()


def latest_checkpoint_step(manager) -> int | None:
    """The step of the latest complete checkpoint, or None."""
    manager.reload()
    return manager.latest_step()


def restore_checkpoint(manager, template: PyTree, *, step: int | None = None) -> Checkpoint | None:
    """Restores a checkpoint (the latest complete one by default).

    Args:
      manager: from :func:`checkpoint_manager`.
      template: a pytree with the structure, shapes and dtypes of the saved state (concrete
        arrays or ``jax.ShapeDtypeStruct``), e.g. the freshly initialised state.
      step: which checkpoint; None for the latest.

    Returns:
      The :class:`Checkpoint`, or None when the workdir holds no complete checkpoint.
    """
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    if step is None:
        step = latest_checkpoint_step(manager)
        if step is None:
            return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
    directory = pathlib.Path(manager.directory) / str(step)
    has_extra = (directory / "extra").exists()
    if has_extra:
        items["extra"] = ocp.args.PyTreeRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    extra = jax.tree_util.tree_map(jnp.asarray, dict(restored["extra"])) if has_extra else {}
    meta = decode_value(dict(restored["meta"]))
    return Checkpoint(int(step), restored["state"], extra, meta)
