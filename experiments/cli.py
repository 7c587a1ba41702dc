"""The entry point of the stand-alone binaries (``measure``, ``reproduce``, ``benchmark``).

Their flags are defined only when a module runs as a program, so the modules import side by
side (several define a flag of the same name, e.g. ``--chunk_size``).
"""

from __future__ import annotations

from collections.abc import Callable

from absl import app


def run_program(main: Callable[[], None], define_flags: Callable[[], None]) -> None:
    """Defines the binary's flags, then runs ``main()`` under ``absl.app.run``, which parses
    them (``flags.FLAGS``).

    Raises:
      app.UsageError: (reported by absl) for positional arguments left after the flags.
    """
    define_flags()

    def absl_main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        main()

    app.run(absl_main)
