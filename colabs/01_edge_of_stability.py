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
# # The edge of stability
#
# Cohen et al. (2021), *Gradient descent on neural networks typically occurs at the edge of
# stability*: under full-batch gradient descent θ ← θ − η∇L(θ), the top Hessian eigenvalue
# λ_max(H) first rises (**progressive sharpening**) until it reaches 2/η, the largest
# curvature at which gradient descent on a quadratic is stable; it then **hovers just above
# 2/η** while the loss keeps decreasing, non-monotonically.
#
# The setup follows the paper's full-batch reference on a small scale: 1,000 MNIST images
# (flattened, standardised per feature with full-training-set statistics), an MLP
# 784-100-100-10 with tanh and PyTorch's default initialisation, the loss
# ℓ = ½‖f(x) − onehot(y)‖² (`squared_error_half`: the ½ matters, a factor 2 in the loss doubles
# λ_max), and full-batch gradient descent at two learning rates:
#
# * η = 0.2: 2/η = 10 is reached within a few hundred steps, and λ_max stays there;
# * η = 0.05: 2/η = 40 is far away, and we only see progressive sharpening.
#
# Everything runs through `sj.train(config)`, the library's training loop, in memory (no
# workdir); the registered measurement `lambda_max` computes λ_max of the full-batch Hessian by
# Lanczos, warm-started from the previous measurement. A few minutes on a CPU runtime.

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
WIDTHS = (16,) if SMOKE else (100, 100)
MAX_STEPS = 20 if SMOKE else 600
MEASURE_EVERY = 5 if SMOKE else 10
LANCZOS_ITERS = 10 if SMOKE else 40
LEARNING_RATES = (0.05, 0.2)

# %%
import matplotlib.pyplot as plt
import numpy as np

import sharpness_jax as sj

# %% [markdown]
# ## Full-batch gradient descent, measured along the way
#
# A config is a nested dict (or an `ml_collections.ConfigDict`); missing fields take the
# defaults of `sj.config.default_config()`, whose docstring documents every field.
# `optimizer.name = "gd"` is full-batch gradient descent. `measure.names` lists registered
# measurements, here the training and test loss and λ_max of the Hessian of the full training
# loss (the measurement batch is the whole training set: n ≤ `measure_subset`).


# %%
def config(learning_rate):
    return {
        "dataset": {
            "name": "mnist5k",
            "num_train": NUM_TRAIN,
            "flatten": True,
            "standardize": "feature",
        },
        "model": {"name": "mlp", "widths": WIDTHS, "activation": "tanh", "init": "torch"},
        "loss": {"name": "squared_error_half"},
        "optimizer": {"name": "gd", "learning_rate": learning_rate},
        "max_steps": MAX_STEPS,
        "measure": {
            "names": ("loss", "accuracy", "lambda_max"),
            "every": MEASURE_EVERY,
            "options": {"lambda_max": {"num_iters": LANCZOS_ITERS, "tol": 1e-3}},
        },
        "log_every": 0,
        "progress_bar": False,
    }


runs = {}
for lr in LEARNING_RATES:
    runs[lr] = sj.train(config(lr))
    last = runs[lr].metrics
    print(
        f"η = {lr}: {runs[lr].status} at step {runs[lr].step}; training loss "
        f"{last['train_loss']:.4f}, test accuracy {last['test_accuracy']:.3f}, "
        f"λ_max {last['lambda_max']:.3f} (2/η = {2 / lr:g})"
    )
columns = {lr: sj.records.metric_columns(run.rows) for lr, run in runs.items()}

# %% [markdown]
# ## λ_max rises to 2/η and stays there
#
# Left: the training loss (log scale). Right: λ_max against the step, with 2/η dashed in the
# colour of its run. With η = 0.2 λ_max climbs to 10 and hovers there while the loss keeps
# falling, with spikes where the iterate overshoots along the top eigendirection; with
# η = 0.05 the same network keeps sharpening, far below its threshold 40.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
label = {lr: f"η = {lr}" for lr in LEARNING_RATES}
sj.plots.curves(
    {label[lr]: c["step"] for lr, c in columns.items()},
    {label[lr]: c["train_loss"] for lr, c in columns.items()},
    ylabel="training loss ½‖f − y‖²",
    logy=True,
    ax=axes[0],
)
sj.plots.curves(
    {label[lr]: c["step"] for lr, c in columns.items()},
    {label[lr]: c["lambda_max"] for lr, c in columns.items()},
    hlines={f"2/η ({label[lr]})": 2 / lr for lr in LEARNING_RATES},
    ylabel="λ_max(H)",
    ax=axes[1],
)
axes[1].set_ylim(0, 1.3 * max(np.nanmax(c["lambda_max"]) for c in columns.values()))

# %% [markdown]
# ## In units of the threshold
#
# The stability ratio λ_max/(2/η) = ηλ_max/2 puts both runs on one scale: gradient descent on
# the local quadratic model is stable below 1. The run that reaches 1 stays near it; the
# numbers below summarise the late phase, `sj.series.late_phase(ratio, start=...)` from the
# first measurement at 0.9·2/η (`sj.series.first_reached`), and its spread.

# %%
fig, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
for lr, c in columns.items():
    ax.plot(c["step"], c["lambda_max"] * lr / 2, label=label[lr])
ax.axhline(1.0, ls="--", color="k", lw=1)
ax.set(xlabel="step", ylabel="λ_max / (2/η)")
ax.legend(fontsize=8)

for lr, c in columns.items():
    ratio = c["lambda_max"] * lr / 2
    first = sj.series.first_reached(ratio, 0.9)
    if first is None:
        print(f"η = {lr}: λ_max/(2/η) rose from {ratio[0]:.2f} to {ratio[-1]:.2f}; never reached")
        continue
    late = sj.series.late_phase(ratio, start=first)
    print(
        f"η = {lr}: reached 0.9·2/η at step {int(c['step'][first])}; afterwards "
        f"median λ_max/(2/η) = {np.median(late):.3f}, range [{late.min():.2f}, {late.max():.2f}]"
    )

# %% [markdown]
# ## Adam: the preconditioned sharpness at its own edge
#
# Full-batch Adam preconditions the step by P = diag(√ν̂ + ε), so what it holds at a
# threshold is the preconditioned sharpness λ_max(P⁻¹H), at (2 + 2β₁)/((1 − β₁)η) = 38/η for
# β₁ = 0.9 (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability"). The
# `preconditioned_sharpness` measurement reads ν̂ from the run's optax state; the first
# measurement, before any step, is NaN (no second-moment estimate yet).

# %%
ADAM_LR = 3e-3
adam_config = config(ADAM_LR)
adam_config["optimizer"] = {"name": "adam", "learning_rate": ADAM_LR, "b1": 0.9}
adam_config["measure"]["names"] = ("loss", "preconditioned_sharpness")
adam_config["measure"]["options"] = {"preconditioned_sharpness": {"num_iters": LANCZOS_ITERS}}
adam = sj.records.metric_columns(sj.train(adam_config).rows)
threshold = (2 + 2 * 0.9) / ((1 - 0.9) * ADAM_LR)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
axes[0].semilogy(adam["step"], adam["train_loss"])
axes[0].set(xlabel="step", ylabel="training loss", title=f"full-batch Adam, η = {ADAM_LR}")
axes[1].plot(adam["step"], adam["preconditioned_sharpness"], label="λ_max(P⁻¹H)")
axes[1].axhline(threshold, ls="--", color="k", lw=1, label="(2 + 2β₁)/((1 − β₁)η)")
axes[1].set(xlabel="step", ylabel="λ_max(P⁻¹H)", title="preconditioned sharpness")
axes[1].legend(fontsize=8)
late = sj.series.late_phase(adam["preconditioned_sharpness"] / threshold, fraction=0.5)
print(f"late median λ_max(P⁻¹H) / threshold = {np.nanmedian(late):.3f} (threshold {threshold:.0f})")

# %% [markdown]
# ## The full study
#
# `experiments/edge_of_stability.py` runs this at several learning rates, with an Adam arm
# (and the paper's CIFAR-10 setup with the `paper` preset, for a GPU/TPU), checks the claims,
# and writes everything into its workdir: `config.json`, one resumable training run per
# learning rate with
# `metrics.jsonl` and checkpoints, `figures/*.png` and `summary.json`. Rerunning the command
# resumes. From a checkout of the repository (`pip install -e '.[all]'`):

# %%
print(
    "python -m experiments.edge_of_stability --workdir=runs/eos "
    "--config=experiments/configs/edge_of_stability.py:quick"
)
