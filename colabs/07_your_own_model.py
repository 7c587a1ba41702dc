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
# # Your own model
#
# `sj.Objective(predict, loss)` takes a **per-example** model `predict(params, x)` (ONE example,
# no batch axis) and differentiates every leaf of `params`. Models are usually written
# batch-first and carry state that must not be differentiated; `sj.adapters` turns them into
# that form, `(predict, params)`, with only the trainable arrays in `params` and the rest held
# fixed. Each section below brings one kind of model or loss, computes λ_max, a trace or a
# Gauss–Newton (GGN) product with the library, and checks it against a dense reference built
# directly from the model with `jax.hessian` / `jax.jacfwd` (they share no code with the
# library):
#
# 1. a batch-first flax.linen CNN;
# 2. a flax NNX MLP;
# 3. a BatchNorm net in eval mode, and the error for train mode;
# 4. a tiny transformer language model with per-token cross-entropy and a padding mask;
# 5. a loss of your own (Huber) on a plain batch-first function;
# 6. bfloat16 parameters;
# 7. training the CNN of section 1 with the library's training loop through `model.factory`.
#
# Everything is tiny (at most a few thousand parameters), so the dense references are exact and
# cheap; the same calls work on large models, where only the dense references stop.

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

N = 16 if SMOKE else 64  # examples per batch
CHANNELS = 2 if SMOKE else 4  # CNN channels
HIDDEN = 8 if SMOKE else 32  # MLP widths
NUM_ITERS = 20 if SMOKE else 60  # Lanczos iterations
NUM_PROBES = 32 if SMOKE else 256  # Hutchinson probes
NUM_TRAIN = 32 if SMOKE else 512  # training examples of section 7
TRAIN_STEPS = 10 if SMOKE else 200

# %%
import pathlib
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

import sharpness_jax as sj

K = 3  # classes
keys = iter(jax.random.split(jax.random.PRNGKey(0), 64))


def rel(a, b):
    """Relative difference |a − b| / |b| (norms for arrays)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def dense_hessian(mean_loss, params, *data):
    """The Hessian of ``mean_loss(params, *data)`` as a dense P × P matrix, column by column:
    e_i ↦ ∇²L e_i by jax.jvp of jax.grad (the memory of one Hessian-vector product). The data
    are arguments of the compiled program, not constants folded into it."""
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def columns(flat, eye, *data):
        grad = jax.grad(lambda v: mean_loss(unravel(v), *data))
        return jax.lax.map(lambda e: jax.jvp(grad, (flat,), (e,))[1], eye)

    return np.asarray(columns(flat, jnp.eye(flat.size, dtype=flat.dtype), *data), np.float64)


def dense_ggn(batch_outputs, loss, params, inputs, targets):
    """(1/n) Σ_p J_pᵀ Λ_p J_p with J_p = ∂f(x_p)/∂θ and Λ_p = ∇²_f loss(f_p, y_p), dense;
    ``batch_outputs(params, inputs)`` is the batch-first model."""
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def ggn(flat, inputs, targets):
        outputs = batch_outputs(unravel(flat), inputs)  # (n, ...)
        n, shape = outputs.shape[0], outputs.shape[1:]
        jac = jax.jacfwd(lambda v: batch_outputs(unravel(v), inputs).reshape(n, -1))(flat)
        lam = jax.vmap(jax.hessian(lambda f, y: loss(f.reshape(shape), y)))(
            outputs.reshape(n, -1), targets
        )  # (n, m, m); jac: (n, m, P)
        return jnp.einsum("pai,pab,pbj->ij", jac, lam, jac) / n

    return np.asarray(ggn(flat, inputs, targets), np.float64)


def random_like(params, key):
    """A standard normal vector in the structure of ``params``."""
    flat, unravel = ravel_pytree(params)
    return unravel(jax.random.normal(key, flat.shape, flat.dtype))


def top_eig(matrix):
    return float(np.linalg.eigvalsh(matrix)[-1])


# %% [markdown]
# ## 1. A batch-first flax.linen CNN
#
# `sj.Objective(model.apply, loss)` would hand `model.apply` one example without its batch axis
# and flax would complain about shapes. `sj.adapters.from_linen(module, variables)` gives
# `predict(θ, x) = module.apply({"params": θ}, x[None])[0]` and the `"params"` collection as
# the trainable pytree; with `example_inputs` it also checks once that the module does not mix
# the examples of a batch.


# %%
class CNN(nn.Module):
    channels: int = CHANNELS
    num_outputs: int = K

    @nn.compact
    def __call__(self, x):  # (N, H, W, C), batch-first as usual
        x = nn.relu(nn.Conv(self.channels, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(self.num_outputs)(x.reshape(x.shape[0], -1))


x_img = jax.random.normal(next(keys), (N, 8, 8, 1))
y_img = jax.random.randint(next(keys), (N,), 0, K)
cnn = CNN()
cnn_vars = jax.jit(cnn.init)(next(keys), x_img[:1])
predict, params = sj.adapters.from_linen(cnn, cnn_vars, example_inputs=x_img)
cross_entropy = sj.softmax_cross_entropy()
objective = sj.Objective(predict, cross_entropy)
batch = sj.Batch(x_img, y_img)
H = sj.hessian(objective, params, batch)

lam = sj.lanczos_top_k(H, params, k=1, num_iters=NUM_ITERS).values[0]
hutch = sj.hutchinson_trace(H, params, key=next(keys), num_probes=NUM_PROBES)


def cnn_loss(p, x, y):  # the reference: the module applied to the whole batch
    logits = cnn.apply({"params": p}, x)
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


H_dense = dense_hessian(cnn_loss, params, x_img, y_img)
print(f"P = {sj.num_params(params)}")
print(f"λ_max: Lanczos {lam:.6f}, dense {top_eig(H_dense):.6f}")
print(
    f"tr(H): Hutchinson {float(hutch.value):.4f} ± {float(hutch.stderr):.4f} ({NUM_PROBES} "
    f"probes), dense {np.trace(H_dense):.4f}"
)
assert rel(lam, top_eig(H_dense)) < 1e-3
assert abs(float(hutch.value) - np.trace(H_dense)) < 5 * float(hutch.stderr)

# %% [markdown]
# ## 2. A flax NNX MLP
#
# `sj.adapters.from_nnx(module)` splits the module once into its graph, its `nnx.Param` state
# (the trainable pytree) and the rest (held fixed). Call `module.eval()` first. Here: one
# product G v with the GGN G = (1/n) Σ_p J_pᵀ Λ_p J_p (Λ_p = diag p − ppᵀ for softmax
# cross-entropy).


# %%
class MLP(nnx.Module):
    def __init__(self, d_in, width, d_out, *, rngs):
        self.hidden = nnx.Linear(d_in, width, rngs=rngs)
        self.out = nnx.Linear(width, d_out, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


x_vec = jax.random.normal(next(keys), (N, 5))
y_vec = jax.random.randint(next(keys), (N,), 0, K)
mlp = MLP(5, HIDDEN, K, rngs=nnx.Rngs(0))
mlp.eval()
predict, params = sj.adapters.from_nnx(mlp, example_inputs=x_vec)
objective = sj.Objective(predict, cross_entropy)
G = sj.ggn(objective, params, sj.Batch(x_vec, y_vec))

graphdef, _, rest = nnx.split(mlp, nnx.Param, ...)
G_dense = dense_ggn(
    lambda p, x: nnx.merge(graphdef, p, rest)(x), cross_entropy, params, x_vec, y_vec
)
v = random_like(params, next(keys))
Gv = ravel_pytree(G(v))[0]
print(f"‖Gv − G_dense v‖/‖G_dense v‖ = {rel(Gv, G_dense @ ravel_pytree(v)[0]):.2e}")
assert rel(Gv, G_dense @ ravel_pytree(v)[0]) < 1e-4

# %% [markdown]
# ## 3. BatchNorm: eval mode, and the error for train mode
#
# In train mode BatchNorm normalises with the statistics of the batch, so one example's output
# depends on the others: there is no per-example model and per-example quantities (C, the
# GGN, the Fisher, ...) would be silently wrong. In eval mode it uses its running statistics,
# which `from_linen` holds fixed: only `"params"` is differentiated, `"batch_stats"` is not.
# Here the running statistics are those of the batch (`momentum=0` after one train-mode pass,
# as if the net had been trained on it).


# %%
class BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(HIDDEN)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.0)(x)
        return nn.Dense(K)(jnp.tanh(x))


bn_net = BatchNormNet()
bn_vars = jax.jit(bn_net.init, static_argnames="train")(next(keys), x_vec[:1], train=False)
_, stats = bn_net.apply(bn_vars, x_vec, train=True, mutable=["batch_stats"])
bn_vars = {"params": bn_vars["params"], **stats}
predict, params = sj.adapters.from_linen(bn_net, bn_vars, train=False, example_inputs=x_vec)
H = sj.hessian(sj.Objective(predict, cross_entropy), params, sj.Batch(x_vec, y_vec))


def bn_loss(p, x, y):
    logits = bn_net.apply({"params": p, **stats}, x, train=False)
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


lam = sj.lanczos_top_k(H, params, k=1, num_iters=NUM_ITERS).values[0]
lam_dense = top_eig(dense_hessian(bn_loss, params, x_vec, y_vec))
print(f"eval mode, λ_max: Lanczos {lam:.6f}, dense {lam_dense:.6f}")
assert rel(lam, lam_dense) < 1e-3

try:
    sj.adapters.from_linen(bn_net, bn_vars, train=True, example_inputs=x_vec)
except ValueError as err:
    print("train mode refused:", str(err)[:240], "...")
else:
    raise AssertionError("train-mode BatchNorm was accepted")

# %% [markdown]
# ## 4. A tiny transformer LM: per-token cross-entropy with a padding mask
#
# A causal one-layer transformer returns logits of shape (T, V) per sequence.
# `sj.token_cross_entropy("mean")` takes targets `(tokens, mask)` and averages the
# cross-entropy over the unpadded positions, ℓ = Σ_t w_t (−log p_t[y_t]) with
# w_t = mask_t / Σ_s mask_s. The GGN (= the Fisher for this loss) acts per position, with
# Λ_t = w_t (diag p_t − p_t p_tᵀ), never forming a (T·V)² matrix.

# %%
T, V, D = (6, 11, 8) if SMOKE else (8, 16, 16)


class TinyLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):  # (N, T) integer tokens
        h = nn.Embed(V, D)(tokens) + self.param("pos", nn.initializers.normal(0.1), (T, D))
        mask = nn.make_causal_mask(tokens)  # position t attends to positions ≤ t
        h = h + nn.MultiHeadDotProductAttention(num_heads=2)(h, mask=mask)
        h = h + nn.Dense(D)(jax.nn.gelu(nn.Dense(2 * D)(h)))
        return nn.Dense(V)(h)  # (N, T, V)


tokens = jax.random.randint(next(keys), (N, T + 1), 1, V)
lengths = jax.random.randint(next(keys), (N,), 2, T + 1)  # sequence p has lengths[p] tokens
inputs, next_tokens = tokens[:, :-1], tokens[:, 1:]
mask = jnp.arange(T)[None, :] < lengths[:, None]  # padded positions count zero
inputs = jnp.where(mask, inputs, 0)  # token 0 is the padding
lm = TinyLM()
lm_vars = jax.jit(lm.init)(next(keys), inputs[:1])
predict, params = sj.adapters.from_linen(lm, lm_vars, example_inputs=inputs)
token_ce = sj.token_cross_entropy("mean")
lm_batch = sj.Batch(inputs, (next_tokens, mask))
G = sj.ggn(sj.Objective(predict, token_ce), params, lm_batch)

G_dense = dense_ggn(
    lambda p, x: lm.apply({"params": p}, x), token_ce, params, inputs, (next_tokens, mask)
)
lam = sj.lanczos_top_k(G, params, k=1, num_iters=NUM_ITERS).values[0]
print(f"P = {sj.num_params(params)}, outputs per sequence {T}×{V}")
print(f"λ_max(GGN): Lanczos {lam:.6f}, dense {top_eig(G_dense):.6f}")
assert rel(lam, top_eig(G_dense)) < 1e-3

# %% [markdown]
# ## 5. A loss of your own: Huber regression on a plain batch-first function
#
# Any `loss(f, y) -> scalar` works: the Hessian, C, E_p[h_p²] and the empirical Fisher need
# only its value, and the GGN gets Λ = ∇²_f loss by autodiff. The true Fisher needs a
# predictive distribution p(y | f), which a bare function does not have: asking for it is an
# error that says how to give one. The model here is a plain function of a batch, made
# per-example by `sj.adapters.from_batched`.

# %%
DELTA = 1.0


def huber(f, y):  # summed over the 2 outputs of one example
    r = f - y
    return jnp.sum(jnp.where(jnp.abs(r) <= DELTA, 0.5 * r**2, DELTA * (jnp.abs(r) - 0.5 * DELTA)))


def net(p, xb):  # batch-first: (N, 5) -> (N, 2)
    return jnp.tanh(xb @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


k1, k2 = jax.random.split(next(keys))
params = {
    "w1": jax.random.normal(k1, (5, HIDDEN)) / np.sqrt(5),
    "b1": jnp.zeros(HIDDEN),
    "w2": jax.random.normal(k2, (HIDDEN, 2)) / np.sqrt(HIDDEN),
    "b2": jnp.zeros(2),
}
y_reg = 2.0 * jax.random.normal(next(keys), (N, 2))  # residuals on both sides of δ
predict = sj.adapters.from_batched(net, params=params, example_inputs=x_vec)
objective = sj.Objective(predict, huber)
reg_batch = sj.Batch(x_vec, y_reg)
G = sj.ggn(objective, params, reg_batch)  # Λ = ∇²_f huber by autodiff

G_dense = dense_ggn(net, huber, params, x_vec, y_reg)
v = random_like(params, next(keys))
Gv = ravel_pytree(G(v))[0]
print(f"‖Gv − G_dense v‖/‖G_dense v‖ = {rel(Gv, G_dense @ ravel_pytree(v)[0]):.2e}")
assert rel(Gv, G_dense @ ravel_pytree(v)[0]) < 1e-4
try:
    sj.fisher(objective, params, reg_batch)(v)
except ValueError as err:
    print("Fisher refused:", str(err)[:200], "...")
else:
    raise AssertionError("the Fisher of a loss without a predictive distribution was accepted")

# %% [markdown]
# ## 6. bfloat16
#
# Cast the parameters and inputs: the curvature products run in bfloat16, while Lanczos
# vectors and their Ritz solve, probe sums and traces accumulate in float32. Against the dense
# float32 Hessian of the same model, expect λ_max to about 1e-4–1e-2 relative and one product
# H v to a few 1e-2 (bfloat16 keeps 8 bits of mantissa; the measured table is in the
# `sharpness_jax.linalg` docstring).

# %%
zoo_mlp = sj.models.build_model("mlp", input_shape=(5,), num_outputs=K, widths=(HIDDEN,))
params32 = zoo_mlp.init(next(keys))
objective = sj.Objective(zoo_mlp.predict, cross_entropy)
H_dense = dense_hessian(  # float32
    lambda p, b: sj.loss_value(objective, p, b), params32, sj.Batch(x_vec, y_vec)
)

params16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params32)
H16 = sj.hessian(objective, params16, sj.Batch(x_vec.astype(jnp.bfloat16), y_vec))
lam16 = sj.lanczos_top_k(H16, params16, k=1, num_iters=NUM_ITERS).values[0]
v = random_like(params16, next(keys))
Hv16 = ravel_pytree(H16(v))[0]
Hv = H_dense @ np.asarray(ravel_pytree(v)[0], np.float64)
print(f"bfloat16: λ_max {float(lam16):.5f} ({lam16.dtype}), dense float32 {top_eig(H_dense):.5f}")
print(f"relative error: λ_max {rel(lam16, top_eig(H_dense)):.1e}, H v {rel(Hv16, Hv):.1e}")
assert rel(lam16, top_eig(H_dense)) < 5e-2 and rel(Hv16, Hv) < 1e-1

# %% [markdown]
# ## 7. Training your own model: `model.factory`
#
# The training loop (`sj.train`), the studies and `experiments.measure` build their model from
# the run config. `model.factory = "pkg.module:fn"` names a function of your own code instead
# of a zoo model, called as `fn(*, input_shape, num_outputs, param_dtype, **options)` with the
# dataset's example shape, its number of classes, the run's dtype and the config's other
# `model` fields. It returns a batch-first linen module (as here), a `sj.models.Model`
# (`init(key)`, per-example `predict`: any framework through `sj.adapters`) or a
# `sj.resnet18.StatefulModel` (BatchNorm trained in train mode, measured in eval mode). The
# factory string is stored with the run's config, so a resumed run and
# `python -m experiments.measure --run=<workdir>` rebuild the same model (the module must be
# importable there too). A module of your own would live in your package; here it is written
# to a temporary directory put on the path.

# %%
models_dir = pathlib.Path(tempfile.mkdtemp())
(models_dir / "my_models.py").write_text(
    """
import flax.linen as nn


class CNN(nn.Module):
    channels: int
    num_outputs: int
    dtype: str

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.channels, (3, 3), param_dtype=self.dtype)(x))
        x = nn.avg_pool(x, (7, 7), strides=(7, 7))
        return nn.Dense(self.num_outputs, param_dtype=self.dtype)(x.reshape(x.shape[0], -1))


def cnn(*, input_shape, num_outputs, param_dtype, channels=4, **options):
    return CNN(channels, num_outputs, param_dtype)
"""
)
sys.path.insert(0, str(models_dir))

workdir = tempfile.mkdtemp()
config = {
    "dataset": {"name": "mnist5k", "num_train": NUM_TRAIN, "num_test": 64},
    "model": {"factory": "my_models:cnn", "channels": CHANNELS},
    "optimizer": {"name": "sgd", "learning_rate": 0.05},
    "batch_size": 16,
    "max_steps": TRAIN_STEPS // 2,
    "measure": {"names": ("loss", "lambda_max"), "every": TRAIN_STEPS // 2},
    "checkpoint_every": TRAIN_STEPS // 2,
    "log_every": 0,
    "progress_bar": False,
}
cache = sj.programs.CompileCache()  # compiled programs shared by the calls below
first = sj.train(config, workdir, cache=cache)
config["max_steps"] = TRAIN_STEPS  # a rerun with the same workdir resumes
run = sj.train(config, workdir, cache=cache)
print(f"resumed from step {run.resumed_from}, stopped at {run.step} ({run.status})")
for row in run.rows:
    print(f"step {row['step']:>4}: loss {row['train_loss']:.4f}, λ_max {row['lambda_max']:.4f}")

# What `experiments.measure --run=<workdir> --measures=loss,lambda_max` does, as library calls
# (the stored config names the factory, so the same model is rebuilt):
stored, ckpt_params, step = sj.training.load_checkpoint(workdir)
row, _ = sj.training.measure(stored, ckpt_params, step=step, cache=cache)
print(f"measured from the workdir (model {stored.model.factory!r}): λ_max {row['lambda_max']:.4f}")

# The dense reference: the model the config describes, at the checkpoint.
problem = sj.problem.problem_from_config(stored)
train_batch = sj.Batch(*problem.dataset.train)
H_dense = dense_hessian(
    lambda p, b: sj.loss_value(problem.objective, p, b), ckpt_params, train_batch
)
print(f"P = {sj.num_params(ckpt_params)}, dense λ_max {top_eig(H_dense):.4f}")
assert rel(row["lambda_max"], top_eig(H_dense)) < 1e-3
