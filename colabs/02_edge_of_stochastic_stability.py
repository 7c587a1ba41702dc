# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The edge of stochastic stability
#
# Andreyev & Beneventano (2024): under mini-batch SGD, λ_max(H) of the full-batch loss does not
# rise to 2/η as it does under full-batch gradient descent (notebook 01); it stays below, and
# the smaller the batch, the lower it stays. What settles at 2/η is **batch sharpness**
#
# batch sharpness = E_B[ g_Bᵀ H_B g_B / ‖g_B‖² ],
#
# the curvature of the mini-batch loss L_B along its own gradient g_B, averaged over batches
# drawn like the training sampler draws them (the expectation of the ratio, their Definition 3).
# To second order, an SGD step changes the loss of its own batch by
# −η‖g_B‖² + (η²/2) g_BᵀH_Bg_B, which is negative exactly when the ratio is below 2/η.
#
# A related quantity, the gradient–noise interaction GNI = E_B[g_Bᵀ H g_B] / ‖ḡ‖², plays the
# same role for the full-batch loss: E_B[L(θ − ηg_B)] − L(θ) ≈ −η‖ḡ‖² + (η²/2)·GNI·‖ḡ‖².
#
# Setup after the paper's code on a small scale: the loss ‖f(x) − onehot(y)‖² without ½
# (`squared_error_sum`), an MLP 784-64-64-10 with ReLU and Kaiming-normal initialisation × 0.2,
# 2,000 MNIST images standardised per channel, SGD with η = 0.2 (2/η = 10) at two batch sizes.
# The registered measurements `lambda_max`, `batch_sharpness` (Monte-Carlo over fresh batches
# until the relative standard error is below a target) and `gni` (exact up to a Hutchinson
# estimate of tr(HC), with a standard error) run during training. A few minutes on a CPU
# runtime.

# %%
# Installs sharpness_jax on a fresh runtime (e.g. Colab); does nothing when it is importable.
# On a fresh runtime, set SOURCE (or $SHARPNESS_JAX_SOURCE) to where pip finds the project: a
# checkout copied onto the runtime (e.g. "/content/sharpness_jax") or a pip VCS URL of its
# repository ("git+https://..."); the `data` extra brings the offline MNIST subset.
import importlib
import os
import subprocess
import sys

SOURCE = os.environ.get("SHARPNESS_JAX_SOURCE", "")
try:
    import sharpness_jax  # noqa: F401
except ImportError:
    if not SOURCE:
        raise ImportError(
            "sharpness_jax is not installed: set SOURCE in this cell (or $SHARPNESS_JAX_SOURCE) "
            "to a checkout of the project or a pip URL of its repository, then rerun the cell."
        ) from None
    requirement = f"{SOURCE}[data]" if os.path.isdir(SOURCE) else f"sharpness_jax[data] @ {SOURCE}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", requirement], check=True)
    importlib.invalidate_caches()

# %%
# SHARPNESS_JAX_SMOKE=1 shrinks every size so that the notebook runs in seconds (the tests).
SMOKE = os.environ.get("SHARPNESS_JAX_SMOKE") == "1"

NUM_TRAIN = 64 if SMOKE else 2000
WIDTHS = (16,) if SMOKE else (64, 64)
BATCH_SIZES = (8, 32) if SMOKE else (32, 128)
LEARNING_RATE = 0.2
MAX_STEPS = 20 if SMOKE else 2000
MEASURE_EVERY = 10 if SMOKE else 100

# %%
import matplotlib.pyplot as plt
import numpy as np

import sharpness_jax as sj

# %% [markdown]
# ## SGD at two batch sizes
#
# `batch_sharpness` draws batches of the training batch size, without replacement within an
# epoch as the sampler does (`replace=False`), until the relative standard error is below
# `rel_stderr`, between `min_draws` and `max_draws` draws; the row holds the value, its standard
# error and the number of draws.


# %%
def config(batch_size):
    return {
        "dataset": {
            "name": "mnist5k",
            "num_train": NUM_TRAIN,
            "flatten": True,
            "standardize": "channel",
        },
        "model": {
            "name": "mlp",
            "widths": WIDTHS,
            "activation": "relu",
            "init": "he",
            "init_scale": 0.2,
        },
        "loss": {"name": "squared_error_sum"},
        "optimizer": {"name": "sgd", "learning_rate": LEARNING_RATE},
        "batch_size": batch_size,
        "max_steps": MAX_STEPS,
        "measure": {
            "names": ("loss", "accuracy", "lambda_max", "batch_sharpness", "gni"),
            "every": MEASURE_EVERY,
            "options": {
                "lambda_max": {"num_iters": 10 if SMOKE else 30, "tol": 1e-3},
                "batch_sharpness": {"rel_stderr": 0.02, "max_draws": 200},
            },
        },
        "log_every": 0,
        "progress_bar": False,
    }


runs = {b: sj.train(config(b)) for b in BATCH_SIZES}
columns = {f"B = {b}": sj.records.metric_columns(run.rows) for b, run in runs.items()}
for b, run in runs.items():
    m = run.metrics
    print(
        f"B = {b}: {run.status} at step {run.step}; training loss {m['train_loss']:.4f}, "
        f"λ_max {m['lambda_max']:.2f}, batch sharpness {m['batch_sharpness']:.2f} "
        f"± {m['batch_sharpness_stderr']:.2f}, GNI {m['gni']:.2f} ± {m['gni_stderr']:.2f}"
    )

# %% [markdown]
# ## What reaches 2/η
#
# One panel per batch size: λ_max(H), batch sharpness (± standard error) and GNI against the
# step, with 2/η dashed.

# %%
threshold = 2 / LEARNING_RATE
fig, axes = plt.subplots(
    1, len(columns), figsize=(5.5 * len(columns), 3.8), sharey=True, constrained_layout=True
)
for ax, (label, c) in zip(np.atleast_1d(axes), columns.items(), strict=True):
    sj.plots.curves(
        c["step"],
        {
            "λ_max(H)": c["lambda_max"],
            "batch sharpness": c["batch_sharpness"],
            "GNI": c["gni"],
        },
        stderr={"batch sharpness": c["batch_sharpness_stderr"], "GNI": c["gni_stderr"]},
        hlines={"2/η": threshold},
        ylabel="curvature",
        title=label,
        ax=ax,
    )
    ax.set_ylim(0, 2.5 * threshold)

# %% [markdown]
# ## In the late phase
#
# Medians over the second half of the measurements (`sj.series.late_median(values,
# fraction=0.5)`, the study's late phase), in units of 2/η. Expected: batch sharpness
# close to 1 for both batch sizes (approached more slowly with the smaller batch on this small
# problem), λ_max below 1 and larger for the larger batch.

# %%
for label, c in columns.items():
    late = {
        q: sj.series.late_median(c[q], fraction=0.5) / threshold
        for q in ("lambda_max", "batch_sharpness", "gni")
    }
    print(
        f"{label:8s} median over the late phase, relative to 2/η: "
        f"λ_max {late['lambda_max']:.2f}, batch sharpness {late['batch_sharpness']:.2f}, "
        f"GNI {late['gni']:.2f}"
    )

# %% [markdown]
# ## The full study
#
# `experiments/edge_of_stochastic_stability.py` sweeps batch sizes and learning rates (the
# paper's CIFAR-10 setup in the `paper` preset), estimates batch sharpness and λ_max as the
# paper's code does, checks the claims and writes `config.json`, the runs, `figures/*.png` and
# `summary.json` into its workdir (rerunning resumes). From a checkout of the repository
# (`pip install -e '.[all]'`):

# %%
print(
    "python -m experiments.edge_of_stochastic_stability --workdir=runs/eoss "
    "--config=experiments/configs/edge_of_stochastic_stability.py:quick"
)
