"""A training run in a child process, for the crash-and-resume tests of test_training.py.

    python tests/training_child.py WORKDIR CONFIG_JSON [KILL]

runs ``training.train(CONFIG, WORKDIR)`` and prints ``{"status", "step", "resumed_from"}`` as
JSON. KILL makes the process SIGKILL itself at one point of the run:

* ``step:K``: during the update of step K (after its measurements and checkpoint);
* ``measure:K``: inside the measurements of step K, after the other measurements of the row
  ran and before the row is written (the ``kill_switch`` measurement, listed last);
* ``checkpoint:K``: inside the checkpoint write of step K, when every file is written into
  the temporary directory and only the final rename is left;
* ``interrupt:K``: Ctrl-C (the KeyboardInterrupt of SIGINT) instead of SIGKILL during the
  update of step K, with the run under ``experiments.cli.run`` as a binary runs.

The ``kill_switch`` measurement (returns nothing) is registered in every run so that killed,
resumed and reference runs share one config. ``JAX_COMPILATION_CACHE_DIR`` (set by the test)
lets the children share compiled programs.
"""

import json
import os
import signal
import sys

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

from sharpness_jax import training  # noqa: E402
from sharpness_jax.measurements import register_measurement  # noqa: E402


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def main(workdir: str, config: str, kill: str = "none:-1") -> None:
    kind, _, at = kill.partition(":")
    at = int(at)

    def kill_switch(ctx):
        if kind == "measure" and ctx.step == at:
            _die()
        return {}

    register_measurement("kill_switch", kill_switch)

    if kind in ("step", "interrupt"):

        def _ctrl_c():
            # What Python's SIGINT handler does, run at this point of the step: a signal
            # sent with os.kill is handled at a later bytecode boundary, which made the
            # step it lands in depend on the machine's load.
            signal.default_int_handler(signal.SIGINT, None)

        batch_indices = training._batch_indices

        def indices(sampler, step):
            if step == at:
                _die() if kind == "step" else _ctrl_c()
            return batch_indices(sampler, step)

        training._batch_indices = indices
    elif kind == "checkpoint":
        from orbax.checkpoint._src.path import atomicity

        finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize_or_die(self):
            if self.get_final().name == str(at):
                _die()
            return await finalize(self)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die

    result = training.train(json.loads(config), workdir)
    print(
        json.dumps(
            {"status": result.status, "step": result.step, "resumed_from": result.resumed_from}
        )
    )


if __name__ == "__main__":
    if sys.argv[3:4] and sys.argv[3].startswith("interrupt:"):
        from experiments import cli

        cli.run(lambda argv: main(*argv[1:]))
    else:
        main(*sys.argv[1:])
