"""The studies' configs: ``experiments/configs/<study>.py`` defines ``get_config(preset)``.

Every study has the presets ``smoke`` (seconds, used by the tests), ``quick`` (minutes on a
laptop CPU, the main job) and ``paper`` (the published setup, for a GPU/TPU).
"""

import ml_collections

from sharpness_jax.config import default_config

PRESETS = ("smoke", "quick", "paper")


def check_preset(preset: str) -> str:
    """Returns ``preset`` or raises for an unknown one."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    return preset


def new_study(preset: str) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """A study config ``c`` holding ``c.preset`` and ``c.base``, the default training config
    (``config.default_config()``) that the study's runs start from.

    Returns:
      ``(c, c.base)``: the caller fills in the study's knobs and edits the base in place.

    Raises:
      ValueError: for an unknown preset.
    """
    c = ml_collections.ConfigDict()
    c.preset = check_preset(preset)
    c.base = default_config()
    return c, c.base
