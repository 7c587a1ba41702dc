"""The studies' configs: ``experiments/configs/<study>.py`` defines ``get_config(preset)``.

Every study has the presets ``smoke`` (seconds, used by the tests), ``quick`` (minutes on a
laptop CPU, the main job) and ``paper`` (the published setup, for a GPU/TPU).
"""

from collections.abc import Mapping
from typing import Any

import ml_collections

from sharpness_jax.config import default_config

PRESETS = ("smoke", "quick", "paper")


def check_preset(preset: str) -> str:
    """Returns ``preset`` or raises for an unknown one."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    return preset


def new_study(
    preset: str, **base: Any
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """A study config ``c`` holding ``c.preset`` and ``c.base``, the training config that the
    study's runs start from: the default one (``config.default_config()``) edited by ``base``.

    Args:
      preset: one of :data:`PRESETS`.
      **base: edits of the default training config, by top-level field: a mapping updates
        that section recursively (``model={"name": "mlp", "widths": (16,)}``,
        ``measure={"names": ("loss", "lambda_max"), "options": {"lambda_max": {"k": 2}}}``),
        any other value replaces the field (``log_every=200``).

    Returns:
      ``(c, c.base)``: the caller fills in the study's knobs and edits the base in place.

    Raises:
      ValueError: for an unknown preset.
      KeyError: for a field that the default training config does not have.
    """
    c = ml_collections.ConfigDict()
    c.preset = check_preset(preset)
    c.base = default_config()
    for field, value in base.items():
        if field not in c.base:
            raise KeyError(f"the training config has no field {field!r}")
        if isinstance(value, Mapping):
            c.base[field].update(value)
        else:
            c.base[field] = value
    return c, c.base


def lambda_max_options(*, k: int, num_iters: int) -> dict[str, Any]:
    """Options of the ``lambda_max`` measurement along a training run: the top ``k``
    eigenpairs by ``num_iters`` Lanczos iterations (relative tolerance 1e-3), warm-started
    from the previous measurement step's eigenvectors."""
    return {"k": k, "num_iters": num_iters, "tol": 1e-3, "warm_start": True}
