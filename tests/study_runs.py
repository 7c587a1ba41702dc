"""A study's preset run twice in one workdir, the second time with the training loop counted
and chosen steps forbidden: what the smoke tests of every study check resumption with."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import pytest

from experiments.studies import common
from sharpness_jax import training


@dataclasses.dataclass(frozen=True)
class TwoRuns:
    """Attributes:
    workdir: the study's workdir.
    config: the study config.
    first, second: what ``run_study`` returned each time.
    metrics: ``metrics.jsonl`` of every sub-run after the first run, by run name.
    analyses: the files under ``analysis/`` after the first run, by name.
    calls: the ``training.train`` results of the second run.
    """

    workdir: pathlib.Path
    config: Any
    first: dict
    second: dict
    metrics: dict[str, bytes]
    analyses: dict[str, bytes]
    calls: list


def run_twice(
    study: Any, config: Any, workdir: pathlib.Path, *, forbid: Sequence[tuple[Any, str]] = ()
) -> TwoRuns:
    """Runs ``study`` twice; during the second run each ``(owner, attribute)`` in ``forbid``
    raises when called (e.g. an analysis that must come from the cache)."""
    first = common.run_study(study.NAME, study.run, config, workdir)
    unsourced = [c["claim"] for c in first["checks"] if not c["source"]]
    assert not unsourced, f"checks without a source in experiments/studies/sources.py: {unsourced}"
    metrics = {p.parent.name: p.read_bytes() for p in sorted(workdir.glob("runs/*/metrics.jsonl"))}
    analyses = {p.name: p.read_bytes() for p in sorted(workdir.glob("analysis/*"))}
    calls = []
    train = training.train

    def counted(*args, **kwargs):
        result = train(*args, **kwargs)
        calls.append(result)
        return result

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached step was recomputed")

    mp = pytest.MonkeyPatch()
    mp.setattr(training, "train", counted)
    for owner, attribute in forbid:
        mp.setattr(owner, attribute, forbidden)
    try:
        second = common.run_study(study.NAME, study.run, config, workdir)
    finally:
        mp.undo()
    return TwoRuns(workdir, config, first, second, metrics, analyses, calls)
