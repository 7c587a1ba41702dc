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
# # The quotient geometry of shallow networks
#
# Dong & Cheng (2026): a shallow ReLU net f_θ(x) = Σ_i a_i σ(w_iᵀx + b_i) computes the same
# function along the **orbits** (a_i, w_i, b_i) → (a_i / c, c w_i, c b_i), c > 0, of each hidden
# unit. Parameters are therefore redundant, and only the geometry of the quotient (parameters
# modulo symmetries) is intrinsic:
#
# * the **vertical** space, tangent to the orbits, is spanned by the generators
#   v_i = (−a_i, w_i, b_i) of each unit; on the regular set it is exactly the kernel of the
#   Jacobian J of the realisation map θ ↦ (f_θ(x_1), …, f_θ(x_n)); the **horizontal** space is
#   a complement; the realisation metric G = JᵀJ/n is degenerate exactly on the vertical space;
# * ambient flatness is representation-dependent: moving along an orbit changes λ_max(H)
#   by orders of magnitude. At a minimum H has m "false flat" zero modes, one per orbit;
#   the **symmetry-reduced Hessian** BᵀHB (B a basis of the horizontal space) removes them;
# * the quotient curvature, the generalised spectrum of (BᵀHB, BᵀGB), does not move along
#   orbits;
# * only the horizontal part of a step changes the predictor to first order;
# * gradient flow conserves Q_i = ‖a_i‖² − ‖w_i‖² − b_i² for every unit.
#
# We train a shallow ReLU net on teacher–student regression with ½‖f − y‖², in float64 (the
# spectra are dense and exact; zero modes need the precision). About a minute on a CPU runtime.

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

INPUT_DIM, WIDTH, OUTPUTS = (3, 3, 1) if SMOKE else (5, 8, 2)
# P = WIDTH·(INPUT_DIM + 1 + OUTPUTS) parameters, WIDTH of them vertical. The regular set
# needs P − WIDTH ≤ n·K < P equations: n = 13 (smoke: P = 15) and n = 30 (P = 64).
NUM_TRAIN = 13 if SMOKE else 30
LEARNING_RATE = 0.2
FLOW_TIME = 4.0 if SMOKE else 600.0  # gradient-flow time η·steps of every run
MEASUREMENTS = 4 if SMOKE else 40

# %%
import jax

jax.config.update("jax_enable_x64", True)  # before any array is created

import jax.flatten_util
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import sharpness_jax as sj
from sharpness_jax import quotient, quotient_spectra, symmetries

ACTIVATION = "relu"

# %% [markdown]
# ## Gradient descent, with a measurement of our own
#
# `sj.register_measurement(name, fn)` adds a measurement to the training loop: `fn` receives a
# `MeasureContext` (params, the measurement batch, a key, the objective, ...) and returns a dict;
# scalars go into the metrics rows, arrays into `run.arrays[step]`. Here: the conserved
# quantities Q_i of every unit. We run gradient descent at η and η/4 for the same
# gradient-flow time η·steps: the drift of Q_i is O(η) per unit time.


# %%
def conserved(ctx):
    return {"conserved": quotient.conserved_quantities(ctx.params, activation=ACTIVATION)}


sj.register_measurement("conserved_quantities", conserved, overwrite=True)


def config(learning_rate):
    steps = round(FLOW_TIME / learning_rate)
    return {
        "dataset": {
            "name": "teacher_student",
            "num_train": NUM_TRAIN,
            "num_test": 256,
            "input_dim": INPUT_DIM,
            "num_outputs": OUTPUTS,
            "teacher_width": 4,
            "teacher_activation": "tanh",
        },
        "model": {"name": "shallow", "width": WIDTH, "activation": ACTIVATION, "bias": True},
        "loss": {"name": "squared_error_half"},
        "optimizer": {"name": "gd", "learning_rate": learning_rate},
        "max_steps": steps,
        "dtype": "float64",
        "measure": {
            "names": ("loss", "lambda_max", "conserved_quantities"),
            "every": max(steps // MEASUREMENTS, 1),
        },
        "log_every": 0,
        "progress_bar": False,
    }


runs = {lr: sj.train(config(lr)) for lr in (LEARNING_RATE, LEARNING_RATE / 4)}
for lr, run in runs.items():
    print(
        f"η = {lr}: {run.status} at step {run.step}, training loss {run.metrics['train_loss']:.3e}"
    )
params = runs[LEARNING_RATE].params
print({name: leaf.shape for name, leaf in params.items()})

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), constrained_layout=True)
for lr, run in runs.items():
    c = sj.records.metric_columns(run.rows)
    time = c["step"] * lr
    axes[0].semilogy(time, c["train_loss"], label=f"η = {lr}")
    q = np.stack([run.arrays[int(s)]["conserved"] for s in c["step"]])
    scale = np.max(np.abs(q[0]))
    drift = np.max(np.abs(q - q[0]), axis=1) / scale
    axes[1].semilogy(time[1:], drift[1:], label=f"η = {lr}")
    print(f"η = {lr}: max_i |Q_i(t) − Q_i(0)| / max_i |Q_i(0)| at the end = {drift[-1]:.2e}")
axes[0].set(xlabel="gradient-flow time η·step", ylabel="training loss")
axes[1].set(xlabel="gradient-flow time η·step", ylabel="relative drift of Q_i")
for ax in axes:
    ax.legend(fontsize=8)

# %% [markdown]
# ## Ambient, reduced and quotient spectra
#
# `quotient_spectra.regularity` checks that we are on the regular set (no zero or duplicated
# units, rank J = P − m). `quotient_spectra.quotient_spectra` returns the dense spectra of the
# ambient Hessian H (P values), of the reduced Hessian BᵀHB (P − m values, B an orthonormal basis
# of the horizontal space) and the generalised eigenvalues of (BᵀHB, BᵀGB). With
# `metric="scale_invariant"` the horizontal space moves with the orbit, which makes the
# generalised spectrum invariant at every regular point (see the `quotient_spectra` module
# docstring).

# %%
batch = sj.Batch(*sj.data.load_dataset(**config(LEARNING_RATE)["dataset"], dtype="float64").train)
objective = quotient_spectra.shallow_objective(
    sj.get_loss("squared_error_half"), activation=ACTIVATION
)
reg = quotient_spectra.regularity(params, batch.inputs, activation=ACTIVATION)
print(
    f"regular: {bool(reg.is_regular)} (rank J = {int(reg.rank)}, P − m = {int(reg.expected_rank)})"
)


@jax.jit
def spectra(params):
    return quotient_spectra.quotient_spectra(
        objective, params, batch, activation=ACTIVATION, metric="scale_invariant"
    )


spec = spectra(params)
print(f"λ_max: ambient {float(spec.ambient[0]):.4g}, reduced {float(spec.reduced[0]):.4g}")

# The curvature along each orbit, e_iᵀ H e_i with e_i = v_i / ‖v_i‖. Differentiating
# ⟨∇L, v_i⟩ = 0 gives H v_i = −(dv_i/dθ) ∇L: these directions are flat up to O(‖∇L‖), and
# exactly flat at a critical point, the m "false flat" modes of H that BᵀHB does not have.
hvp = sj.hessian(objective, params, batch)
flat = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]
orbit_directions = quotient.vertical_basis(params, activation=ACTIVATION).vectors
along_orbits = jax.vmap(lambda e: jnp.vdot(flat(e), flat(hvp(e))))(orbit_directions)
print(f"‖∇L‖ = {float(jnp.linalg.norm(flat(sj.gradient(objective, params, batch)))):.2e}")
print("e_iᵀ H e_i along the orbits:", np.array2string(np.asarray(along_orbits), precision=2))
fig = sj.plots.spectra(
    {name: getattr(spec, name) for name in ("ambient", "reduced", "generalised")},
    title="spectra at the end of training",
)

# %% [markdown]
# ## Along an orbit
#
# Every unit rescaled by the same factor c ∈ [0.1, 10] (`symmetries.rescale_units`): the
# predictor does not change, λ_max of the ambient Hessian changes by orders of magnitude, the
# quotient spectrum does not move.

# %%
factors = np.geomspace(0.1, 10.0, 3 if SMOKE else 9)
outputs = jax.vmap(objective.predict, in_axes=(None, 0))(params, batch.inputs)
rows = []
for c in factors:
    moved = symmetries.rescale_units(params, jnp.full((WIDTH,), c), activation=ACTIVATION)
    change = jnp.max(
        jnp.abs(jax.vmap(objective.predict, in_axes=(None, 0))(moved, batch.inputs) - outputs)
    )
    s = spectra(moved)
    rows.append((c, float(s.ambient[0]), float(s.reduced[0]), np.asarray(s.generalised)))
    print(
        f"c = {c:7.3f}: max |Δf| = {float(change):.1e}, λ_max ambient {rows[-1][1]:10.4g}, "
        f"reduced {rows[-1][2]:10.4g}, quotient {rows[-1][3][0]:.6g}"
    )
reference = rows[np.argmin(np.abs(np.log(factors)))][3]
moved_most = max(np.max(np.abs(r[3] - reference)) for r in rows) / np.max(np.abs(reference))
print(f"largest relative change of the quotient spectrum along the orbit: {moved_most:.1e}")

fig, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
ax.loglog(factors, [r[1] for r in rows], "o-", label="λ_max(H), ambient")
ax.loglog(factors, [r[2] for r in rows], "s-", label="λ_max(BᵀHB), reduced")
ax.loglog(factors, [r[3][0] for r in rows], "^-", label="top quotient eigenvalue")
ax.set(xlabel="rescaling factor c", ylabel="eigenvalue")
ax.legend(fontsize=8)

# %% [markdown]
# ## Vertical steps are gauge
#
# `quotient.decompose_update` splits a step δ = δ_h + δ_v into horizontal and vertical parts and
# reports what each does to the predictor. A plain gradient step is exactly horizontal in the
# Euclidean split (the loss is constant along orbits); weight decay adds a vertical part
# −ηλ P_V θ. Its first-order effect J δ_v on the outputs vanishes.

# %%
weight_decay = 0.01
grad = sj.gradient(objective, params, batch)
step = jax.tree.map(lambda g, p: -LEARNING_RATE * (g + weight_decay * p), grad, params)
split = quotient.decompose_update(params, step, batch.inputs, activation=ACTIVATION)


def norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(tree))))


print(f"‖δ_h‖ = {norm(split.horizontal):.3e}   ‖δ_v‖ = {norm(split.vertical):.3e}")
print(
    f"‖J δ_h‖ = {norm(split.first_order_horizontal):.3e}   "
    f"‖J δ_v‖ = {norm(split.first_order_vertical):.3e}"
)
print(f"exact predictor change of the vertical part: {norm(split.change_vertical):.3e}")

# %% [markdown]
# ## The full study
#
# `experiments/quotient_geometry.py` runs ReLU and quadratic nets in an underdetermined and a
# regular setup, records the spectra and conserved quantities along training, checks the claims
# (orbit invariance, the m false-flat modes, gauge steps, the O(η) drift) and writes
# `config.json`, the runs, `figures/*.png` and `summary.json` into its workdir (rerunning
# resumes). From a checkout of the repository (`pip install -e '.[all]'`):

# %%
print(
    "python -m experiments.quotient_geometry --workdir=runs/quotient "
    "--config=experiments/configs/quotient_geometry.py:quick"
)
