"""Fisher geometry: Fisher metrics, Riemannian sharpness, reparametrisations, PAC-Bayes.

Riemannian sharpness measures the loss curvature H = ∇²L in the metric of the Fisher
information F instead of the Euclidean one (study 1, "standard form"):

    S_R = tr(F⁻¹H),        λ_max(F⁻¹H) = max{λ : H v = λ F v}.

Under a linear, function-preserving change of coordinates θ' = T θ (layer or unit rescaling
of a ReLU net, a permutation of hidden units, a gauge of a linear net) both matrices
transform by congruence, H' = T⁻ᵀ H T⁻¹ and F' = T⁻ᵀ F T⁻¹, so tr(F⁻¹H) and the
generalised eigenvalues do not change, while tr(H) and λ_max(H) do.

Metrics (all MEANS over the n examples):

=================================  =========================================================
function                           metric
=================================  =========================================================
``operators.fisher``               full true Fisher F = (1/n) Σ_p J_pᵀ B_p B_pᵀ J_p (matvec)
:func:`fisher_diagonal`            diag F = (1/n) Σ_p Σ_k (J_pᵀ B_p e_k)²  (exact, K VJPs)
:func:`empirical_fisher_diagonal`  diag F_emp = (1/n) Σ_p g_p ⊙ g_p  (exact; NOT ḡ ⊙ ḡ)
:func:`kfac_factors`               K-FAC: per Dense layer F_l ≈ A_l ⊗ G_l (exact factors)
=================================  =========================================================

B_p is the loss's ``output_fisher_factor`` (F_out = B Bᵀ), J_p = ∂f(θ, x_p)/∂θ, g_p = ∇ℓ_p.
For softmax cross-entropy and squared error the true Fisher equals the Gauss–Newton matrix.

Riemannian sharpness:

* :func:`riemannian_sharpness_from_matrices` / :func:`riemannian_sharpness_dense`: dense
  generalised eigenproblem for small models, with damping and a pseudo-inverse option;
* :func:`diagonal_riemannian_sharpness`: the estimator of the paper's experiments,
  Ŝ_R = Σ_i H_ii / (F_ii + ε) with the diagonal empirical Fisher;
* :func:`kfac_riemannian_sharpness`: tr and λ_max of F_KFAC⁻¹ H, matrix-free;
* :func:`riemannian_trace`, :func:`riemannian_top_k`: the same for any metric given by its
  inverse square root F^{-1/2} (see :func:`diagonal_inverse_sqrt`,
  :func:`kfac_fisher_inverse_sqrt`), on the whitened operator F^{-1/2} H F^{-1/2}.

A singular Fisher. For a network with homogeneous hidden units the full F is ALWAYS
singular: the generator of every unit's rescaling lies in the kernel of every J_p. The
``pinv`` option restricts the problem to the range of F; the result is invariant under
reparametrisation when ker F ⊆ ker H, which holds at a critical point (H annihilates the
symmetry generators there) and for the softmax shift directions of cross-entropy. Damping
(F + εI) is the other option; it is not invariant. The diagonal and K-FAC metrics are
typically invertible away from critical points too (K-FAC with cross-entropy up to the
softmax shift, which ``pinv`` handles), and their undamped sharpness is exactly invariant
under unit rescaling and permutations. The damping used is always reported.

Parameter layouts for the reparametrisations and K-FAC:

* MLP: ``{"params": {"Dense_0": {"kernel": (d_in, d_out), "bias": (d_out,)}, "Dense_1": …}}``
  (the outer ``"params"`` level is optional, biases are optional), layers applied in order,
  f(x) = s_{L−1}, s_l = h_l W_l + b_l, h_{l+1} = σ(s_l), h_0 = x (flattened);
* shallow (:mod:`sharpness_jax.shallow`): ``{"w": (m, d), "b": (m,), "a": (m, K)}``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sharpness_jax import checks, linalg, operators, shallow, subsets
from sharpness_jax.objective import Batch, Objective
from sharpness_jax.per_example import sum_examples

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

__all__ = [
    "MLP_ACTIVATIONS",
    "DenseRiemannianSharpness",
    "DiagonalRiemannianSharpness",
    "KFACFactor",
    "KFACRiemannianSharpness",
    "PacBayesBound",
    "diagonal_inverse_sqrt",
    "diagonal_riemannian_sharpness",
    "empirical_fisher_diagonal",
    "fisher_diagonal",
    "fisher_pac_bayes_bound",
    "fisher_posterior_kl",
    "kfac_factors",
    "kfac_fisher",
    "kfac_fisher_inverse",
    "kfac_fisher_inverse_sqrt",
    "kfac_riemannian_sharpness",
    "linear_gauge",
    "mlp_predict",
    "pac_bayes_bound",
    "permute_units",
    "random_linear_gauge",
    "random_permute_units",
    "random_rescale_layers",
    "random_rescale_units",
    "rescale_layers",
    "rescale_units",
    "riemannian_sharpness_dense",
    "riemannian_sharpness_from_matrices",
    "riemannian_top_k",
    "riemannian_trace",
]

# Activations of the MLP layout, by name, as in sharpness_jax.models (gelu is the exact erf
# form, gelu_tanh the tanh approximation, leaky_relu has jax.nn's slope 0.01). Pass a callable
# to K-FAC for anything else.
MLP_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "leaky_relu": jax.nn.leaky_relu,
    "linear": lambda z: z,
    "identity": lambda z: z,
    "tanh": jnp.tanh,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "elu": jax.nn.elu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# Positively homogeneous of degree 1, σ(cz) = c σ(z) for c > 0: the rescaling symmetries.
_HOMOGENEOUS = ("relu", "leaky_relu", "linear", "identity")


# ----------------------------------------------------------------------------- helpers


def _concrete(x: Any) -> np.ndarray | None:
    """The value of ``x`` as a NumPy array, or None under tracing (checks are then skipped)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_nonnegative(name: str, value: Any) -> None:
    val = _concrete(value)
    if val is None:
        return
    if val.ndim != 0 or not np.isfinite(val) or val < 0:
        raise ValueError(f"{name} must be a finite scalar >= 0, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    val = _concrete(value)
    if val is None:
        return
    if val.ndim != 0 or not np.isfinite(val) or val <= 0:
        raise ValueError(f"{name} must be a finite scalar > 0, got {value!r}")


def _flat_dtype(tree: PyTree):
    return ravel_pytree(tree)[0].dtype


def _template(params: PyTree, subset: subsets.Selector | None) -> PyTree:
    return params if subset is None else subsets.select(params, subset)


# ------------------------------------------------------------------------ MLP layout


def _mlp_layers(params: PyTree) -> tuple[dict, list[str], Callable[[dict], PyTree]]:
    """``(layers, names, rewrap)`` of the MLP layout, validated.

    ``layers`` maps ``Dense_i`` to ``{"kernel", ["bias"]}``; ``rewrap`` puts a new layer
    dict back under ``"params"`` when the input had that level.

    Raises:
      TypeError / ValueError: when ``params`` is not the MLP layout.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"MLP params must be a dict, got {type(params).__name__}")
    wrapped = "params" in params
    if wrapped:
        if set(params) != {"params"}:
            raise ValueError(
                f"MLP params hold only the 'params' collection, got collections {sorted(params)}"
            )
        inner = params["params"]
    else:
        inner = params
    if not isinstance(inner, Mapping) or not inner:
        raise ValueError("MLP params need at least one layer named Dense_0")
    names = [f"Dense_{i}" for i in range(len(inner))]
    if set(inner) != set(names):
        raise ValueError(
            f"the MLP layout has layers Dense_0 … Dense_{{L-1}} and nothing else; got layers "
            f"{sorted(inner)}"
        )
    width = None
    for name in names:
        layer = inner[name]
        if (
            not isinstance(layer, Mapping)
            or "kernel" not in layer
            or set(layer) - {"kernel", "bias"}
        ):
            keys = sorted(layer) if isinstance(layer, Mapping) else type(layer).__name__
            raise ValueError(f"layer {name} must hold 'kernel' and optionally 'bias', got {keys}")
        kernel = layer["kernel"]
        if jnp.ndim(kernel) != 2:
            raise ValueError(f"{name}/kernel must be (d_in, d_out), got shape {jnp.shape(kernel)}")
        if "bias" in layer and jnp.shape(layer["bias"]) != (jnp.shape(kernel)[1],):
            raise ValueError(
                f"{name}/bias must have shape ({jnp.shape(kernel)[1]},), got "
                f"{jnp.shape(layer['bias'])}"
            )
        if width is not None and jnp.shape(kernel)[0] != width:
            raise ValueError(
                f"{name}/kernel takes {jnp.shape(kernel)[0]} inputs but the previous layer has "
                f"{width} outputs"
            )
        width = jnp.shape(kernel)[1]

    def rewrap(new_layers: dict) -> PyTree:
        return {"params": new_layers} if wrapped else new_layers

    return dict(inner), names, rewrap


def _is_shallow(params: PyTree) -> bool:
    return (
        isinstance(params, Mapping) and {"w", "a"} <= set(params) and set(params) <= {"w", "b", "a"}
    )


def _activation(activation: str | Callable[[jax.Array], jax.Array]):
    if callable(activation):
        return activation
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(
            f"unknown MLP activation {activation!r}; choose from {sorted(MLP_ACTIVATIONS)} or "
            "pass a callable"
        )
    return MLP_ACTIVATIONS[activation]


def _check_homogeneous(activation: str) -> None:
    if not isinstance(activation, str) or activation not in _HOMOGENEOUS:
        raise ValueError(
            f"rescaling preserves the function only for positively homogeneous activations "
            f"{_HOMOGENEOUS}; got {activation!r}"
        )


def mlp_predict(
    params: PyTree, x: jax.Array, *, activation: str | Callable[[jax.Array], jax.Array]
) -> jax.Array:
    """The dense MLP of the MLP layout on ONE example; the model K-FAC assumes.

    h_0 = x flattened (cast to the kernels' dtype), s_l = h_l W_l + b_l,
    h_{l+1} = σ(s_l) for l < L − 1, and f(x) = s_{L−1}, shape ``(d_out of the last layer,)``.

    Args:
      params: MLP layout (see the module docstring).
      x: one input; flattened to a vector.
      activation: a name in ``MLP_ACTIVATIONS`` or a callable σ.
    """
    layers, names, _ = _mlp_layers(params)
    sigma = _activation(activation)
    return _mlp_forward(layers, names, sigma, x, None)[0]


def _mlp_forward(layers, names, sigma, x, perturbations):
    """Outputs and layer inputs; ``perturbations[i]`` is added to the pre-activation s_l."""
    h = jnp.reshape(x, (-1,)).astype(layers[names[0]]["kernel"].dtype)
    inputs = []
    for i, name in enumerate(names):
        layer = layers[name]
        inputs.append(h)
        s = h @ layer["kernel"]
        if "bias" in layer:
            s = s + layer["bias"]
        if perturbations is not None:
            s = s + perturbations[i]
        h = sigma(s) if i < len(names) - 1 else s
    return h, inputs


# ------------------------------------------------------------------- diagonal Fishers


def empirical_fisher_diagonal(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> PyTree:
    """diag F_emp = (1/n) Σ_p g_p ⊙ g_p, g_p = ∇θ ℓ_p(θ), exactly.

    The squared PER-EXAMPLE gradients are summed, streamed over chunks of examples (memory
    ``chunk_size`` × P); this is not the square of the batch gradient ḡ ⊙ ḡ.

    Returns:
      A pytree like ``params`` (or the subset's ``{path: leaf}`` dict).
    """
    objective, params, n = operators.prepare(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    grad = jax.grad(objective.example_loss)

    def one(example):
        x, y = example
        return jax.tree_util.tree_map(jnp.square, grad(params, x, y))

    total = sum_examples(one, tuple(batch), chunk_size=chunk_size)
    return jax.tree_util.tree_map(lambda a: a / n, total)


def fisher_diagonal(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> PyTree:
    """diag F = (1/n) Σ_p Σ_k (J_pᵀ B_p e_k)², the true Fisher's diagonal, exactly.

    B_p = ``loss.output_fisher_factor(f_p)`` with F_out = B Bᵀ, so F = (1/n) Σ_p J_pᵀ B_p B_pᵀ J_p
    and its diagonal is the sum over the K columns of B_p of the squared VJPs J_pᵀ B_p e_k.
    K VJPs per example (one linearisation); memory ``chunk_size`` × K × P. Equals the diagonal
    of the GGN for softmax cross-entropy and squared error.

    Returns:
      A pytree like ``params`` (or the subset's ``{path: leaf}`` dict).
    """
    objective, params, n = operators.prepare(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    factor = objective.loss.output_fisher_factor

    def one(example):
        x, _ = example
        f, vjp = jax.vjp(lambda p: objective.predict(p, x), params)
        columns = jax.vmap(lambda u: vjp(u)[0])(factor(f).T)  # row k: J_pᵀ B_p e_k
        return jax.tree_util.tree_map(lambda c: jnp.sum(jnp.square(c), axis=0), columns)

    total = sum_examples(one, tuple(batch), chunk_size=chunk_size)
    return jax.tree_util.tree_map(lambda a: a / n, total)


def diagonal_inverse_sqrt(diagonal: PyTree, *, damping: float = 0.0) -> MatVec:
    """v -> (D + εI)^{-1/2} v for a diagonal metric D (a pytree of its entries).

    Coordinates with D_ii + ε = 0 (possible only with ε = 0) are EXCLUDED: their entry is set
    to 0, i.e. the pseudo-inverse square root, which restricts the problem to the other
    coordinates.

    Args:
      diagonal: D_ii ≥ 0, a pytree shaped like the vectors.
      damping: ε ≥ 0.
    """
    _check_nonnegative("damping", damping)
    scale = jax.tree_util.tree_map(
        lambda d: jnp.where(
            d + damping > 0, 1 / jnp.sqrt(jnp.where(d + damping > 0, d + damping, 1)), 0
        ),
        diagonal,
    )

    def matvec(v):
        return jax.tree_util.tree_map(jnp.multiply, scale, v)

    return matvec


# ---------------------------------------------------------------------------- K-FAC


class KFACFactor(NamedTuple):
    """The Kronecker factors of one Dense layer, F_layer ≈ A ⊗ G.

    The layer's parameters are arranged as W̄ = [kernel; biasᵀ] of shape
    ``(d_in [+ 1], d_out)`` (bias as the last row) and vectorised row-major, so
    (A ⊗ G) vec(V̄) = vec(A V̄ G).

    Attributes:
      A: ``(d_in [+ 1], d_in [+ 1])``, (1/n) Σ_p ā_p ā_pᵀ with ā_p = [h_p; 1] the layer input
        (the 1 only when the layer has a bias).
      G: ``(d_out, d_out)``, (1/n) Σ_p Σ_k δ_pk δ_pkᵀ with δ_pk = (∂f_p/∂s)ᵀ B_p e_k the
        gradient at the layer's pre-activations s of the output direction B_p e_k. This is
        E_ŷ[δδᵀ] under the predictive distribution, exactly (no sampling).
    """

    A: jax.Array
    G: jax.Array


def kfac_factors(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    activation: str | Callable[[jax.Array], jax.Array],
    chunk_size: int | None = None,
) -> dict[str, KFACFactor]:
    """K-FAC factors of the true Fisher of a dense MLP, exactly (no sampled targets).

    For every Dense layer l: A_l = (1/n) Σ_p ā_p ā_pᵀ and G_l = (1/n) Σ_p Σ_k δ_pk δ_pkᵀ (see
    :class:`KFACFactor`), so that the layer's Fisher block
    F_ll = (1/n) Σ_p (ā_p ā_pᵀ) ⊗ (Σ_k δ_pk δ_pkᵀ) is approximated by A_l ⊗ G_l. Cross-layer
    blocks are dropped (block-diagonal K-FAC).

    Supports the MLP layout (module docstring) with a named or callable activation: the
    forward pass is recomputed from the params by :func:`mlp_predict`, and the pre-activation
    gradients are VJPs with respect to perturbations of the pre-activations. When the values
    are concrete, ``objective.predict`` is compared with :func:`mlp_predict` on the first
    example and a mismatch (e.g. a wrong activation) raises. Streamed over chunks of examples.

    Args:
      objective: its ``loss`` must provide ``output_fisher_factor``.
      params: MLP layout.
      batch: the examples (inputs are flattened per example).
      activation: the hidden activation, a name in ``MLP_ACTIVATIONS`` or a callable.
      chunk_size: examples per chunk.

    Returns:
      ``{"Dense_0": KFACFactor(A, G), …}``.

    Raises:
      ValueError / TypeError: on a layout that is not a dense MLP, a bad batch, or a model
        that does not match :func:`mlp_predict`.
    """
    layers, names, _ = _mlp_layers(params)
    sigma = _activation(activation)
    _, _, n = operators.prepare(objective, params, batch, chunk_size=chunk_size)
    inputs, _ = batch
    _check_matches_mlp(objective, params, inputs, layers, names, sigma, activation)
    factor = objective.loss.output_fisher_factor

    def one(x):
        zeros = [jnp.zeros_like(layers[name]["kernel"][0]) for name in names]
        f, vjp, layer_inputs = jax.vjp(
            lambda e: _mlp_forward(layers, names, sigma, x, e), zeros, has_aux=True
        )
        deltas = jax.vmap(lambda u: vjp(u)[0])(factor(f).T)  # per layer: (K, d_out)
        out = {}
        for name, h, delta in zip(names, layer_inputs, deltas, strict=True):
            if "bias" in layers[name]:
                h = jnp.concatenate([h, jnp.ones((1,), h.dtype)])
            out[name] = KFACFactor(jnp.outer(h, h), delta.T @ delta)
        return out

    total = sum_examples(one, inputs, chunk_size=chunk_size)
    return {name: KFACFactor(fac.A / n, fac.G / n) for name, fac in total.items()}


def _check_matches_mlp(objective, params, inputs, layers, names, sigma, activation):
    x0 = jax.tree_util.tree_map(lambda a: a[0], inputs)
    expected = _concrete(objective.predict(params, x0))
    if expected is None:
        return
    got = np.asarray(_mlp_forward(layers, names, sigma, x0, None)[0])
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1.0)
    tol = 1e3 * float(jnp.finfo(got.dtype).eps) * scale
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=0, atol=tol):
        raise ValueError(
            f"objective.predict does not match the dense MLP of the params with activation "
            f"{activation!r} (max |difference| "
            f"{np.max(np.abs(got - expected)) if got.shape == expected.shape else 'shape'}); "
            "K-FAC supports MLPs of the Dense_i layout with a named or callable activation"
        )


def _kfac_apply(factors: Mapping[str, KFACFactor], fn) -> MatVec:
    """v -> per layer, V̄ -> fn(name, V̄) on the stacked W̄ = [kernel; biasᵀ] layout."""
    names = list(factors)

    def matvec(v):
        layers, v_names, rewrap = _mlp_layers(v)
        if v_names != names:
            raise ValueError(f"the vector has layers {v_names}, the K-FAC factors {names}")
        out = {}
        for name in names:
            layer = layers[name]
            kernel = layer["kernel"]
            has_bias = "bias" in layer
            vbar = jnp.concatenate([kernel, layer["bias"][None, :]]) if has_bias else kernel
            a_dim = factors[name].A.shape[0]
            if vbar.shape != (a_dim, factors[name].G.shape[0]):
                raise ValueError(
                    f"layer {name}: the vector block has shape {vbar.shape}, the factors "
                    f"{(a_dim, factors[name].G.shape[0])}"
                )
            r = fn(name, vbar)
            new = {"kernel": r[: kernel.shape[0]]}
            if has_bias:
                new["bias"] = r[kernel.shape[0]]
            out[name] = {key: new[key] for key in layer}
        return rewrap(out)

    return matvec


def kfac_fisher(factors: Mapping[str, KFACFactor]) -> MatVec:
    """v -> F_KFAC v, blockwise (A_l ⊗ G_l) vec(V̄_l) = vec(A_l V̄_l G_l).

    Vectors have the MLP layout of the params the factors were computed from.
    """
    return _kfac_apply(factors, lambda name, vbar: factors[name].A @ vbar @ factors[name].G)


def _kfac_power(factors, power, damping, pinv, rcond) -> MatVec:
    """v -> (A ⊗ G + εI)^power v per layer from the eigendecompositions of A and G.

    A ⊗ G + εI = (U_A ⊗ U_G) diag(λ_a λ_g + ε) (U_A ⊗ U_G)ᵀ (λ clipped at 0), so the power is
    exact for any damping. With ``pinv`` the eigenvalues μ = λ_a λ_g + ε ≤ rcond · max μ of a
    layer are treated as zero (pseudo-inverse of that block).
    """
    _check_nonnegative("damping", damping)
    eig = {}
    for name, fac in factors.items():
        la, ua = jnp.linalg.eigh(fac.A)
        lg, ug = jnp.linalg.eigh(fac.G)
        mu = jnp.maximum(la, 0)[:, None] * jnp.maximum(lg, 0)[None, :] + damping
        if pinv:
            cut = (mu.size * jnp.finfo(mu.dtype).eps if rcond is None else rcond) * jnp.max(mu)
            keep = mu > cut
        else:
            keep = jnp.ones(mu.shape, bool)
        scale = jnp.where(keep, jnp.power(jnp.where(keep, mu, 1), power), 0)
        eig[name] = (ua, ug, scale)

    def fn(name, vbar):
        ua, ug, scale = eig[name]
        return ua @ ((ua.T @ vbar @ ug) * scale) @ ug.T

    return _kfac_apply(factors, fn)


def kfac_fisher_inverse(
    factors: Mapping[str, KFACFactor],
    *,
    damping: float = 0.0,
    pinv: bool = False,
    rcond: float | None = None,
) -> MatVec:
    """v -> (F_KFAC + εI)⁻¹ v, exactly for the damped Kronecker blocks.

    Per layer (A ⊗ G + εI)⁻¹ = (U_A ⊗ U_G) diag(1/(λ_a λ_g + ε)) (U_A ⊗ U_G)ᵀ (true damping of
    the Kronecker product, not the factored π-damping).

    Args:
      factors: from :func:`kfac_factors`.
      damping: ε ≥ 0.
      pinv: pseudo-inverse: drop eigenvalues μ ≤ rcond · max μ of each layer block (needed
        with ε = 0 for softmax cross-entropy, whose last-layer G annihilates the all-ones
        vector).
      rcond: relative cutoff (default: block size × machine epsilon).
    """
    return _kfac_power(factors, -1.0, damping, pinv, rcond)


def kfac_fisher_inverse_sqrt(
    factors: Mapping[str, KFACFactor],
    *,
    damping: float = 0.0,
    pinv: bool = False,
    rcond: float | None = None,
) -> MatVec:
    """v -> (F_KFAC + εI)^{-1/2} v, the symmetric inverse square root; options as in
    :func:`kfac_fisher_inverse`."""
    return _kfac_power(factors, -0.5, damping, pinv, rcond)


# -------------------------------------------------------------- Riemannian sharpness


class DenseRiemannianSharpness(NamedTuple):
    """tr and spectrum of (F + εI)⁻¹ H from dense matrices.

    Attributes:
      trace: tr((F + εI)⁻¹ H), on the range of F + εI with ``pinv``.
      lambda_max: the top generalised eigenvalue of H v = λ (F + εI) v.
      eigenvalues: all generalised eigenvalues, descending; with ``pinv`` only the first
        ``rank`` are real and the rest are NaN.
      damping: ε used.
      rank: numerical rank of F + εI (eigenvalues > rcond · max); rank < P means F is
        singular and, without ``pinv`` or damping, the other fields are meaningless.
      condition_number: max/min eigenvalue of F + εI (over the kept ones with ``pinv``).
    """

    trace: jax.Array
    lambda_max: jax.Array
    eigenvalues: jax.Array
    damping: jax.Array
    rank: jax.Array
    condition_number: jax.Array


def riemannian_sharpness_from_matrices(
    hessian_matrix: jax.Array,
    fisher_matrix: jax.Array,
    *,
    damping: float = 0.0,
    pinv: bool = False,
    rcond: float | None = None,
) -> DenseRiemannianSharpness:
    """Generalised eigenproblem H v = λ (F + εI) v from dense symmetric matrices.

    With F + εI = U diag(μ) Uᵀ, the whitened matrix M = W ᵀ H W, W = U diag(μ^{-1/2}), has the
    generalised eigenvalues as its eigenvalues and tr M = tr((F + εI)⁻¹ H).

    ``pinv`` restricts to the range of F + εI: eigenvalues μ ≤ rcond · max μ are dropped
    (W keeps only the other columns), so M is the r × r matrix Λ_r^{-1/2} U_rᵀ H U_r Λ_r^{-1/2}
    and tr M = tr((F + εI)⁺ H). This is invariant under function-preserving linear
    reparametrisations when ker F ⊆ ker H (e.g. at a critical point, where H annihilates the
    rescaling generators that span ker F for ReLU nets); otherwise it depends on the
    (Euclidean) choice of the complement of ker F.

    Args:
      hessian_matrix: ``(P, P)`` H.
      fisher_matrix: ``(P, P)`` F (positive semi-definite).
      damping: ε ≥ 0.
      pinv: restrict to the range of F + εI instead of inverting it.
      rcond: relative eigenvalue cutoff for ``rank`` and ``pinv`` (default P × machine eps).

    Returns:
      :class:`DenseRiemannianSharpness`.
    """
    h = jnp.asarray(hessian_matrix)
    f = jnp.asarray(fisher_matrix)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or f.shape != h.shape:
        raise ValueError(
            f"need two square matrices of the same shape, got H {h.shape} and F {f.shape}"
        )
    _check_nonnegative("damping", damping)
    size = h.shape[0]
    h = (h + h.T) / 2
    mu, u = jnp.linalg.eigh((f + f.T) / 2)
    mu = mu + damping
    cut = (size * jnp.finfo(mu.dtype).eps if rcond is None else rcond) * jnp.max(mu)
    above = mu > cut
    rank = jnp.sum(above, dtype=jnp.int32)
    keep = above if pinv else jnp.ones_like(above)
    w = u * jnp.where(keep, 1 / jnp.sqrt(jnp.where(keep, mu, 1)), 0)[None, :]
    m = w.T @ h @ w
    m = (m + m.T) / 2
    trace = jnp.trace(m)
    # Dropped directions are decoupled rows of zeros; push them below the spectrum.
    sentinel = 1 + 2 * size * jnp.max(jnp.abs(m))
    values = jnp.linalg.eigvalsh(m - jnp.diag(jnp.where(keep, 0, sentinel)))[::-1]
    if pinv:
        values = jnp.where(jnp.arange(size, dtype=jnp.int32) < rank, values, jnp.nan)
    kept_mu = jnp.where(keep, mu, jnp.nan)
    lo = jnp.nanmin(kept_mu)
    condition = jnp.where(lo > 0, jnp.nanmax(kept_mu) / jnp.where(lo > 0, lo, 1), jnp.inf)
    return DenseRiemannianSharpness(
        trace, values[0], values, jnp.asarray(damping, mu.dtype), rank, condition
    )


def riemannian_sharpness_dense(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    fisher: str = "true",
    damping: float = 0.0,
    pinv: bool = False,
    rcond: float | None = None,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    probe_chunk: int | None = None,
) -> DenseRiemannianSharpness:
    """tr((F + εI)⁻¹ H) and the generalised spectrum with dense H and F (small P only).

    H = ``operators.hessian`` and F = ``operators.fisher`` (``fisher="true"``, the exact true
    Fisher = GGN for CE/SE) or ``operators.empirical_fisher`` (``"empirical"``), materialised
    with P matvecs each; then :func:`riemannian_sharpness_from_matrices`. Networks with
    homogeneous hidden units have a singular F (check ``rank``): use ``pinv`` or damping.

    Args:
      fisher: ``"true"`` or ``"empirical"``.
      damping, pinv, rcond: see :func:`riemannian_sharpness_from_matrices`.
      chunk_size: examples per chunk.
      subset: restrict H and F to a parameter subset (their diagonal blocks).
      probe_chunk: basis vectors per batched matvec when materialising.
    """
    builders = {"true": operators.fisher, "empirical": operators.empirical_fisher}
    if fisher not in builders:
        raise ValueError(f"fisher must be one of {sorted(builders)}, got {fisher!r}")
    template = _template(params, subset)
    hvp = operators.hessian(objective, params, batch, chunk_size=chunk_size, subset=subset)
    fvp = builders[fisher](objective, params, batch, chunk_size=chunk_size, subset=subset)
    h = linalg.dense(hvp, template, chunk_size=probe_chunk)
    f = linalg.dense(fvp, template, chunk_size=probe_chunk)
    return riemannian_sharpness_from_matrices(h, f, damping=damping, pinv=pinv, rcond=rcond)


def _whitened(hvp: MatVec, inverse_sqrt: MatVec) -> MatVec:
    return lambda v: inverse_sqrt(hvp(inverse_sqrt(v)))


def riemannian_trace(
    hvp: MatVec,
    inverse_sqrt: MatVec,
    template: PyTree,
    /,
    *,
    key: jax.Array | None = None,
    num_probes: int | None = None,
    probe_chunk: int | None = None,
) -> linalg.Estimate:
    """tr(F⁻¹H) = tr(F^{-1/2} H F^{-1/2}) for a metric given by its inverse square root.

    Exact (P matvecs of the whitened operator, ``stderr`` 0, ``num_probes`` 0) when ``key``
    and ``num_probes`` are None; Hutchinson with Rademacher probes and a standard error
    otherwise.

    Args:
      hvp: v -> H v.
      inverse_sqrt: v -> F^{-1/2} v (e.g. :func:`diagonal_inverse_sqrt`,
        :func:`kfac_fisher_inverse_sqrt`); it carries the damping.
      template: pytree of the vector space.
      key, num_probes: both for the stochastic estimate, neither for the exact one.
      probe_chunk: probes / basis vectors per batched matvec.
    """
    whitened = _whitened(hvp, inverse_sqrt)
    if (key is None) != (num_probes is None):
        raise ValueError("pass both key and num_probes (Hutchinson) or neither (exact)")
    if key is None:
        value = linalg.trace_exact(whitened, template, chunk_size=probe_chunk)
        return linalg.Estimate(value, jnp.zeros_like(value), 0)
    return linalg.hutchinson_trace(
        whitened, template, key=key, num_probes=num_probes, probe_chunk=probe_chunk
    )


def riemannian_top_k(
    hvp: MatVec,
    inverse_sqrt: MatVec,
    template: PyTree,
    /,
    *,
    k: int = 1,
    num_iters: int = 50,
    key: jax.Array | None = None,
    tol: float | None = None,
) -> linalg.Eigen:
    """Top-k generalised eigenpairs of H v = λ F v by Lanczos on F^{-1/2} H F^{-1/2}.

    Returns:
      :class:`linalg.Eigen`: ``values`` the generalised eigenvalues (descending),
      ``vectors`` the generalised eigenvectors v = F^{-1/2} u (F-orthonormal, vᵀ F v = 1, for
      unit Lanczos vectors u), ``residuals`` those of the whitened problem.
    """
    eig = linalg.lanczos_top_k(
        _whitened(hvp, inverse_sqrt), template, k=k, num_iters=num_iters, key=key, tol=tol
    )
    return eig._replace(vectors=jax.vmap(inverse_sqrt)(eig.vectors))


class DiagonalRiemannianSharpness(NamedTuple):
    """Ŝ_R = Σ_i H_ii / (F_ii + ε) over the coordinates with F_ii + ε > 0.

    Attributes:
      value: Ŝ_R.
      stderr: standard error (0 when H's diagonal is exact).
      num_probes: Hutchinson probes (0 when exact).
      damping: ε used.
      num_excluded: coordinates with F_ii + ε = 0 (only possible with ε = 0; there H_ii is
        typically 0 too, e.g. the weights of a dead ReLU unit), left out of the sum.
    """

    value: jax.Array
    stderr: jax.Array
    num_probes: int
    damping: jax.Array
    num_excluded: jax.Array


def diagonal_riemannian_sharpness(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    damping: float = 0.0,
    fisher: str = "empirical",
    key: jax.Array | None = None,
    num_probes: int | None = None,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    probe_chunk: int | None = None,
) -> DiagonalRiemannianSharpness:
    """Ŝ_R = Σ_i H_ii / (F_ii + ε), the diagonal Riemannian sharpness of the experiments.

    F is the diagonal empirical Fisher (1/n) Σ_p g_p² (``fisher="empirical"``, the paper's
    choice) or the true Fisher's diagonal (``"true"``). Exactly invariant under diagonal
    reparametrisations (layer / unit rescaling, and permutations) when ε = 0, not under dense
    ones. Coordinates with F_ii + ε = 0 are excluded and counted (``num_excluded``).

    H's diagonal is exact (``linalg.diagonal_exact``, P HVPs) when ``key`` and ``num_probes``
    are None; otherwise Hutchinson on D⁻¹H, zᵀ D⁻¹ H z with Rademacher z, whose mean over the
    probes is Σ_i (z ⊙ Hz)_i / D_ii and whose standard error is reported.

    Args:
      damping: ε ≥ 0, always reported back.
      fisher: ``"empirical"`` or ``"true"``.
      key, num_probes: both for Hutchinson (large P), neither for the exact diagonal.
      chunk_size: examples per chunk.
      subset: restrict to a parameter subset.
      probe_chunk: basis vectors / probes per batched HVP.

    Returns:
      :class:`DiagonalRiemannianSharpness`.
    """
    builders = {"empirical": empirical_fisher_diagonal, "true": fisher_diagonal}
    if fisher not in builders:
        raise ValueError(f"fisher must be one of {sorted(builders)}, got {fisher!r}")
    _check_nonnegative("damping", damping)
    if (key is None) != (num_probes is None):
        raise ValueError("pass both key and num_probes (Hutchinson) or neither (exact)")
    template = _template(params, subset)
    f_diag = builders[fisher](objective, params, batch, chunk_size=chunk_size, subset=subset)
    hvp = operators.hessian(objective, params, batch, chunk_size=chunk_size, subset=subset)
    d = ravel_pytree(f_diag)[0] + damping
    keep = d > 0
    inv = jnp.where(keep, 1 / jnp.where(keep, d, 1), 0)
    num_excluded = jnp.sum(~keep, dtype=jnp.int32)
    damping_out = jnp.asarray(damping, d.dtype)
    if key is None:
        h_diag = ravel_pytree(linalg.diagonal_exact(hvp, template, chunk_size=probe_chunk))[0]
        value = jnp.sum(h_diag * inv)
        return DiagonalRiemannianSharpness(
            value, jnp.zeros_like(value), 0, damping_out, num_excluded
        )
    _, unravel = ravel_pytree(template)

    def scaled(v):
        return unravel(ravel_pytree(hvp(v))[0] * inv)

    est = linalg.hutchinson_trace(
        scaled, template, key=key, num_probes=num_probes, probe_chunk=probe_chunk
    )
    return DiagonalRiemannianSharpness(
        est.value, est.stderr, est.num_probes, damping_out, num_excluded
    )


class KFACRiemannianSharpness(NamedTuple):
    """tr and λ_max of (F_KFAC + εI)⁻¹ H.

    Attributes:
      trace: tr((F_KFAC + εI)⁻¹ H) (on its range with ``pinv``).
      trace_stderr: standard error of ``trace`` (0 when exact).
      lambda_max: top generalised eigenvalue, by Lanczos.
      damping: ε used.
      num_probes: Hutchinson probes for the trace (0 when exact).
    """

    trace: jax.Array
    trace_stderr: jax.Array
    lambda_max: jax.Array
    damping: jax.Array
    num_probes: int


def kfac_riemannian_sharpness(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    activation: str | Callable[[jax.Array], jax.Array],
    damping: float = 0.0,
    pinv: bool = False,
    rcond: float | None = None,
    num_iters: int = 50,
    tol: float | None = None,
    key: jax.Array | None = None,
    num_probes: int | None = None,
    chunk_size: int | None = None,
    probe_chunk: int | None = None,
) -> KFACRiemannianSharpness:
    """Riemannian sharpness in the K-FAC metric of a dense MLP, matrix-free.

    Whitened operator S = (F_KFAC + εI)^{-1/2} H (F_KFAC + εI)^{-1/2}; tr S by
    :func:`riemannian_trace` (exact unless ``num_probes`` is given) and λ_max by Lanczos.
    With ε = 0 it is exactly invariant under per-unit rescaling and permutations of hidden
    units, which act on each Kronecker factor by congruence (A_{l+1} → C A_{l+1} C,
    G_l → C⁻¹ G_l C⁻¹).

    Args:
      activation: the MLP's hidden activation (see :func:`kfac_factors`).
      damping, pinv, rcond: see :func:`kfac_fisher_inverse`.
      num_iters, tol: Lanczos budget and early-stopping tolerance.
      key: PRNG key for Lanczos (and for the Hutchinson probes when ``num_probes`` is set).
      num_probes: Hutchinson probes for the trace (None: exact, P matvecs).
      chunk_size: examples per chunk.
      probe_chunk: basis vectors / probes per batched matvec.
    """
    factors = kfac_factors(objective, params, batch, activation=activation, chunk_size=chunk_size)
    inv_sqrt = kfac_fisher_inverse_sqrt(factors, damping=damping, pinv=pinv, rcond=rcond)
    hvp = operators.hessian(objective, params, batch, chunk_size=chunk_size)
    key = jax.random.PRNGKey(0) if key is None else key
    lanczos_key, trace_key = jax.random.split(key)
    trace = riemannian_trace(
        hvp,
        inv_sqrt,
        params,
        key=None if num_probes is None else trace_key,
        num_probes=num_probes,
        probe_chunk=probe_chunk,
    )
    eig = linalg.lanczos_top_k(
        _whitened(hvp, inv_sqrt), params, k=1, num_iters=num_iters, key=lanczos_key, tol=tol
    )
    return KFACRiemannianSharpness(
        trace.value,
        trace.stderr,
        eig.values[0],
        jnp.asarray(damping, _flat_dtype(params)),
        trace.num_probes,
    )


# ------------------------------------------------------------- reparametrisations


def _check_alphas(alphas: jax.Array, num_layers: int) -> None:
    val = _concrete(alphas)
    if val is None:
        return
    if not np.all(np.isfinite(val)) or np.any(val <= 0):
        raise ValueError(f"layer scales must be finite and > 0, got {val}")
    tol = 100 * num_layers * float(np.finfo(val.dtype).eps)
    if abs(float(np.sum(np.log(val)))) > tol:
        raise ValueError(
            f"the layer scales must multiply to 1 for the function to be preserved; their "
            f"product is {float(np.prod(val))!r}"
        )


def rescale_layers(
    params: PyTree, alphas: Sequence[float] | jax.Array, *, activation: str
) -> PyTree:
    """Per-layer rescaling of a positively homogeneous MLP; the function is unchanged.

    kernel_l → α_l kernel_l and bias_l → (Π_{m ≤ l} α_m) bias_l, with α_l > 0 and
    Π_l α_l = 1. Then s_l → (Π_{m≤l} α_m) s_l for every layer and the outputs are unchanged
    for σ(cz) = c σ(z). The familiar pair form "layer l's kernel and bias × α, the next
    layer's kernel × 1/α" is ``alphas = (1, …, α, 1/α, …, 1)``. Linear in θ: θ' = T θ with T
    diagonal.

    Args:
      params: MLP layout.
      alphas: one positive scale per Dense layer, product 1 (checked when concrete).
      activation: the hidden activation, one of relu, leaky_relu, linear, identity.

    Returns:
      New params of the same layout.

    Raises:
      ValueError: wrong number of scales, non-positive scales, product ≠ 1, a
        non-homogeneous activation or a bad layout.
    """
    _check_homogeneous(activation)
    layers, names, rewrap = _mlp_layers(params)
    dtype = layers[names[0]]["kernel"].dtype
    alphas = jnp.asarray(alphas, dtype)
    if alphas.shape != (len(names),):
        raise ValueError(f"need one scale per layer ({len(names)}), got shape {alphas.shape}")
    _check_alphas(alphas, len(names))
    cumulative = jnp.cumprod(alphas)
    out = {}
    for i, name in enumerate(names):
        layer = layers[name]
        new = {"kernel": layer["kernel"] * alphas[i]}
        if "bias" in layer:
            new["bias"] = layer["bias"] * cumulative[i]
        out[name] = {key: new[key] for key in layer}
    return rewrap(out)


def random_rescale_layers(
    key: jax.Array, params: PyTree, *, activation: str, log_std: float = 1.0
) -> PyTree:
    """:func:`rescale_layers` with α_l = exp(log_std · (z_l − z̄)), z ∼ N(0, I) (product 1)."""
    _check_positive("log_std", log_std)
    _, names, _ = _mlp_layers(params)
    dtype = _flat_dtype(params)
    z = jax.random.normal(key, (len(names),), dtype)
    return rescale_layers(params, jnp.exp(log_std * (z - jnp.mean(z))), activation=activation)


def _hidden_names(names: list[str], given: Mapping, what: str) -> None:
    hidden = names[:-1]
    bad = [name for name in given if name not in hidden]
    if bad:
        raise ValueError(
            f"{what} apply to hidden layers {hidden} (the output layer has no symmetry), got {bad}"
        )


def _check_unit_scales(c: jax.Array, shape: tuple[int, ...], name: str) -> None:
    if c.shape != shape:
        raise ValueError(f"unit scales of {name} must have shape {shape}, got {c.shape}")
    val = _concrete(c)
    if val is not None and (not np.all(np.isfinite(val)) or np.any(val <= 0)):
        raise ValueError(f"unit scales of {name} must be finite and > 0")


def rescale_units(
    params: PyTree, scales: Mapping[str, jax.Array] | jax.Array, *, activation: str
) -> PyTree:
    """Per-unit rescaling of hidden units; the function is unchanged.

    MLP layout: for each hidden layer l named in ``scales`` with c = scales[l] (shape
    ``(d_out,)``, c_j > 0): column j of kernel_l and bias_l[j] × c_j, row j of kernel_{l+1}
    × 1/c_j. Needs σ homogeneous of degree 1 (relu, leaky_relu, linear, identity).

    Shallow layout (:mod:`sharpness_jax.shallow`): ``scales`` is ``(m,)``, and
    (w_i, b_i, a_i) → (c_i w_i, c_i b_i, c_i^{-k} a_i) with k the activation's degree of
    homogeneity (``shallow.HOMOGENEITY``: relu / leaky_relu 1, quadratic 2).

    Raises:
      ValueError: non-positive scales, wrong shapes, the output layer, a non-homogeneous
        activation or a bad layout.
    """
    if _is_shallow(params):
        degree = shallow.HOMOGENEITY.get(activation) if isinstance(activation, str) else None
        if degree is None:
            raise ValueError(
                f"shallow nets have a rescaling symmetry only for homogeneous activations "
                f"{[a for a, k in shallow.HOMOGENEITY.items() if k]}, got {activation!r}"
            )
        c = jnp.asarray(scales, params["w"].dtype)
        _check_unit_scales(c, (params["w"].shape[0],), "the shallow net")
        new = {"w": params["w"] * c[:, None], "a": params["a"] * jnp.power(c, -degree)[:, None]}
        if "b" in params:
            new["b"] = params["b"] * c
        return {key: new[key] for key in params}
    _check_homogeneous(activation)
    layers, names, rewrap = _mlp_layers(params)
    if not isinstance(scales, Mapping):
        raise TypeError("for the MLP layout, scales maps hidden layer names to (d_out,) arrays")
    _hidden_names(names, scales, "unit scales")
    cols = {}
    for name, c in scales.items():
        c = jnp.asarray(c, layers[name]["kernel"].dtype)
        _check_unit_scales(c, (layers[name]["kernel"].shape[1],), name)
        cols[name] = c
    out = {}
    for i, name in enumerate(names):
        layer = layers[name]
        kernel = layer["kernel"]
        new = {}
        if i > 0 and names[i - 1] in cols:
            kernel = kernel / cols[names[i - 1]][:, None]
        if name in cols:
            kernel = kernel * cols[name][None, :]
        new["kernel"] = kernel
        if "bias" in layer:
            new["bias"] = layer["bias"] * cols[name] if name in cols else layer["bias"]
        out[name] = {key: new[key] for key in layer}
    return rewrap(out)


def random_rescale_units(
    key: jax.Array, params: PyTree, *, activation: str, log_std: float = 1.0
) -> PyTree:
    """:func:`rescale_units` of every hidden unit with c_j = exp(log_std · z_j), z ∼ N(0, 1)."""
    _check_positive("log_std", log_std)
    dtype = _flat_dtype(params)
    if _is_shallow(params):
        z = jax.random.normal(key, (params["w"].shape[0],), dtype)
        return rescale_units(params, jnp.exp(log_std * z), activation=activation)
    layers, names, _ = _mlp_layers(params)
    keys = jax.random.split(key, max(len(names) - 1, 1))
    scales = {
        name: jnp.exp(log_std * jax.random.normal(k, (layers[name]["kernel"].shape[1],), dtype))
        for name, k in zip(names[:-1], keys, strict=False)
    }
    return rescale_units(params, scales, activation=activation)


def _check_permutation(perm: jax.Array, size: int, name: str) -> jax.Array:
    perm = jnp.asarray(perm)
    if perm.shape != (size,) or not jnp.issubdtype(perm.dtype, jnp.integer):
        raise ValueError(
            f"the permutation of {name} must be ({size},) integers, got {perm.shape} {perm.dtype}"
        )
    val = _concrete(perm)
    if val is not None and not np.array_equal(np.sort(val), np.arange(size)):
        raise ValueError(f"the permutation of {name} is not a permutation of 0 … {size - 1}")
    return perm


def permute_units(params: PyTree, permutations: Mapping[str, jax.Array] | jax.Array) -> PyTree:
    """Permutes hidden units; the function is unchanged for any elementwise activation.

    MLP layout: for each hidden layer l named in ``permutations`` with π = permutations[l]:
    new unit j is old unit π_j, kernel_l → kernel_l[:, π], bias_l → bias_l[π],
    kernel_{l+1} → kernel_{l+1}[π, :]. Shallow layout: ``permutations`` is ``(m,)`` and the
    rows of w, b, a are permuted.

    Raises:
      ValueError: not a permutation, the output layer, or a bad layout.
    """
    if _is_shallow(params):
        perm = _check_permutation(permutations, params["w"].shape[0], "the shallow net")
        return {key: value[perm] for key, value in params.items()}
    layers, names, rewrap = _mlp_layers(params)
    if not isinstance(permutations, Mapping):
        raise TypeError("for the MLP layout, permutations maps hidden layer names to (d_out,) ints")
    _hidden_names(names, permutations, "permutations")
    perms = {
        name: _check_permutation(p, layers[name]["kernel"].shape[1], name)
        for name, p in permutations.items()
    }
    out = {}
    for i, name in enumerate(names):
        layer = layers[name]
        kernel = layer["kernel"]
        if i > 0 and names[i - 1] in perms:
            kernel = kernel[perms[names[i - 1]], :]
        new = {"kernel": kernel[:, perms[name]] if name in perms else kernel}
        if "bias" in layer:
            new["bias"] = layer["bias"][perms[name]] if name in perms else layer["bias"]
        out[name] = {key: new[key] for key in layer}
    return rewrap(out)


def random_permute_units(key: jax.Array, params: PyTree) -> PyTree:
    """:func:`permute_units` with a uniformly random permutation of every hidden layer."""
    if _is_shallow(params):
        return permute_units(params, jax.random.permutation(key, params["w"].shape[0]))
    layers, names, _ = _mlp_layers(params)
    keys = jax.random.split(key, max(len(names) - 1, 1))
    perms = {
        name: jax.random.permutation(k, layers[name]["kernel"].shape[1])
        for name, k in zip(names[:-1], keys, strict=False)
    }
    return permute_units(params, perms)


def linear_gauge(params: PyTree, matrix: jax.Array) -> PyTree:
    """Dense gauge of a two-layer LINEAR network; the function is unchanged.

    For f(x) = (x W1 + b1) W2 + b2 (kernel convention, W1: (d, h), W2: (h, K)) and an
    invertible A (h × h): W1 → W1 A, b1 → b1 A, W2 → A⁻¹ W2, b2 unchanged. (In the (out, in)
    weight convention this is W1 → Aᵀ W1, W2 → W2 A⁻ᵀ.) Only for networks without an
    activation between the two layers.

    Args:
      params: MLP layout with exactly the layers Dense_0 and Dense_1.
      matrix: A, ``(h, h)``, invertible (checked when concrete).

    Raises:
      ValueError: a layout with other than two layers, a wrong shape or a singular A.
    """
    layers, names, rewrap = _mlp_layers(params)
    if len(names) != 2:
        raise ValueError(f"the linear gauge needs a two-layer network, got layers {names}")
    first, second = layers["Dense_0"], layers["Dense_1"]
    h = first["kernel"].shape[1]
    a = jnp.asarray(matrix, first["kernel"].dtype)
    if a.shape != (h, h):
        raise ValueError(f"the gauge matrix must be ({h}, {h}), got {a.shape}")
    val = _concrete(a)
    if val is not None:
        cond = np.linalg.cond(val) if np.all(np.isfinite(val)) else np.inf
        if not cond < 1 / (h * np.finfo(val.dtype).eps):
            raise ValueError(f"the gauge matrix must be invertible; its condition number is {cond}")
    new0 = {"kernel": first["kernel"] @ a}
    if "bias" in first:
        new0["bias"] = first["bias"] @ a
    new1 = {"kernel": jnp.linalg.solve(a, second["kernel"])}
    if "bias" in second:
        new1["bias"] = second["bias"]
    return rewrap(
        {
            "Dense_0": {key: new0[key] for key in first},
            "Dense_1": {key: new1[key] for key in second},
        }
    )


def random_linear_gauge(key: jax.Array, params: PyTree, *, log_std: float = 0.5) -> PyTree:
    """:func:`linear_gauge` with A = Q1 diag(exp(log_std · z)) Q2, Q1, Q2 random orthogonal
    (QR of Gaussian matrices), z ∼ N(0, I): condition number ≈ exp(log_std · range(z))."""
    _check_positive("log_std", log_std)
    layers, names, _ = _mlp_layers(params)
    if len(names) != 2:
        raise ValueError(f"the linear gauge needs a two-layer network, got layers {names}")
    h = layers["Dense_0"]["kernel"].shape[1]
    dtype = layers["Dense_0"]["kernel"].dtype
    k1, k2, k3 = jax.random.split(key, 3)
    q1 = jnp.linalg.qr(jax.random.normal(k1, (h, h), dtype))[0]
    q2 = jnp.linalg.qr(jax.random.normal(k2, (h, h), dtype))[0]
    s = jnp.exp(log_std * jax.random.normal(k3, (h,), dtype))
    return linear_gauge(params, (q1 * s[None, :]) @ q2)


# ---------------------------------------------------------------------------- PAC-Bayes


def fisher_posterior_kl(
    params: PyTree,
    fisher_eigenvalues: PyTree,
    *,
    rho: float,
    prior_variance: float,
    damping: float = 0.0,
    prior_mean: PyTree | None = None,
) -> jax.Array:
    """KL(N(θ, ρ (F + εI)⁻¹) ‖ N(μ, σ_p² I)) in closed form.

    With λ_i the eigenvalues of F (for a diagonal F, its diagonal entries) and
    r_i = ρ / (σ_p² (λ_i + ε)) the posterior-to-prior variance ratios,

        KL = ½ [ Σ_i r_i − P − Σ_i ln r_i + ‖θ − μ‖² / σ_p² ].

    It is +∞ when some λ_i + ε ≤ 0 (the posterior covariance does not exist).

    Args:
      params: the posterior mean θ.
      fisher_eigenvalues: the P eigenvalues of F as a flat array, or a pytree of a diagonal
        F's entries (anything that ravels to P numbers).
      rho: ρ > 0, the posterior scale.
      prior_variance: σ_p² > 0.
      damping: ε ≥ 0.
      prior_mean: μ, a pytree like ``params`` (default 0).
    """
    _check_positive("rho", rho)
    _check_positive("prior_variance", prior_variance)
    _check_nonnegative("damping", damping)
    theta = ravel_pytree(params)[0]
    lam = ravel_pytree(fisher_eigenvalues)[0].astype(theta.dtype)
    if lam.shape != theta.shape:
        raise ValueError(f"need P={theta.size} Fisher eigenvalues, got {lam.size}")
    if prior_mean is not None:
        checks.check_vector(prior_mean, params, name="prior_mean")
        theta = theta - ravel_pytree(prior_mean)[0]
    lam = lam + damping
    ok = jnp.all(lam > 0)
    ratio = rho / (prior_variance * jnp.where(lam > 0, lam, 1))
    kl = 0.5 * (
        jnp.sum(ratio) - theta.size - jnp.sum(jnp.log(ratio)) + jnp.sum(theta**2) / prior_variance
    )
    return jnp.where(ok, kl, jnp.inf)


class PacBayesBound(NamedTuple):
    """The terms of L ≤ L̂ + (ρ/2) S_R + sqrt((KL + ln(2√n/δ)) / (2n)).

    Attributes:
      bound: the total.
      empirical_loss: L̂.
      curvature_term: (ρ/2) S_R.
      kl: KL(posterior ‖ prior).
      log_term: ln(2√n/δ).
      complexity_term: sqrt((KL + ln(2√n/δ)) / (2n)).
      sharpness: S_R used.
      rho: ρ.
      damping: ε used for S_R and the KL.
    """

    bound: jax.Array
    empirical_loss: jax.Array
    curvature_term: jax.Array
    kl: jax.Array
    log_term: jax.Array
    complexity_term: jax.Array
    sharpness: jax.Array
    rho: jax.Array
    damping: jax.Array


def _check_bound_args(rho, n, delta) -> None:
    _check_positive("rho", rho)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    val = _concrete(delta)
    if val is not None and (val.ndim != 0 or not 0 < val < 1):
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")


def pac_bayes_bound(
    empirical_loss: jax.Array,
    sharpness: jax.Array,
    kl: jax.Array,
    *,
    rho: float,
    n: int,
    delta: float,
    damping: float = 0.0,
) -> PacBayesBound:
    """PAC-Bayes bound with a Fisher-shaped Gaussian posterior (standard form).

    For the posterior Q = N(θ, ρF⁻¹) and a data-independent prior P, with probability
    ≥ 1 − δ over n examples (McAllester / Maurer form, losses in [0, 1]),

        E_Q[L] ≤ E_Q[L̂] + sqrt((KL(Q‖P) + ln(2√n/δ)) / (2n)),

    and the second-order expansion E_Q[L̂] ≈ L̂(θ) + ½ tr(H ρF⁻¹) = L̂ + (ρ/2) S_R gives

        L ≤ L̂ + (ρ/2) S_R + sqrt((KL + ln(2√n/δ)) / (2n)),

    the form implemented here (S_R = tr(F⁻¹H), or the diagonal Ŝ_R for a diagonal posterior).
    The curvature term is a Taylor approximation, so the total is the bound's standard form
    rather than a certified bound.

    Args:
      empirical_loss: L̂.
      sharpness: S_R computed with the same F (and damping) as the KL.
      kl: KL(Q‖P), e.g. from :func:`fisher_posterior_kl`.
      rho: ρ > 0.
      n: number of training examples, ≥ 1.
      delta: confidence δ ∈ (0, 1).
      damping: ε used for S_R and the KL (recorded in the result).

    Returns:
      :class:`PacBayesBound` with every term.
    """
    _check_bound_args(rho, n, delta)
    empirical_loss = jnp.asarray(empirical_loss)
    dtype = jnp.result_type(empirical_loss)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    empirical_loss = empirical_loss.astype(dtype)
    curvature = 0.5 * rho * jnp.asarray(sharpness, dtype)
    kl = jnp.asarray(kl, dtype)
    log_term = jnp.asarray(math.log(2 * math.sqrt(n)), dtype) - jnp.log(jnp.asarray(delta, dtype))
    complexity = jnp.sqrt((kl + log_term) / (2 * n))
    return PacBayesBound(
        empirical_loss + curvature + complexity,
        empirical_loss,
        curvature,
        kl,
        log_term,
        complexity,
        jnp.asarray(sharpness, dtype),
        jnp.asarray(rho, dtype),
        jnp.asarray(damping, dtype),
    )


def fisher_pac_bayes_bound(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    rho: float,
    prior_variance: float,
    delta: float,
    n: int | None = None,
    metric: str = "diagonal",
    damping: float = 0.0,
    prior_mean: PyTree | None = None,
    chunk_size: int | None = None,
    probe_chunk: int | None = None,
) -> PacBayesBound:
    """:func:`pac_bayes_bound` with every term computed from the model (small P).

    L̂ = ``operators.loss_value`` on ``batch``; posterior N(θ, ρ (F + εI)⁻¹), prior
    N(μ, σ_p² I).

    * ``metric="diagonal"``: F = diag of the empirical Fisher (1/n) Σ_p g_p², S_R = Σ_i H_ii /
      (F_ii + ε) with H's exact diagonal (:func:`diagonal_riemannian_sharpness`).
    * ``metric="full"``: F the dense true Fisher, S_R = tr((F + εI)⁻¹ H) with dense H.

    A zero Fisher eigenvalue with ε = 0 makes the KL infinite (and so the bound).

    Args:
      rho, prior_variance, delta, prior_mean, damping: see :func:`fisher_posterior_kl` and
        :func:`pac_bayes_bound`.
      n: training-set size in the bound (default: the batch size).
      metric: ``"diagonal"`` or ``"full"``.
      chunk_size: examples per chunk.
      probe_chunk: basis vectors per batched matvec.
    """
    if metric not in ("diagonal", "full"):
        raise ValueError(f"metric must be 'diagonal' or 'full', got {metric!r}")
    _, _, n_batch = operators.prepare(objective, params, batch, chunk_size=chunk_size)
    n = n_batch if n is None else n
    _check_bound_args(rho, n, delta)
    _check_positive("prior_variance", prior_variance)
    _check_nonnegative("damping", damping)
    loss = operators.loss_value(objective, params, batch, chunk_size=chunk_size)
    if metric == "diagonal":
        f_diag = empirical_fisher_diagonal(objective, params, batch, chunk_size=chunk_size)
        sharp = diagonal_riemannian_sharpness(
            objective,
            params,
            batch,
            damping=damping,
            chunk_size=chunk_size,
            probe_chunk=probe_chunk,
        ).value
        eigenvalues = f_diag
    else:
        hvp = operators.hessian(objective, params, batch, chunk_size=chunk_size)
        fvp = operators.fisher(objective, params, batch, chunk_size=chunk_size)
        h = linalg.dense(hvp, params, chunk_size=probe_chunk)
        f = linalg.dense(fvp, params, chunk_size=probe_chunk)
        sharp = riemannian_sharpness_from_matrices(h, f, damping=damping).trace
        eigenvalues = jnp.linalg.eigvalsh((f + f.T) / 2)
    kl = fisher_posterior_kl(
        params,
        eigenvalues,
        rho=rho,
        prior_variance=prior_variance,
        damping=damping,
        prior_mean=prior_mean,
    )
    return pac_bayes_bound(loss, sharp, kl, rho=rho, n=n, delta=delta, damping=damping)
