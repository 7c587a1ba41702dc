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
    logging.set_verbosity(logging.INFO)
    # Orbax reports every checkpoint step at INFO; keep the study's own progress readable.
    logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
    summary = common.run_study(
        study.NAME, study.run, config_flag.value, workdir_flag.value, force=_FORCE.value
    )
    print(
        f"{study.NAME}: {'all checks passed' if summary['passed'] else 'some checks failed'}"
        f" ({summary['elapsed_s']:.0f} s); see {workdir_flag.value}/summary.json"
    )
