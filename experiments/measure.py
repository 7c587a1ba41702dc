r"""Measure a trained model: any registered measurement, on a run's checkpoint or any params.

From a training run's workdir (its stored config and latest checkpoint)::

  python -m experiments.measure --run=runs/eos/runs/gd_lr0.1 \
      --measures=lambda_max,trace_hessian,batch_sharpness --options='{"lambda_max": {"k": 5}}'

From parameters saved with orbax (``orbax.checkpoint.StandardCheckpointer``) and a training
config in JSON (its ``dataset``, ``model`` and ``loss`` say what the params are)::

  python -m experiments.measure --params=/path/to/params --config_json=my_model.json \
      --measures=lambda_max,riemannian_sharpness --dataset='{"name": "mnist5k"}'

Prints one JSON object (the measurement row) and writes it to ``--output`` if given.
Measurement names: see ``sharpness_jax.training.MEASUREMENTS`` (``--list`` prints them).
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from sharpness_jax import records, training

_RUN = flags.DEFINE_string("run", None, "A training run's workdir (config + checkpoints).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --run (default: the latest).")
_PARAMS = flags.DEFINE_string("params", None, "An orbax checkpoint of a params pytree.")
_CONFIG_JSON = flags.DEFINE_string("config_json", None, "Training config (JSON) for --params.")
_MEASURES = flags.DEFINE_list("measures", ["loss", "lambda_max"], "Measurement names.")
_OPTIONS = flags.DEFINE_string("options", "{}", "JSON: {measurement: {option: value}}.")
_DATASET = flags.DEFINE_string("dataset", None, "JSON overriding the config's dataset section.")
_SUBSET = flags.DEFINE_integer("measure_subset", None, "At most this many training examples.")
_CHUNK = flags.DEFINE_integer("chunk_size", None, "Examples per chunk (bounds memory).")
_MESH = flags.DEFINE_string("mesh", None, "None, 'auto' or a device count.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the JSON row here.")
_LIST = flags.DEFINE_bool("list", False, "List the registered measurements and exit.")


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
) -> dict:
    """Loads config and params, runs the measurements once, returns the row."""
    if (run_dir is None) == (params_path is None):
        raise ValueError("give exactly one of --run and --params")
    unknown = [m for m in measures if m not in training.MEASUREMENTS]
    if unknown:
        raise ValueError(f"unknown measurements {unknown}; known: {sorted(training.MEASUREMENTS)}")
    if run_dir is not None:
        config, params, step = training.load_checkpoint(run_dir, step=step)
    else:
        if config_json is None:
            raise ValueError("--params needs --config_json (what model and data they belong to)")
        with open(config_json) as f:
            config = training.resolve_config(json.load(f))
        params = None
    config.measure.names = tuple(measures)
    config.measure.options = {k: v for k, v in options.items() if k in measures}
    if dataset is not None:
        config.dataset = dataset
    if measure_subset is not None:
        config.measure_subset = measure_subset
    if chunk_size is not None:
        config.chunk_size = chunk_size
    config.mesh = mesh
    if params_path is not None:
        import orbax.checkpoint as ocp

        params = ocp.StandardCheckpointer().restore(params_path)
    row, arrays = training.measure(config, params, step=step or 0)
    row = {"step": step or 0, **row, **{k: v.tolist() for k, v in arrays.items()}}
    return records.encode_value(row)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _LIST.value:
        for name, m in sorted(training.MEASUREMENTS.items()):
            print(f"{name}: options {dict(m.defaults)}")
        return
    logging.set_verbosity(logging.WARNING)
    mesh = _MESH.value
    if mesh is not None and mesh.isdigit():
        mesh = int(mesh)
    row = run(
        run_dir=_RUN.value,
        step=_STEP.value,
        params_path=_PARAMS.value,
        config_json=_CONFIG_JSON.value,
        measures=_MEASURES.value,
        options=json.loads(_OPTIONS.value),
        dataset=None if _DATASET.value is None else json.loads(_DATASET.value),
        measure_subset=_SUBSET.value,
        chunk_size=_CHUNK.value,
        mesh=mesh,
    )
    text = json.dumps(row, indent=1)
    print(text)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
