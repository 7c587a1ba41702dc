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
# # Progressive sharpening and the input–output Jacobian
#
# MacDonald, Valmadre & Lucey (2023): the input–output Jacobian ∂f(x)/∂x of the network over
# its training sample mediates between loss curvature and the function learned. A larger
# Jacobian norm goes with a larger λ_max(H), so **progressive sharpening** (λ_max rising during
# training) comes with a growing Jacobian; the relation is modulated by the curvature of the
# loss in the outputs, Λ = ∇²_f ℓ (for softmax cross-entropy diag(p) − ppᵀ, which label
# smoothing keeps away from zero), by the activations and by the first layer. Their theory uses
# the sample maximum max_p ‖∂f(x_p)/∂x‖₂, which also enters a generalisation bound, and
# regularisers (label smoothing, weight decay, ...) lower the Jacobian norm.
#
# Here: an MLP 784-64-64-10 with ReLU on 1,000 MNIST images (standardised per channel),
# cross-entropy, SGD with η = 0.1 and B = 32, and two regularised variants (label smoothing 0.1,
# weight decay 5·10⁻³). The registered measurements `lambda_max` and `jacobian_norms` run during
# training, densely at the start where λ_max moves fast. A few minutes on a CPU runtime.

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

NUM_TRAIN = 64 if SMOKE else 1000
WIDTHS = (16,) if SMOKE else (64, 64)
BATCH_SIZE = 16 if SMOKE else 32
EPOCHS = 2 if SMOKE else 20
NUM_MEASUREMENTS = 3 if SMOKE else 25
VARIANTS = {  # name -> overrides of the base config
    "baseline": {},
    "label smoothing 0.1": {"loss": {"name": "cross_entropy", "label_smoothing": 0.1}},
    "weight decay 5e-3": {"optimizer": {"name": "sgd", "learning_rate": 0.1, "weight_decay": 5e-3}},
}

# %%
import matplotlib.pyplot as plt
import numpy as np

import sharpness_jax as sj

# %% [markdown]
# ## Training, measuring λ_max and the Jacobian along the way
#
# `jacobian_norms` computes ‖∂f(x_p)/∂x‖_F and ‖∂f(x_p)/∂x‖₂ (here by an exact SVD of the
# 10 × 784 Jacobian of the logits) for every example of the measurement batch and records their
# mean and maximum; `lambda_max` is Lanczos on the Hessian of the training loss over the same
# batch. With label smoothing the training loss is the smoothed cross-entropy, so we compare
# variants by accuracy.

# %%
steps = EPOCHS * NUM_TRAIN // BATCH_SIZE
BASE = {
    "dataset": {"name": "mnist5k", "num_train": NUM_TRAIN, "standardize": "channel"},
    "model": {"name": "mlp", "widths": WIDTHS, "activation": "relu", "init": "torch"},
    "loss": {"name": "cross_entropy"},
    "optimizer": {"name": "sgd", "learning_rate": 0.1},
    "batch_size": BATCH_SIZE,
    "max_steps": steps,
    "measure": {
        "names": ("loss", "accuracy", "lambda_max", "jacobian_norms"),
        "every": max(steps // NUM_MEASUREMENTS, 1),
        # Log-spaced extra measurements between step 1 and the first regular one.
        "num_log_steps": 6,
        "log_max_step": max(steps // NUM_MEASUREMENTS, 1),
        "options": {"lambda_max": {"num_iters": 10 if SMOKE else 30, "tol": 1e-3}},
    },
    "measure_subset": 512,
    "log_every": 0,
    "progress_bar": False,
}

runs = {name: sj.train({**BASE, **overrides}) for name, overrides in VARIANTS.items()}
columns = {name: sj.records.metric_columns(run.rows) for name, run in runs.items()}
for name, c in columns.items():
    print(
        f"{name:20s} λ_max {c['lambda_max'][0]:6.2f} → peak {c['lambda_max'].max():6.2f} → "
        f"{c['lambda_max'][-1]:6.2f}, "
        f"max_p ‖∂f/∂x‖₂ {c['jacobian_spectral_max'][0]:7.2f} → "
        f"{c['jacobian_spectral_max'][-1]:7.2f}, accuracy train "
        f"{c['train_accuracy'][-1]:.3f} / test {c['test_accuracy'][-1]:.3f}"
    )

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), constrained_layout=True)
steps_of = {name: c["step"] + 1 for name, c in columns.items()}
sj.plots.curves(
    steps_of, {n: c["lambda_max"] for n, c in columns.items()}, ylabel="λ_max(H)", ax=axes[0]
)
sj.plots.curves(
    steps_of,
    {n: c["jacobian_spectral_max"] for n, c in columns.items()},
    ylabel="max_p ‖∂f(x_p)/∂x‖₂",
    ax=axes[1],
)
for ax in axes[:2]:
    ax.set(xscale="log", xlabel="step + 1")
sj.plots.scatter(
    {n: (c["jacobian_spectral_max"], c["lambda_max"]) for n, c in columns.items()},
    xlabel="max_p ‖∂f(x_p)/∂x‖₂",
    ylabel="λ_max(H)",
    title="every measurement of every run",
    ax=axes[2],
)

# %% [markdown]
# ## Do they move together?
#
# Spearman's rank correlation between λ_max and the Jacobian norm over the **sharpening
# phase** (the measurements up to the peak of λ_max) and over the whole run. With
# cross-entropy, λ_max later falls while the Jacobian keeps growing: as predictions become
# confident, p approaches a one-hot vector and the output curvature Λ = diag(p) − ppᵀ vanishes
# (SGD also keeps λ_max below about 2/η = 20, notebook 02). That is the modulation by Λ, and
# label smoothing, which keeps p away from one-hot, changes it. The last columns compare the
# final Jacobian norms with the generalisation gap (training minus test accuracy).


# %%
def spearman(x, y):
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


for name, c in columns.items():
    peak = int(np.argmax(c["lambda_max"]))
    early = slice(0, peak + 1)
    rho_early = spearman(c["lambda_max"][early], c["jacobian_spectral_max"][early])
    rho_all = spearman(c["lambda_max"], c["jacobian_spectral_max"])
    gap = c["train_accuracy"][-1] - c["test_accuracy"][-1]
    print(
        f"{name:20s} λ_max peaks at step {int(c['step'][peak])}; Spearman(λ_max, ‖J‖₂): "
        f"sharpening phase {rho_early:+.2f}, whole run {rho_all:+.2f}; final ‖J‖₂ "
        f"{c['jacobian_spectral_max'][-1]:.2f}, accuracy gap {gap:.3f}"
    )

# %% [markdown]
# ## The full study
#
# `experiments/progressive_sharpening.py` trains more variants (larger batch, smaller learning
# rate) over several seeds, on CIFAR-10 with a residual network in the `paper` preset, checks
# the claims and writes `config.json`, the runs, `figures/*.png` and `summary.json` into its
# workdir (rerunning resumes). From a checkout of the repository (`pip install -e '.[all]'`):

# %%
print(
    "python -m experiments.progressive_sharpening --workdir=runs/ps "
    "--config=experiments/configs/progressive_sharpening.py:quick"
)
