r"""The main job: run every study at a preset and write ``report.md`` with figures and claims.

  python -m experiments.reproduce --workdir=runs/reproduce            # quick preset
  python -m experiments.reproduce --workdir=runs/smoke --preset=smoke
  python -m experiments.reproduce --workdir=runs/paper --preset=paper --studies=edge_of_stability

Each study runs in ``<workdir>/<study>`` (see ``experiments/studies/common.py``); rerunning
with the same workdir resumes: finished studies are read back from their summaries' runs and
analyses, an interrupted one continues from its last checkpoint. The report lists, per study,
a paragraph on the claim, its figures and a table of claim checks (measured value, expected
range, pass/fail).
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

from absl import flags

from experiments import cli, configs, launch
from experiments.studies import STUDIES, common


def study_module(name: str):
    """The runner module of study ``name``."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose from {STUDIES}")
    return importlib.import_module(f"experiments.studies.{name}")


def study_config(name: str, preset: str):
    """``get_config(preset)`` of study ``name``."""
    study_module(name)  # validates the name
    return importlib.import_module(f"experiments.configs.{name}").get_config(preset)


def run_all(
    workdir: str | os.PathLike, preset: str, studies=STUDIES, *, force=False, mesh=None
) -> list[dict]:
    """Runs the studies one after the other and writes ``report.md``; returns the summaries."""
    for name in studies:  # fail fast on a bad name or preset, before any training
        study_config(name, preset)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    summaries, start = [], time.time()
    for i, name in enumerate(studies, 1):
        module = study_module(name)
        print(f"[{i}/{len(studies)}] {name} ({preset}) ...", flush=True)
        summary = common.run_study(
            name,
            module.run,
            study_config(name, preset),
            workdir / name,
            force=force,
            mesh=mesh,
        )
        evaluated = [c for c in summary["checks"] if c["passed"] is not None]
        passed = sum(c["passed"] for c in evaluated)
        print(
            f"[{i}/{len(studies)}] {name}: {passed}/{len(evaluated)} checks passed in "
            f"{summary['elapsed_s']:.0f} s (total {time.time() - start:.0f} s)",
            flush=True,
        )
        summaries.append(summary)
    path = write_report(workdir, summaries, preset, elapsed=time.time() - start)
    print(f"report: {path}")
    return summaries


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return f"{value:.4g}"


def write_report(workdir: Path, summaries: list[dict], preset: str, *, elapsed: float) -> Path:
    """``report.md``: per study a paragraph, its figures and its claim checks."""
    lines = [
        "# sharpness_jax: reproduction of the five studies",
        "",
        f"Preset `{preset}`; {len(summaries)} studies in {elapsed / 60:.1f} min "
        "(resumed parts count only the time of this invocation).",
        "",
        *([f"**{common.SMOKE_NOTE}.**", ""] if preset == "smoke" else []),
        "| study | checks passed | time (s) |",
        "|---|---|---|",
    ]
    for s in summaries:
        evaluated = [c for c in s["checks"] if c["passed"] is not None]
        passed = sum(c["passed"] for c in evaluated)
        lines.append(
            f"| [{s['study']}](#{s['study']}) | {passed}/{len(evaluated)} | {s['elapsed_s']:.0f} |"
        )
    for s in summaries:
        doc = (study_module(s["study"]).__doc__ or "").strip().split("\n\n")[0]
        lines += ["", f"## {s['study']}", "", " ".join(doc.split()), ""]
        for fig in s["figures"]:
            lines.append(f"![{s['study']}]({s['study']}/{fig})")
        lines += [
            "",
            "| claim | measured | expected | result | source |",
            "|---|---|---|---|---|",
        ]
        for c in s["checks"]:
            mark = {True: "pass", False: "**FAIL**", None: "n/a"}[c["passed"]]
            detail = f" ({c['detail']})" if c.get("detail") else ""
            lines.append(
                f"| {c['claim']}{detail} | {_fmt(c['value'])} | {c['expected']} | {mark} "
                f"| {c.get('source', '')} |"
            )
    path = workdir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    f = flags.FLAGS
    mesh = launch.setup()
    run_all(f.workdir, f.preset, tuple(f.studies), force=f.force, mesh=mesh)


def define_flags() -> None:
    """The job's flags besides the shared --force / --mesh / --distributed of ``launch``."""
    flags.DEFINE_string("workdir", "runs/reproduce", "Where to write the studies and report.")
    flags.DEFINE_enum("preset", "quick", configs.PRESETS, "Preset of every study.")
    flags.DEFINE_list("studies", list(STUDIES), "Studies to run, in order.")


if __name__ == "__main__":
    cli.run_program(main, define_flags)
