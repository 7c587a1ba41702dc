r"""Measure a trained model: any registered measurement, on a run's checkpoint or any params.

From a training run's workdir (its stored config and latest checkpoint)::

  python -m experiments.measure --run=runs/eos/runs/gd_lr0.1 \
      --measures=lambda_max,trace_hessian,batch_sharpness --options='{"lambda_max": {"k": 5}}'

From parameters saved with orbax (``orbax.checkpoint.StandardCheckpointer``) and a training
config in JSON (its ``dataset``, ``model`` and ``loss`` say what the params are)::

  python -m experiments.measure --params=/path/to/params --config_json=my_model.json \
      --measures=lambda_max,riemannian_sharpness --dataset='{"name": "mnist5k"}'

A model with batch-norm state (``resnet18``) is measured in eval mode at the running
statistics stored with its params: those of the run's checkpoint with ``--run``; with
``--params`` the checkpoint must hold ``{"params": θ, "model_state": s}`` (the layout of a
run's checkpoints).

A model of your own (``model.factory = "pkg.module:fn"`` in the stored or given config) is
rebuilt from that factory, so its module must be importable here (e.g. on ``PYTHONPATH``).

Prints one JSON object (the measurement row) and writes it to ``--output`` if given.
Measurement names: see ``sharpness_jax.measurements.MEASUREMENTS`` (``--list`` prints them).
"""

from __future__ import annotations

import contextlib
import difflib
import json

import jax
from absl import flags, logging

from experiments import cli, launch
from sharpness_jax import models, records, training
from sharpness_jax.config import resolve_config
from sharpness_jax.measurements import MEASUREMENTS
from sharpness_jax.programs import CompileCache


def _suggest(name: str, known) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known``, or nothing."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_names(measures: list[str], options: dict) -> None:
    """Checks the measurement names of ``--measures`` and ``--options`` and the option names,
    before anything is loaded.

    Raises:
      ValueError: for an unknown measurement or option (with the closest known name), or
        options for a measurement ``--measures`` does not name.
    """
    if not isinstance(options, dict):
        raise ValueError("--options must be a JSON object {measurement: {option: value}}")
    for name in [*measures, *options]:
        if name not in MEASUREMENTS:
            raise ValueError(
                f"unknown measurement {name!r}{_suggest(name, MEASUREMENTS)}; see --list for "
                "the known measurements"
            )
    for name, given in options.items():
        if name not in measures:
            raise ValueError(
                f"--options sets options of {name!r}, which --measures does not name: add it "
                f"to --measures (now {','.join(measures)}) or drop its options"
            )
        if not isinstance(given, dict):
            raise ValueError(f"--options: the options of {name!r} must be a JSON object")
        defaults = MEASUREMENTS[name].defaults
        for option in given:
            if option not in defaults:
                raise ValueError(
                    f"measurement {name!r} takes no option {option!r}"
                    f"{_suggest(option, defaults)}; its options: {sorted(defaults)}"
                )


def _restore_params(path: str, model_name: str):
    """``(params, model_state)`` of an orbax checkpoint of params (``model_state`` None), or
    of ``{"params": θ, "model_state": s}`` for a model with batch-norm state.

    Raises:
      ValueError: for a stateful model whose checkpoint lacks either part.
    """
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(path)
    if model_name not in models.STATEFUL_MODELS:
        return restored, None
    if not (isinstance(restored, dict) and {"params", "model_state"} <= set(restored)):
        raise ValueError(
            f"model {model_name!r} has batch-norm state: --params must hold "
            '{"params": θ, "model_state": s} (the running statistics that go with θ, as a '
            "run's checkpoint stores them), or measure the run with --run"
        )
    return restored["params"], restored["model_state"]


def run(
    *,
    run_dir: str | None,
    step: int | None,
    params_path: str | None,
    config_json: str | None,
    measures: list[str],
    options: dict,
    dataset: dict | None,
    measure_subset: int | None,
    chunk_size: int | None,
    mesh,
    cache: CompileCache | None = None,
) -> dict:
    """Loads config and params, runs the measurements once, returns the row (in float64
    JAX when the run's dtype is float64); ``cache``: the compile cache (None: a fresh one)."""
    if (run_dir is None) == (params_path is None):
        raise ValueError("give exactly one of --run and --params")
    check_names(measures, options)
    if run_dir is None and config_json is None:
        raise ValueError("--params needs --config_json (what model and data they belong to)")
    if run_dir is not None:
        stored = records.read_config(run_dir)
    else:
        stored = records.read_json(config_json)
    float64 = stored is not None and resolve_config(stored).dtype == "float64"
    model_state = None
    with jax.enable_x64(True) if float64 else contextlib.nullcontext():
        if run_dir is not None:
            config, params, step, *state = training.load_checkpoint(run_dir, step=step)
            model_state = state[0] if state else None
        else:
            config, params = resolve_config(stored), None
        config.measure.names = tuple(measures)
        config.measure.options = dict(options)
        if dataset is not None:
            config.dataset = dataset
        if measure_subset is not None:
            config.measure_subset = measure_subset
        if chunk_size is not None:
            config.chunk_size = chunk_size
        config.mesh = mesh
        if params_path is not None:
            params, model_state = _restore_params(params_path, config.model.name)
        row, arrays = training.measure(
            config, params, step=step or 0, cache=cache, model_state=model_state
        )
    row = {"step": step or 0, **row, **{k: v.tolist() for k, v in arrays.items()}}
    return records.encode_value(row)


def main() -> None:
    f = flags.FLAGS
    if f.list:
        for name, m in sorted(MEASUREMENTS.items()):
            print(f"{name}: options {dict(m.defaults)}")
        return
    mesh = launch.setup(logging.WARNING)
    row = run(
        run_dir=f.run,
        step=f.step,
        params_path=f.params,
        config_json=f.config_json,
        measures=f.measures,
        options=json.loads(f.options),
        dataset=None if f.dataset is None else json.loads(f.dataset),
        measure_subset=f.measure_subset,
        chunk_size=f.chunk_size,
        mesh=mesh,
    )
    print(json.dumps(row, indent=1))
    if f.output:
        records.write_json(f.output, row, sort_keys=False)


def define_flags() -> None:
    """The binary's flags besides the shared --mesh / --distributed of ``launch``."""
    flags.DEFINE_string("run", None, "A training run's workdir (config + checkpoints).")
    flags.DEFINE_integer("step", None, "Checkpoint step of --run (default: the latest).")
    flags.DEFINE_string("params", None, "An orbax checkpoint of a params pytree.")
    flags.DEFINE_string("config_json", None, "Training config (JSON) for --params.")
    flags.DEFINE_list("measures", ["loss", "lambda_max"], "Measurement names.")
    flags.DEFINE_string("options", "{}", "JSON: {measurement: {option: value}}.")
    flags.DEFINE_string("dataset", None, "JSON overriding the config's dataset section.")
    flags.DEFINE_integer("measure_subset", None, "At most this many training examples.")
    flags.DEFINE_integer("chunk_size", None, "Examples per chunk (bounds memory).")
    flags.DEFINE_string("output", None, "Also write the JSON row here.")
    flags.DEFINE_bool("list", False, "List the registered measurements and exit.")


if __name__ == "__main__":
    cli.run_program(main, define_flags)
