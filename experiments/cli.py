"""The command-line layer every binary runs under: its flags in ``--help``, user errors as one
line, interrupts as one line.

``run(main)`` wraps ``absl.app.run``:

* ``--help`` lists the binary's own flags, including those it takes from ``experiments.launch``
  (``--config``, ``--workdir``, ``--force``, ``--mesh``, ...), and exits with status 0
  (``--helpfull`` lists every flag, absl's and JAX's too);
* an expected error — a bad flag or config value (``ValueError``, ``KeyError``, a typo in a
  ``--config.<field>`` override), a missing file or dataset (``FileNotFoundError``), a workdir
  holding a run with another config (``records.ConfigMismatchError``) — is reported as one
  line on stderr, ``error: <what is wrong and how to fix it>``, with exit status 2;
* Ctrl-C (``KeyboardInterrupt``) is reported as one line, e.g. ``interrupted at step 40; last
  checkpoint at step 30; rerun the same command to resume``, with exit status 130;
* anything else (a bug) keeps its traceback.

The traceback of an expected error or an interrupt is printed as well with ``--verbosity=1``
(or higher) or the environment variable ``SHARPNESS_JAX_TRACEBACK=1``.

The stand-alone binaries (``measure``, ``reproduce``, ``benchmark``) define their flags only
when they run as a program (:func:`run_program`), so the modules import side by side (several
define a flag of the same name, e.g. ``--chunk_size``).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags

from sharpness_jax import data, records, training

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "TRACEBACK_ENV", "error_line", "run", "run_program"]

TRACEBACK_ENV = "SHARPNESS_JAX_TRACEBACK"
EXIT_ERROR = 2  # a usage error, as absl reports a bad flag and most Unix tools a bad argument
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

# The errors the library and the binaries raise for a user's mistake, each with its own message.
_EXPECTED = (ValueError, KeyError, OSError)
_HELP = ("-h", "--help", "-help", "--helpshort", "-?")
_HELPFULL = ("--helpfull", "-helpfull")


class _FlagError(Exception):
    """A flag value (a ``--config`` file or override) that could not be parsed."""


def _text(error: BaseException) -> str:
    """The exception's message (a KeyError's without its quotes)."""
    if len(error.args) == 1 and isinstance(error.args[0], BaseException):
        return _text(error.args[0])  # ml_collections wraps a KeyError in an AttributeError
    if isinstance(error, KeyError) and len(error.args) == 1:
        return str(error.args[0])
    return str(error)


def _one_line(text: str) -> str:
    """``text`` on one line: its lines (stripped) joined by a space after punctuation, by
    '; ' otherwise."""
    out = ""
    for part in (p.strip() for p in text.strip().splitlines()):
        if part:
            out += ("" if not out else " " if out[-1] in ".:;,!?" else "; ") + part
    return out


def error_line(error: BaseException) -> str:
    """The one-line message of an expected error, as the binaries print it (without
    ``error:``): what is wrong and how to fix it."""
    if isinstance(error, records.ConfigMismatchError):
        changes = ", ".join(error.differences)
        return (
            f"{error.path} holds a run with a different config ({changes}); use a new "
            "--workdir, restore the old values, or pass --force to continue it with this config"
        )
    text = _one_line(_text(error))
    if isinstance(error, data.DatasetNotFoundError):
        text += (
            " Or point the run at the directory that holds it: --config.base.dataset.data_dir=DIR"
            " (--config.dataset.data_dir=DIR for a single run) or the environment variable"
            " TFDS_DATA_DIR."
        )
    if isinstance(error, _FlagError):
        text = f"bad flag value: {text}"
    return text


def _traceback_wanted() -> bool:
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        return True
    try:
        return flags.FLAGS["verbosity"].value >= 1
    except (KeyError, AttributeError, TypeError):
        return False


def _report(line: str, code: int) -> None:
    """Prints ``line`` (and the traceback of the exception being handled, when wanted) on
    stderr and exits with ``code``."""
    if _traceback_wanted():
        traceback.print_exc()
    else:
        line += f" (traceback: --verbosity=1 or {TRACEBACK_ENV}=1)"
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def _flag_error_text(error: flags.Error) -> str:
    """absl's message, with a traceback it embeds (ml_collections does for an error raised
    while loading a ``--config`` file) cut down to the error's own line."""
    text = str(error)
    head, found, rest = text.partition("Traceback (most recent call last)")
    if found:
        last = [line.strip() for line in rest.splitlines() if line.strip()][-1]
        text = f"{head.strip().rstrip(':').rpartition(': ')[0]}: {last.partition(': ')[2] or last}"
    return f"{text} (see --help)"


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing (``app.parse_flags_with_usage`` without its usage message); an
    error of a flag's value (e.g. the ``AttributeError`` of an ml_collections override naming
    no field) becomes a :class:`_FlagError`."""
    try:
        return flags.FLAGS(list(argv))
    except flags.Error as e:
        raise _FlagError(_flag_error_text(e)) from e
    except (AttributeError, *_EXPECTED) as e:
        text = _text(e)
        name = text.splitlines()[0].strip("'\"") if text else ""
        culprits = [a.split("=")[0] for a in argv[1:] if name and f".{name}" in a.split("=")[0]]
        if culprits:  # a --config.<path> override naming no field
            text = f"{culprits[0]} names no config field {text}"
        raise _FlagError(text) from e


def _adopt_key_flags() -> None:
    """Makes the flags the ``experiments`` modules define key flags of the main module, so
    that ``--help`` lists them."""
    fv = flags.FLAGS
    main = sys.argv[0]
    for module, module_flags in fv.flags_by_module_dict().items():
        if module == main or not str(module).startswith("experiments."):
            continue
        for flag in module_flags:
            fv.register_key_flag_for_module(main, flag)


def _help(argv: Sequence[str]) -> None:
    """Prints the help and exits with status 0 if ``argv`` asks for it."""
    asked = [a.split("=")[0] for a in argv[1:]]
    full = any(a in _HELPFULL for a in asked)
    if full or any(a in _HELP for a in asked):
        app.usage(shorthelp=not full, writeto_stdout=True)
        if not full:
            print("\nTry --helpfull to get a list of all flags.")
        sys.exit(0)


def run(main: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> None:
    """Runs ``main(argv)`` under ``absl.app.run`` with the reporting described above."""
    argv = list(sys.argv if argv is None else argv)
    _adopt_key_flags()
    _help(argv)
    try:
        app.run(main, argv=argv, flags_parser=_parse_flags)
    except KeyboardInterrupt as e:
        _report(
            str(e) if isinstance(e, training.TrainingInterrupted) else "interrupted",
            EXIT_INTERRUPTED,
        )
    except (_FlagError, *_EXPECTED) as e:
        _report(f"error: {error_line(e)}", EXIT_ERROR)


def run_program(main: Callable[[], None], define_flags: Callable[[], None]) -> None:
    """Defines the binary's flags, then runs ``main()`` under :func:`run`, which parses them
    (``flags.FLAGS``).

    Raises:
      app.UsageError: (reported by absl) for positional arguments left after the flags.
    """
    define_flags()

    def absl_main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        main()

    run(absl_main)
