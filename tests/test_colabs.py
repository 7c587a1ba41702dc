"""The notebooks in ``colabs/``: every jupytext pair (``NN_name.py`` in percent format beside
``NN_name.ipynb``) agrees cell by cell, the ``.ipynb`` carries no outputs, and every notebook
runs end to end on its smoke settings (``SHARPNESS_JAX_SMOKE=1``) in a fresh ``python3``
kernel of this interpreter, on the CPU.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import ipykernel.kernelspec
import jupytext
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLABS = ROOT / "colabs"
NOTEBOOKS = sorted(p.stem for p in COLABS.glob("[0-9][0-9]_*.ipynb"))
SCRIPTS = sorted(p.stem for p in COLABS.glob("[0-9][0-9]_*.py"))
PAIRING = "ipynb,py:percent"
# Notebook-level metadata a stripped notebook may carry.
ALLOWED_METADATA = {"jupytext", "kernelspec", "language_info", "colab", "accelerator"}
TIMEOUT_SECONDS = 600


def _cells(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def _code_cells(notebook) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def test_every_notebook_is_paired():
    assert NOTEBOOKS, f"no notebooks found in {COLABS}"
    assert NOTEBOOKS == SCRIPTS, (
        f"unpaired notebooks: .ipynb without .py {sorted(set(NOTEBOOKS) - set(SCRIPTS))}, "
        f".py without .ipynb {sorted(set(SCRIPTS) - set(NOTEBOOKS))}; run "
        "`jupytext --sync colabs/*.py`"
    )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_pair_agrees_and_is_stripped(name):
    ipynb = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
    script = jupytext.read(COLABS / f"{name}.py")
    assert _cells(jupytext.read(COLABS / f"{name}.ipynb")) == _cells(script), (
        f"{name}.ipynb and {name}.py disagree; run `jupytext --sync colabs/{name}.py`"
    )
    assert ipynb.metadata.get("jupytext", {}).get("formats") == PAIRING
    assert script.metadata.get("jupytext", {}).get("formats") == PAIRING
    assert set(ipynb.metadata) <= ALLOWED_METADATA, set(ipynb.metadata) - ALLOWED_METADATA
    for cell in ipynb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}.ipynb has outputs: strip them"
            assert cell.execution_count is None, f"{name}.ipynb has execution counts"
    first, second = _code_cells(ipynb)[:2]
    # The first code cell installs the package on a fresh runtime and nothing else.
    assert "SHARPNESS_JAX_SOURCE" in first and "sys.executable" in first and "pip" in first
    assert "except ImportError" in first
    assert 'os.environ.get("SHARPNESS_JAX_SMOKE") == "1"' in second


@pytest.fixture(scope="session")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
    """A ``python3`` kernelspec that runs this interpreter, whatever else is registered."""
    prefix = tmp_path_factory.mktemp("jupyter")
    path = ipykernel.kernelspec.install(
        prefix=str(prefix), kernel_name="python3", frozen_modules=True
    )
    return KernelSpecManager(kernel_dirs=[str(pathlib.Path(path).parent)])


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SHARPNESS_JAX_SMOKE="1",
        MPLBACKEND="Agg",
        XLA_FLAGS="",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, kernel_specs, tmp_path):
    notebook = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
    manager = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs)
    client = NotebookClient(
        notebook,
        km=manager,
        timeout=TIMEOUT_SECONDS,
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    # Raises CellExecutionError on any error; cleanup_kc shuts the kernel down.
    client.execute(env=_kernel_env(), cleanup_kc=True)
    seconds = time.perf_counter() - start
    sys.stderr.write(f"{name}: executed in {seconds:.1f} s\n")
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    assert any(cell.outputs for cell in notebook.cells if cell.cell_type == "code")
