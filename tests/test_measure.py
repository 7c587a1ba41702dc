"""The measure binary on a run of every study's smoke preset (its stored config names the
study's measurements), and ``--list`` showing every built-in measurement."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import measure as measure_bin
from experiments import reproduce
from experiments.studies import STUDIES, common
from sharpness_jax import training
from sharpness_jax.measurements import BUILTIN_MEASUREMENTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _FirstRun(Exception):
    """Raised by the patched ``common.train_run`` with the study's first run config."""


def _first_run_config(name, tmp_path, monkeypatch):
    """The config of the first sub-run of study ``name``'s smoke preset (nothing trained)."""

    def capture(workdir, run_name, config, **kwargs):
        raise _FirstRun(config)

    monkeypatch.setattr(common, "train_run", capture)
    with pytest.raises(_FirstRun) as caught:
        reproduce.study_module(name).run(reproduce.study_config(name, "smoke"), tmp_path)
    monkeypatch.undo()
    return caught.value.args[0]


def _short_run(name, tmp_path, monkeypatch):
    """A two-step run of the study's first sub-run config, measured at every step."""
    cfg = _first_run_config(name, tmp_path / "study", monkeypatch)
    cfg.max_steps = 2
    cfg.measure.every = 1
    cfg.measure.num_log_steps = 0
    cfg.optimizer.warmup_steps = 0
    if cfg.optimizer.schedule != "constant":
        cfg.optimizer.decay_steps = 2
    run_dir = tmp_path / "run"
    result = training.train(cfg, run_dir)
    assert result.step <= 2 and result.status != "diverged", name
    return cfg, run_dir, result


def _measure(run_dir, cfg, **kwargs):
    return measure_bin.run(
        run_dir=str(run_dir),
        step=None,
        params_path=None,
        config_json=None,
        measures=list(cfg.measure.names),
        options=cfg.measure.options.to_dict(),
        dataset=None,
        measure_subset=None,
        chunk_size=None,
        mesh=None,
        **kwargs,
    )


@pytest.mark.parametrize("name", STUDIES)
def test_measure_a_run_of_every_study(name, tmp_path, monkeypatch):
    cfg, run_dir, result = _short_run(name, tmp_path, monkeypatch)
    row = _measure(run_dir, cfg)
    last = result.rows[-1]
    assert row["step"] == last["step"] == result.step
    scalars = {k for k, v in last.items() if k != "arrays" and np.ndim(v) == 0}
    assert scalars <= row.keys(), name
    np.testing.assert_allclose(row["step"], last["step"])
    if "train_loss" in last:  # the run's objective, dtype and data
        np.testing.assert_allclose(row["train_loss"], last["train_loss"], rtol=1e-6)
    if name == "quotient_geometry":  # float64: the binary switches 64-bit JAX on itself
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        args = [
            "-m",
            "experiments.measure",
            f"--run={run_dir}",
            f"--measures={','.join(cfg.measure.names)}",
            f"--options={json.dumps(cfg.measure.options.to_dict())}",
            "--mesh=none",
        ]
        proc = subprocess.run(
            [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout[proc.stdout.index("{") :])
        np.testing.assert_allclose(out["quotient_lambda_max"], row["quotient_lambda_max"])


def test_list_shows_every_measurement():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.measure", "--list"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = {line.split(":")[0] for line in proc.stdout.splitlines() if line}
    assert listed == {m.name for m in BUILTIN_MEASUREMENTS}


def _names(measures, options):
    return measure_bin.run(
        run_dir="no/such/run",  # nothing is loaded: the names are checked first
        step=None,
        params_path=None,
        config_json=None,
        measures=measures,
        options=options,
        dataset=None,
        measure_subset=None,
        chunk_size=None,
        mesh=None,
    )


@pytest.mark.parametrize(
    "measures, options, message",
    [
        (["lamda_max"], {}, "unknown measurement 'lamda_max' (did you mean 'lambda_max'?)"),
        (["loss"], {"lamda_max": {"k": 2}}, "did you mean 'lambda_max'"),
        (["loss"], {"lambda_max": {"k": 2}}, "which --measures does not name"),
        (["lambda_max"], {"lambda_max": {"kk": 2}}, "no option 'kk' (did you mean 'k'?)"),
        (["lambda_max"], ["k"], "must be a JSON object"),
    ],
)
def test_unknown_names_are_errors_before_loading(measures, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _names(measures, options)
