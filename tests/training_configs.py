"""Small run configs, a compile log and a shared compile cache for the tests of the training
loop and its parts (test_training, test_config, test_optim, test_measurements, ...)."""

import jax
import numpy as np

from sharpness_jax import training
from sharpness_jax.config import resolve_config
from sharpness_jax.programs import CompileCache

# The compile cache of these tests: runs of the same setup share compiled programs.
CACHE = CompileCache()

# A tiny 3-class problem shared by most tests (they then share compiled programs).
BASE = {
    "dataset": {
        "name": "gaussian_mixture",
        "num_train": 64,
        "num_test": 32,
        "input_dim": 4,
        "separation": 6.0,
    },
    "model": {"name": "mlp", "widths": (8,), "activation": "relu"},
    "optimizer": {"name": "gd", "learning_rate": 0.5},
    "max_steps": 20,
    "dtype": "float64",
    "measure": {"every": 5, "names": ("loss", "accuracy")},
    "checkpoint_every": 5,
    "log_every": 0,
}


def _merge(base, overrides):
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def config(**overrides):
    """BASE with nested overrides, e.g. config(optimizer={"name": "adam"}, max_steps=3)."""
    return resolve_config(_merge(BASE, overrides))


def losses(result):
    return np.array([row["train_loss"] for row in result.rows])


def train(config, workdir=None, **kwargs):
    """``training.train`` with the tests' compile cache."""
    return training.train(config, workdir, cache=CACHE, **kwargs)


class CompileLog:
    """Collects the names of the functions XLA compiles while active."""

    def __init__(self):
        self.names = []

    def _listen(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.names.append(kwargs.get("fun_name"))

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)

    def ours(self, names):
        return sorted(n for n in self.names if n in {f"jit({m})" for m in names})
