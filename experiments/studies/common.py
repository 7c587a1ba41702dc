"""Machinery shared by the study runners: sub-runs, cached analyses, claim checks, summaries.

A study's workdir holds

* ``config.json``: the study config (a rerun with a different config is refused);
* ``runs/<name>/``: one training run each (its own workdir, see ``sharpness_jax.records``),
  resumed when rerun;
* ``analysis/<name>.json`` (+ ``.npz``): post-training analyses, computed once;
* ``figures/*.png``;
* ``summary.json``: the claim checks (claim, measured value, expected range, pass/fail) and
  the headline results.

A study is rerun after being killed by rerunning it with the same workdir: finished runs and
analyses are read back, the interrupted run resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from experiments import configs
from experiments.studies.sources import SOURCES
from sharpness_jax import plots, records, run_records, training
from sharpness_jax.config import RESUMABLE_FIELDS
from sharpness_jax.programs import CompileCache

__all__ = [
    "SMOKE_NOTE",
    "Check",
    "cached",
    "check_band",
    "check_range",
    "columns",
    "diverged_check",
    "figure",
    "rank_correlation",
    "run_study",
    "train_run",
]


SMOKE_NOTE = "smoke: plumbing only, checks not meaningful at this size"
"""What the logs and ``report.md`` say of claim checks at the ``smoke`` preset."""


@dataclasses.dataclass(frozen=True)
class Check:
    """One claim of a paper checked against a measurement.

    Attributes:
      claim: the claim, in words.
      value: the measured value (None when it could not be measured).
      expected: the expected range or relation, in words.
      passed: True/False; None when the check could not be evaluated (reported as such).
      detail: what the value is computed from.
      source: where the claim is made (paper, section or figure, ../shared/PAPERS.md §);
        filled from the study's ``SOURCES`` table by :func:`run_study` when empty.
    """

    claim: str
    value: float | None
    expected: str
    passed: bool | None
    detail: str = ""
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The check as a JSON-ready dict (``records.encode_value``: NaN is ``"NaN"``)."""
        value = None if self.value is None else float(self.value)
        return records.encode_value({**dataclasses.asdict(self), "value": value})


def source_of(sources: Sequence[tuple[str, str]], claim: str) -> str:
    """The source of ``claim``: that of the first ``(phrase, source)`` of a study's
    ``SOURCES`` table whose phrase the claim contains ("" when none does)."""
    return next((source for phrase, source in sources if phrase in claim), "")


def check_range(
    claim: str,
    value: float | None,
    *,
    low: float | None = None,
    high: float | None = None,
    detail: str = "",
    expected: str | None = None,
) -> Check:
    """A check that ``low <= value <= high`` (either bound optional); not evaluated when the
    value is None or not finite."""
    if expected is None:
        if low is not None and high is not None:
            expected = f"in [{low:.4g}, {high:.4g}]"
        elif low is not None:
            expected = f">= {low:.4g}"
        else:
            expected = f"<= {high:.4g}"
    if value is None or not math.isfinite(float(value)):
        return Check(claim, value, expected, None, detail or "not measurable")
    v = float(value)
    ok = (low is None or v >= low) and (high is None or v <= high)
    return Check(claim, v, expected, bool(ok), detail)


def check_band(
    claim: str, value: float | None, band: Sequence[float], *, detail: str = ""
) -> Check:
    """A check that ``value`` lies in the closed interval ``band = (low, high)``
    (:func:`check_range` with both bounds)."""
    low, high = band
    return check_range(claim, value, low=low, high=high, detail=detail)


def diverged_check(claim: str, step: int, consequence: str) -> Check:
    """The check reported, not evaluated, for a run that diverged at ``step``."""
    return Check(claim, None, "no divergence", None, f"diverged at step {step}: {consequence}")


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for fewer than 3 pairs."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3:
        return float("nan")

    def ranks(a):
        order = np.argsort(a, kind="stable")
        r = np.empty(a.size)
        r[order] = np.arange(a.size, dtype=float)
        for value in np.unique(a):  # average ranks of ties
            tied = a == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def run_config(base: ml_collections.ConfigDict, **overrides: Any) -> ml_collections.ConfigDict:
    """A copy of the base training config with dotted-path overrides, e.g.
    ``run_config(base, **{"optimizer.learning_rate": 0.1, "batch_size": 32})``."""
    config = ml_collections.ConfigDict(base.to_dict())
    for path, value in overrides.items():
        node = config
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        if isinstance(value, Mapping):
            value = ml_collections.ConfigDict(dict(value))
        node[leaf] = value
    return config


def train_run(
    workdir: str | os.PathLike,
    name: str,
    config: ml_collections.ConfigDict,
    *,
    mesh: Any = None,
    cache: CompileCache | None = None,
):
    """Trains (or resumes, or reads back) one run in ``workdir/runs/<name>``.

    Args:
      workdir: the study's workdir.
      name: the run's name.
      config: the run's training config.
      mesh: the device mesh (``config.default_config``'s ``mesh``), unless the config names
        one.
      cache: the study's compile cache (:func:`run_study` holds one for all its sub-runs).
    """
    path = Path(workdir) / "runs" / name
    logging.info("run %s -> %s", name, path)
    if config.get("mesh") is None and mesh is not None:
        config = run_config(config, mesh=mesh)
    return training.train(config, path, cache=cache)


def columns(workdir: str | os.PathLike, name: str) -> dict[str, np.ndarray]:
    """The metric columns of run ``name`` (``records.metric_columns``)."""
    return records.metric_columns(records.read_metrics(Path(workdir) / "runs" / name))


def cached(
    workdir: str | os.PathLike, name: str, compute: Callable[[], Mapping[str, Any]]
) -> dict[str, Any]:
    """``compute()`` once, saved in ``workdir/analysis/<name>.json``; read back afterwards.

    Arrays of more than 64 numbers go to ``<name>.npz`` beside it. Values are stored and read
    back by ``records`` (non-finite floats come back as floats). Writes are atomic, so an
    analysis killed midway is recomputed on the next run.
    """
    folder = Path(workdir) / "analysis"
    json_path, npz_path = folder / f"{name}.json", folder / f"{name}.npz"
    if json_path.exists():
        result = records.read_json(json_path)
        if npz_path.exists():
            with np.load(npz_path) as arrays:
                result.update({k: arrays[k] for k in arrays.files})
        return result
    result = dict(compute())
    big = {k: np.asarray(v) for k, v in result.items() if np.ndim(v) and np.size(v) > 64}
    small = {k: v for k, v in result.items() if k not in big}
    if big:
        records.write_npz(npz_path, big)
    records.write_json(json_path, small)  # last: its presence marks the analysis complete
    return {**small, **big}


def figure(workdir: str | os.PathLike, name: str, fig) -> str:
    """Saves ``fig`` as ``workdir/figures/<name>.png``; returns the path relative to workdir."""
    plots.save(fig, Path(workdir) / "figures" / f"{name}.png")
    return f"figures/{name}.png"


def run_study(
    study: str,
    run: Callable[..., tuple[list[Check], dict, list[str]]],
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    force: bool = False,
    mesh: Any = None,
) -> dict[str, Any]:
    """Runs a study in ``workdir`` and writes ``summary.json``.

    Args:
      study: the study's name.
      run: ``(config, workdir, *, mesh, cache) -> (checks, results, figures)``; it passes
        ``mesh`` and ``cache`` (one compile cache for all the study's sub-runs) to
        :func:`train_run`.
      config: the study config (with a ``preset`` field).
      workdir: the study's workdir; rerunning with the same one resumes.
      force: accept a config that differs from the one stored in the workdir.
      mesh: the device mesh of every training run (``config.default_config``'s ``mesh``:
        None, "auto" or a device count); it does not change results beyond float rounding,
        so a study may resume on another mesh.

    Returns:
      The summary: study, preset, passed (all evaluated checks passed and at least one was
      evaluated), checks, results, figures, elapsed seconds.
    """
    configs.check_preset(config.preset)
    workdir = records.init_workdir(workdir)
    # The base run's step budget (and how it reports) and its measurement schedule may
    # change, e.g. a finished study run longer; each run checks its own resolved config
    # (sharpness_jax.run_records). The analyses cached for the old config are then stale.
    fields = (*RESUMABLE_FIELDS, *run_records.SCHEDULE_FIELDS)
    stored = records.read_config(workdir)
    added = [] if stored is None else run_records.added_at_default(stored, config, prefix="base.")
    ignore = [*(f"base.{f}" for f in fields), *added]
    records.write_config(workdir, config, ignore=ignore, force=force)
    if stored is not None and records.config_differences(stored, config, ignore=added):
        logging.info("the config of %s changed: its analyses are recomputed", workdir)
        shutil.rmtree(workdir / "analysis", ignore_errors=True)
    start = time.time()
    logging.info("study %s (%s) in %s", study, config.preset, workdir)
    checks, results, figures = run(config, workdir, mesh=mesh, cache=CompileCache())
    table = SOURCES.get(study, ())
    checks = [
        c if c.source else dataclasses.replace(c, source=source_of(table, c.claim)) for c in checks
    ]
    evaluated = [c.passed for c in checks if c.passed is not None]
    summary = {
        "study": study,
        "preset": config.preset,
        "passed": bool(evaluated) and all(evaluated),
        "checks": [c.to_dict() for c in checks],
        "results": records.encode_value(results),
        "figures": list(figures),
        "elapsed_s": time.time() - start,
    }
    records.write_json(workdir / "summary.json", summary, sort_keys=False)
    if config.preset == "smoke":
        logging.warning("%s", SMOKE_NOTE)
    for c in checks:
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[c.passed]
        shown = c.value if c.value is not None else c.detail or "not measured"
        logging.info("[%s] %s: %s (expected %s)", mark, c.claim, shown, c.expected)
    return summary
