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
# # SGD noise against curvature
#
# Zhang, Yang & Tu (2026), *SGD noise vs curvature*: the covariance of per-sample gradients
#
# C = (1/n) Σ_p (g_p − ḡ)(g_p − ḡ)ᵀ   (the mini-batch gradient noise is C/B)
#
# is not proportional to the Hessian H = (1/n) Σ_p h_p but to the second moment of the
# per-sample Hessians, C ∝ E_p[h_p²] (the activity–weight duality of Feng, Zhang & Tu 2023).
# Consequences they test per layer:
#
# * C and H nearly commute: ‖CH − HC‖_F / ‖CH‖_F is far below its value for a randomly rotated H;
# * the diagonals follow a power law C_ii ∝ H_ii^γ with 1 ≤ γ ≤ 2 (E_p[h_p²] ⪰ H² gives the
#   γ = 2 end, bounded per-sample curvature the γ = 1 end): **γ > 1 for cross-entropy, γ ≈ 1 for
#   squared error**; the same along the Hessian's eigenvectors, v_iᵀCv_i ∝ λ_i^γ.
#
# The setup of their code on a small scale: an MLP 784-50-50-10 with ReLU and no biases on
# 1,000 MNIST images, SGD with batch 50 and η = 0.1, trained once with cross-entropy and once
# with squared error (here ½‖f − onehot‖² on the logits; their "mse" applies a softmax first).
# Then C, H and E_p[h_p²] of the middle layer's 50 × 50 weight are computed exactly: dense H_SS
# from P Hessian-vector products, dense C_SS from per-example gradients, diag E_p[(h_p)_SS²]
# from per-example Hessian rows. A few minutes on a CPU runtime.

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
WIDTHS = (8, 8) if SMOKE else (50, 50)
BATCH_SIZE = 16 if SMOKE else 50
MAX_STEPS = 10 if SMOKE else 1200  # 60 epochs
MEASURE_EVERY = 5 if SMOKE else 100
CHUNK = None if SMOKE else 250  # examples per chunk
LAYER = "params/Dense_1/kernel"  # the middle layer's weight matrix
LOSSES = {"cross-entropy": "cross_entropy", "squared error": "squared_error_half"}

# %%
import jax
import matplotlib.pyplot as plt
import numpy as np

import sharpness_jax as sj
from sharpness_jax import comparisons, linalg, models, noise, power_law, second_moment

# %% [markdown]
# ## Training, with tr C and tr H measured along the way
#
# `trace_gradient_covariance` is exact (chunked per-example gradients); `trace_hessian` is
# Hutchinson's estimator with a standard error (the row holds `trace_hessian_stderr`).

# %%
MODEL = {"widths": WIDTHS, "activation": "relu", "bias": False, "init": "torch"}


def config(loss):
    return {
        "dataset": {"name": "mnist5k", "num_train": NUM_TRAIN, "flatten": True},
        "model": {"name": "mlp", **MODEL},
        "loss": {"name": loss},
        "optimizer": {"name": "sgd", "learning_rate": 0.1},
        "batch_size": BATCH_SIZE,
        "max_steps": MAX_STEPS,
        "measure": {
            "names": ("loss", "accuracy", "trace_gradient_covariance", "trace_hessian"),
            "every": MEASURE_EVERY,
            "options": {"trace_hessian": {"num_probes": 10 if SMOKE else 50}},
        },
        "chunk_size": CHUNK,
        "log_every": 0,
        "progress_bar": False,
    }


runs = {label: sj.train(config(loss)) for label, loss in LOSSES.items()}
columns = {label: sj.records.metric_columns(run.rows) for label, run in runs.items()}
for label, run in runs.items():
    m = run.metrics
    print(
        f"{label:14s} step {run.step}: training loss {m['train_loss']:.4f}, accuracy "
        f"{m['train_accuracy']:.3f} (test {m['test_accuracy']:.3f})"
    )

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), constrained_layout=True)
for ax, (label, c) in zip(axes, columns.items(), strict=True):
    sj.plots.curves(
        c["step"],
        {"tr C": c["trace_gradient_covariance"], "tr H": c["trace_hessian"]},
        stderr={"tr H": c["trace_hessian_stderr"]},
        ylabel="trace",
        title=label,
        logy=True,
        ax=ax,
    )

# %% [markdown]
# ## One layer, exactly
#
# The operators take `subset=` and then act on the diagonal block of one layer; the `noise`
# module turns them into dense matrices and exact diagonals. For E_p[h_p²] the block is that of
# the restricted objective, E_p[(h_p)_SS²] (`restricted=True`, the default).

# %%
ds = sj.data.load_dataset("mnist5k", num_train=NUM_TRAIN, flatten=True)
batch = sj.Batch(*ds.train)
model = models.build_model(
    "mlp", input_shape=batch.inputs.shape[1:], num_outputs=ds.num_classes, **MODEL
)


def layer_matrices(objective, params):
    kw = dict(subset=LAYER, chunk_size=CHUNK)
    hvp = sj.hessian(objective, params, batch, **kw)
    return {
        "H": linalg.dense(hvp, sj.select(params, LAYER), chunk_size=64),
        "C": noise.gradient_covariance_dense(objective, params, batch, **kw),
        "E[h²] diagonal": second_moment.hessian_second_moment_diagonal(
            objective, params, batch, basis_chunk_size=64, **kw
        ),
    }


mats = {}
for label, loss in LOSSES.items():
    objective = sj.Objective(model.predict, sj.get_loss(loss))
    out = jax.jit(layer_matrices, static_argnums=0)(objective, runs[label].params)
    mats[label] = {
        "H": np.asarray(out["H"], np.float64),
        "C": np.asarray(out["C"], np.float64),
        "E[h²]_ii": np.asarray(out["E[h²] diagonal"][LAYER], np.float64).ravel(),
    }
print({label: m["H"].shape for label, m in mats.items()})

# %% [markdown]
# ## Commutation, alignment and the power laws
#
# * `comparisons.relative_commutator(C, H)` = ‖CH − HC‖_F / ‖CH‖_F, against
#   `comparisons.rotation_baseline` (H → QHQᵀ with Haar-random Q: same spectrum, unrelated
#   eigenbasis);
# * `comparisons.alignment(H, C)` = tr(HC) / (‖H‖_F ‖C‖_F);
# * `power_law.fit_power_law(x, y, key=)`: least squares of log y on log x over the positive pairs,
#   with a bootstrap 95% interval for γ — for the diagonals (C_ii against H_ii), along every
#   eigenvector of the layer's H with λ_i > 0 (v_iᵀCv_i against λ_i), and C_ii against
#   E_p[h_p²]_ii, where the duality predicts γ = 1 (proportionality).

# %%
# Jitted once: called eagerly, each call would trace and compile its bootstrap loop anew.
fit_power_law = jax.jit(power_law.fit_power_law)
rotation_baseline = jax.jit(comparisons.rotation_baseline, static_argnames="num_rotations")

key = jax.random.PRNGKey(0)
fits = {}
for label, m in mats.items():
    h, c = m["H"], m["C"]
    lam, vec = np.linalg.eigh(h)
    along = np.einsum("pi,pq,qi->i", vec, c, vec)  # v_iᵀ C v_i
    baseline = rotation_baseline(c, h, key=key, num_rotations=2)
    fits[label] = {
        "C_ii ∝ H_ii^γ": fit_power_law(np.diag(h), np.diag(c), key=key),
        "vᵢᵀCvᵢ ∝ λᵢ^γ": fit_power_law(lam, along, key=key),
        "C_ii ∝ E[h²]_ii^γ": fit_power_law(m["E[h²]_ii"], np.diag(c), key=key),
    }
    print(
        f"{label}: ‖CH − HC‖/‖CH‖ = {float(comparisons.relative_commutator(c, h)):.3f} "
        f"(random rotation: {float(baseline.mean):.3f} ± {float(baseline.std):.3f}); "
        f"alignment tr(HC)/(‖H‖‖C‖) = {float(comparisons.alignment(h, c)):.3f}"
    )
    for name, fit in fits[label].items():
        print(
            f"    {name:18s} γ = {float(fit.gamma):.3f} [{float(fit.ci_low):.3f}, "
            f"{float(fit.ci_high):.3f}], R² = {float(fit.r2):.3f}, {int(fit.num_used)} points"
        )

# %% [markdown]
# Expected: commutators well below the rotation baseline; γ of the diagonals above 1 for
# cross-entropy and close to 1 for squared error; C_ii ∝ E[h²]_ii with γ close to 1.

# %%
fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), constrained_layout=True)
for row, (label, m) in zip(axes, mats.items(), strict=True):
    fit = fits[label]["C_ii ∝ H_ii^γ"]
    sj.plots.power_law(
        np.diag(m["H"]),
        np.diag(m["C"]),
        gamma=float(fit.gamma),
        intercept=float(fit.intercept),
        xlabel="H_ii",
        ylabel="C_ii",
        title=f"{label}: noise against curvature",
        ax=row[0],
    )
    fit = fits[label]["C_ii ∝ E[h²]_ii^γ"]
    sj.plots.power_law(
        m["E[h²]_ii"],
        np.diag(m["C"]),
        gamma=float(fit.gamma),
        intercept=float(fit.intercept),
        xlabel="E_p[h_p²]_ii",
        ylabel="C_ii",
        title=f"{label}: noise against E[h²]",
        ax=row[1],
    )

# %% [markdown]
# ## The full study
#
# `experiments/noise_curvature.py` runs the study's grid (losses, layers, training stages),
# fits the power laws per layer and checks the claims; it writes `config.json`, one resumable
# training run per setting, `figures/*.png` and `summary.json` into its workdir, and resumes
# when rerun. From a checkout of the repository (`pip install -e '.[all]'`):

# %%
print(
    "python -m experiments.noise_curvature --workdir=runs/noise "
    "--config=experiments/configs/noise_curvature.py:quick"
)
