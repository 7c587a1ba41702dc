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
# # Sharpness in the Fisher metric
#
# Dinh et al. (2017) showed that λ_max(H) and tr(H) can be changed at will without changing the
# function a ReLU network computes: scale one layer up and the next one down. Ahmed, Sarmah &
# Dutta (2026) measure curvature in the Fisher metric instead, the **Riemannian sharpness**
#
# S_R = tr(F⁻¹H),   and in their experiments Ŝ_R = Σ_i H_ii / (F_ii + ε)
#
# with F the diagonal empirical Fisher (1/n) Σ_p g_p ⊙ g_p. Under a function-preserving change
# of coordinates θ' = Tθ, H and F both transform by congruence, so S_R does not change; with
# diagonal F it is exactly invariant under diagonal T (layer and unit rescalings of a ReLU net,
# ε = 0). They also model SGD noise by F and find that S_R grows with the SGD temperature η/B.
#
# This notebook trains small ReLU MLPs on 1,000 MNIST images with cross-entropy and SGD at a few
# learning rates η and batch sizes B, tracks Ŝ_R during training with the registered measurement
# `riemannian_sharpness`, then rescales every trained net at random without changing its
# function and measures again. A few minutes on a CPU runtime.

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
WIDTHS = (4,) if SMOKE else (8,)  # small enough for exact Hessian diagonals: P = 795·w + 10
# (η, B): SGD temperatures η/B from 4·10⁻⁴ to 1.3·10⁻².
GRID = [(0.1, 8), (0.1, 32)] if SMOKE else [(0.05, 128), (0.2, 128), (0.05, 16), (0.2, 16)]
LOSS_GOAL = 0.02  # every net is trained to this training loss (or MAX_STEPS)
MAX_STEPS = 20 if SMOKE else 8000
MEASURE_EVERY = 10 if SMOKE else 500
NUM_PROBES = 10 if SMOKE else 50  # Hutchinson probes for tr(H)
CHUNK = None if SMOKE else 250
BASIS_CHUNK = 128  # Hessian-vector products at a time for the exact diagonal
NUM_ANALYSIS = 64 if SMOKE else 500  # training images for the before/after measures
DAMPING = 1e-8  # ε of the damped Ŝ_R

# %%
import jax

# Float64: with ε = 0, Ŝ_R is dominated by coordinates with tiny F_ii (weights of pixels that are
# rarely on), which float32 rounds or flushes to zero.
jax.config.update("jax_enable_x64", True)  # before any array is created

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import sharpness_jax as sj
from sharpness_jax import linalg, models, riemannian, symmetries

# %% [markdown]
# ## Training at several temperatures
#
# `train_loss_goal` stops every run at the same training loss, so that the nets are compared at
# the same fit. `riemannian_sharpness` computes Ŝ_R on the measurement batch (here a fixed
# subset of 256 training images, `measure_subset`) with the exact diagonal of H (P
# Hessian-vector products; above `measure.exact_param_limit` parameters set its `num_probes`
# for a Hutchinson estimate with a standard error) and records the damping ε (0 here) and the
# number of excluded coordinates with F_ii = 0 (weights of always-black pixels).

# %%
MODEL = {"widths": WIDTHS, "activation": "relu", "init": "he"}


def config(learning_rate, batch_size):
    return {
        "dataset": {"name": "mnist5k", "num_train": NUM_TRAIN, "flatten": True},
        "model": {"name": "mlp", **MODEL},
        "loss": {"name": "cross_entropy"},
        "optimizer": {"name": "sgd", "learning_rate": learning_rate},
        "batch_size": batch_size,
        "max_steps": MAX_STEPS,
        "train_loss_goal": LOSS_GOAL,
        "goal_every": 50,
        "measure": {
            "names": ("loss", "accuracy", "riemannian_sharpness"),
            "every": MEASURE_EVERY,
            "options": {"riemannian_sharpness": {"probe_chunk": BASIS_CHUNK}},
        },
        "measure_subset": 256,
        "chunk_size": CHUNK,
        "dtype": "float64",
        "log_every": 0,
        "progress_bar": False,
    }


runs = {}
for lr, b in GRID:
    runs[lr, b] = run = sj.train(config(lr, b))
    m = run.metrics
    print(
        f"η = {lr:<5} B = {b:<4} η/B = {lr / b:.1e}: {run.status} at step {run.step}; "
        f"train loss {m['train_loss']:.4f}, test accuracy {m['test_accuracy']:.3f}, "
        f"Ŝ_R {m['riemannian_sharpness']:.4g} ({m['riemannian_excluded']} coordinates excluded)"
    )

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
columns = {f"η={lr}, B={b}": sj.records.metric_columns(run.rows) for (lr, b), run in runs.items()}
steps = {label: c["step"] for label, c in columns.items()}
sj.plots.curves(
    steps,
    {label: c["train_loss"] for label, c in columns.items()},
    ylabel="training loss",
    logy=True,
    ax=axes[0],
)
sj.plots.curves(
    steps,
    {label: c["riemannian_sharpness"] for label, c in columns.items()},
    ylabel="Ŝ_R = Σ H_ii / F_ii (measurement batch)",
    logy=True,
    ax=axes[1],
)

# %% [markdown]
# ## Function-preserving rescalings
#
# `symmetries.random_rescale_layers` multiplies layer l by α_l (Π α_l = 1) and
# `random_rescale_units` rescales every hidden unit's incoming weights by c_j and its outgoing
# weights by 1/c_j; for ReLU the network computes exactly the same function. We measure the
# trained nets before and after, all in one compiled function on the full training set:
#
# * λ_max(H) (`sj.hessian_top_k`, Lanczos) and tr(H) (Hutchinson, ± standard error);
# * Ŝ_R = Σ_i H_ii / F_ii exactly (`riemannian.diagonal_riemannian_sharpness`): under
#   θ' = Tθ with T diagonal, H_ii → H_ii / T_ii² and F_ii → F_ii / T_ii², term by term;
# * the damped Ŝ_R = Σ_i H_ii / (F_ii + ε), ε = 10⁻⁸, which is not invariant (ε does not scale
#   with T) but does not let the coordinates with the tiniest F_ii dominate.
#
# On the first NUM_ANALYSIS training images.

# %%
ds = sj.data.load_dataset("mnist5k", num_train=NUM_TRAIN, flatten=True, dtype="float64")
batch = sj.Batch(ds.train.inputs[:NUM_ANALYSIS], ds.train.targets[:NUM_ANALYSIS])
model = models.build_model(
    "mlp",
    input_shape=batch.inputs.shape[1:],
    num_outputs=ds.num_classes,
    param_dtype="float64",
    **MODEL,
)
objective = sj.Objective(model.predict, sj.get_loss("cross_entropy"))


@jax.jit
def measures(params, key):
    k1, k2 = jax.random.split(key)
    hvp = sj.hessian(objective, params, batch, chunk_size=CHUNK)
    return {
        "λ_max(H)": sj.hessian_top_k(objective, params, batch, key=k1, chunk_size=CHUNK).values[0],
        "tr H": linalg.hutchinson_trace(hvp, params, key=k2, num_probes=NUM_PROBES),
        **{
            name: riemannian.diagonal_riemannian_sharpness(
                objective, params, batch, damping=eps, chunk_size=CHUNK, probe_chunk=BASIS_CHUNK
            ).value
            for name, eps in (("Ŝ_R", 0.0), ("Ŝ_R damped", DAMPING))
        },
        "outputs": jax.vmap(model.predict, in_axes=(None, 0))(params, batch.inputs),
    }


def rescale(params, key):
    k1, k2 = jax.random.split(key)
    params = symmetries.random_rescale_layers(k1, params, activation="relu", log_std=1.0)
    return symmetries.random_rescale_units(k2, params, activation="relu", log_std=1.0)


key = jax.random.PRNGKey(0)
results = {}
for (lr, b), run in runs.items():
    before = measures(run.params, key)
    after = measures(rescale(run.params, jax.random.PRNGKey(1)), key)
    change = float(jnp.max(jnp.abs(after["outputs"] - before["outputs"])))
    results[lr, b] = before
    print(f"η = {lr}, B = {b}: max |f'(x) − f(x)| = {change:.1e}")
    print(f"    λ_max(H)   {float(before['λ_max(H)']):12.5g} → {float(after['λ_max(H)']):12.5g}")
    print(
        f"    tr H       {float(before['tr H'].value):12.5g} → {float(after['tr H'].value):12.5g}"
        f"   (± {float(before['tr H'].stderr):.2g}, ± {float(after['tr H'].stderr):.2g})"
    )
    for name in ("Ŝ_R", "Ŝ_R damped"):
        x, y = float(before[name]), float(after[name])
        print(f"    {name:10s} {x:12.6g} → {y:12.6g}   (relative change {abs(y - x) / x:.1e})")

# %% [markdown]
# ## Against temperature and generalisation
#
# Left: the measures of the trained nets against the SGD temperature η/B, each relative to its
# value at the lowest temperature (the paper finds S_R growing with η/B). Right: the
# generalisation gap (test minus training loss) against the measures. Four nets are a small
# sample and Ŝ_R with ε = 0 is a heavy-tailed sum; the full study sweeps a grid.

# %%
temperature = np.array([lr / b for lr, b in runs])
gap = np.array([r.metrics["test_loss"] - r.metrics["train_loss"] for r in runs.values()])
order = np.argsort(temperature)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
for name in ("λ_max(H)", "tr H", "Ŝ_R", "Ŝ_R damped"):
    values = np.array([float(getattr(r[name], "value", r[name])) for r in results.values()])
    axes[0].loglog(temperature[order], values[order] / values[order][0], "o-", label=name)
axes[0].set(xlabel="η / B", ylabel="relative to the coldest run")
axes[0].legend(fontsize=8)
sj.plots.scatter(
    {
        name: (np.array([float(r[name]) for r in results.values()]), gap)
        for name in ("λ_max(H)", "Ŝ_R", "Ŝ_R damped")
    },
    xlabel="sharpness measure",
    ylabel="test loss − training loss",
    logx=True,
    ax=axes[1],
)

# %% [markdown]
# ## The full study
#
# `experiments/fisher_sharpness.py` trains a grid of optimisers, batch sizes and learning rates
# to a common training loss, measures every net (Ŝ_R with ε = 0 and damped, the full true-Fisher
# tr(F⁺H) on the output layer, λ_max(H), tr(H), PAC-Bayes terms) before and after random
# rescalings, checks the claims and writes `config.json`, the runs, `figures/*.png` and
# `summary.json` into its workdir (rerunning resumes). From a checkout of the repository
# (`pip install -e '.[all]'`):

# %%
print(
    "python -m experiments.fisher_sharpness --workdir=runs/fisher "
    "--config=experiments/configs/fisher_sharpness.py:quick"
)
