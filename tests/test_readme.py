"""The README's code examples run as written."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _section_code(title: str) -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python block in README section {title!r}"
    return "\n".join(blocks)


def _run_section(title: str) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _section_code(title)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_your_own_model_example_runs():
    out = _run_section("Your own model")
    assert re.search(r"\[\s*[0-9.e+-]+\s*\]", out), out


def test_the_notebook_snippet_prints_what_it_computes():
    lines = _run_section("In a notebook").strip().splitlines()
    assert len(lines) == 4, lines
    assert len(lines[0].strip("[]").split()) == 3  # three eigenvalues
    assert len([float(v) for v in lines[1].split()]) == 3  # tr(H), its SE, tr(C)
    assert lines[2].startswith("Eigen(values=[") and "float32[3, 784, 100]" in lines[2]
    assert len(lines[2]) < 600  # shapes, not the eigenvectors
    assert float(lines[3].strip("[]")) > 0  # the layer's λ_max
