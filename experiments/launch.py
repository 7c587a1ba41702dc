"""The flags every study binary shares and its ``main``: config, workdir, mesh."""

from __future__ import annotations

import os

from absl import flags, logging
from ml_collections import config_flags

from experiments.studies import common

_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")

_FORCE = flags.DEFINE_bool(
    "force", False, "Rerun in a workdir whose stored config differs from this one."
)
_MESH = flags.DEFINE_string(
    "mesh",
    "auto",
    "Devices of the data-parallel mesh: 'auto' (all), 'none' (the default device) or a count.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host TPU/GPU)."
)


def mesh_from_flag(value: str):
    """'auto' -> "auto", 'none' -> None, '4' -> 4."""
    if value == "none":
        return None
    if value == "auto":
        return "auto"
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise ValueError(f"--mesh must be 'auto', 'none' or a positive device count, got {value!r}")


def setup(verbosity: int = logging.INFO) -> object:
    """Logging (at ``verbosity`` unless ``--verbosity`` is given), optional multi-host
    initialisation; returns the mesh of --mesh."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(verbosity)
    # Orbax reports every checkpoint step at INFO; keep the study's own progress readable.
    logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
    mesh = mesh_from_flag(_MESH.value)
    if _DISTRIBUTED.value:
        import jax

        jax.distributed.initialize()
    return mesh


def define_flags(study: str):
    """Defines ``--config`` (default: this study's ``quick`` preset) and ``--workdir``."""
    config = config_flags.DEFINE_config_file(
        "config",
        os.path.join(_CONFIG_DIR, f"{study}.py") + ":quick",
        "Study config file, with the preset after a colon (smoke, quick or paper).",
        lock_config=True,
    )
    workdir = flags.DEFINE_string(
        "workdir", None, "Where the study writes its record; rerun to resume.", required=True
    )
    return config, workdir


def main(argv, study, config_flag, workdir_flag) -> None:
    """Runs ``study.run`` through :func:`common.run_study` with the parsed flags."""
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {argv[1:]}")
    mesh = setup()
    summary = common.run_study(
        study.NAME,
        study.run,
        config_flag.value,
        workdir_flag.value,
        force=_FORCE.value,
        mesh=mesh,
    )
    print(
        f"{study.NAME}: {'all checks passed' if summary['passed'] else 'some checks failed'}"
        f" ({summary['elapsed_s']:.0f} s); see {workdir_flag.value}/summary.json"
    )
