"""K-FAC: the block-diagonal Kronecker-factored approximation of the true Fisher.

For a flax ``nn.Dense`` call z = a W + b on one example, write its parameters as
W̄ = [kernel; biasᵀ] of shape ``(d_in [+ 1], d_out)`` (bias as the last row) and ā = [a; 1]
(the 1 only when the layer has a bias). The layer's block of the true Fisher
F = (1/n) Σ_p J_pᵀ B_p B_pᵀ J_p (B_p the loss's ``output_fisher_factor``) is, in the row-major
vectorisation of W̄,

    F_ll = (1/n) Σ_p (ā_p ā_pᵀ) ⊗ (Σ_k δ_pk δ_pkᵀ),    δ_pk = (∂f_p/∂z)ᵀ B_p e_k,

and K-FAC replaces the mean of Kronecker products by the Kronecker product of the means,
F_ll ≈ A_l ⊗ G_l with A_l = (1/n) Σ_p ā_p ā_pᵀ and G_l = (1/n) Σ_p Σ_k δ_pk δ_pkᵀ, dropping
the cross-layer blocks. The factors here are exact (no sampled targets): G is E_ŷ[δδᵀ] under
the predictive distribution.

The layer inputs a_p and output-gradients δ_pk come from flax interception of the model's own
forward pass (:func:`sharpness_jax.dense_factors.dense_call_vjp`), so any flax network
qualifies whose free parameters are all kernels and biases of ``nn.Dense`` calls, each layer
called once on one vector per example: any layer names, nested modules, any activations
between the layers. A layer is named by the '/'-path of its parameters in ``params``
(``subsets.leaf_paths`` style, e.g. ``"params/Dense_0"``), whose leaves are ``kernel`` and
optionally ``bias``. Dense calls whose parameters are all frozen (by
``subsets.restrict``) are left out, so a restriction to the Dense layers of any flax model
has K-FAC factors too (:mod:`sharpness_jax.inverse_preconditioners` builds on this).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sharpness_jax import checks, dense_factors, operators, subsets
from sharpness_jax.objective import Batch, Objective
from sharpness_jax.per_example import sum_examples

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

__all__ = [
    "KFACFactor",
    "kfac_factors",
    "kfac_fisher",
    "kfac_fisher_inverse",
    "kfac_fisher_inverse_sqrt",
]


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


def _leaf(name: str, key: str) -> str:
    return f"{name}/{key}" if name else key


def _layers(objective: Objective, params: PyTree, inputs: PyTree):
    """The Dense layout of ``predict`` and ``(call index, layer name)`` of each call with free
    parameters (calls frozen by a subset restriction are skipped), validated."""
    x0 = jax.tree_util.tree_map(lambda a: a[0], inputs)
    layout = dense_factors.dense_layout(objective, params, x0)
    if not layout.applicable:
        raise ValueError(f"K-FAC needs a network of flax Dense layers: {layout.reason}")
    paths = subsets.leaf_paths(params)
    covered = []
    for i, call in enumerate(layout.calls):
        if call.kernel is None and call.bias is None:
            continue  # a layer frozen by a subset restriction
        if call.kernel is None or call.positions != 1:
            raise ValueError(
                "K-FAC needs every Dense call to act on one vector per example with a free "
                f"kernel; a call has input shape {call.input_shape}"
            )
        name = paths[call.kernel].rpartition("/")[0]
        bias_ok = call.bias is None or paths[call.bias] == _leaf(name, "bias")
        if paths[call.kernel] != _leaf(name, "kernel") or not bias_ok:
            raise ValueError(
                f"K-FAC needs each Dense layer's leaves named kernel and bias under one path; "
                f"got {paths[call.kernel]!r}"
                + ("" if call.bias is None else f" and {paths[call.bias]!r}")
            )
        covered.append((i, name))
    return layout, covered


def kfac_factors(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
) -> dict[str, KFACFactor]:
    """K-FAC factors of the true Fisher of a network of Dense layers, exactly (no sampling).

    For every Dense layer l: A_l = (1/n) Σ_p ā_p ā_pᵀ and G_l = (1/n) Σ_p Σ_k δ_pk δ_pkᵀ (see
    :class:`KFACFactor`), so that the layer's Fisher block
    F_ll = (1/n) Σ_p (ā_p ā_pᵀ) ⊗ (Σ_k δ_pk δ_pkᵀ) is approximated by A_l ⊗ G_l. Cross-layer
    blocks are dropped (block-diagonal K-FAC).

    The layer inputs and the output-gradients δ_pk (K VJPs per example, one per column of
    B_p) are captured from ``objective.predict`` itself by flax interception, so the model may
    be any flax network of Dense layers (module docstring). Streamed over chunks of examples.

    Args:
      objective: its ``loss`` must provide ``output_fisher_factor``.
      params: the network's parameters; every leaf is a kernel or a bias of a Dense call.
      batch: the examples.
      chunk_size: examples per chunk.

    Returns:
      ``{layer path: KFACFactor(A, G)}``, e.g. ``{"params/Dense_0": …, "params/Dense_1": …}``.

    Raises:
      ValueError / TypeError: on a bad batch, or a model that is not a network of Dense
        layers acting on one vector per example.
    """
    _, _, n = operators.prepare(objective, params, batch, chunk_size=chunk_size)
    inputs, _ = batch
    layout, covered = _layers(objective, params, inputs)
    names = [name for _, name in covered]
    leaves = jax.tree_util.tree_leaves(params)
    factor = objective.predictive("output_fisher_factor", "K-FAC")

    def one(x):
        f, layer_inputs, vjp = dense_factors.dense_call_vjp(objective, params, x, layout)
        deltas = jax.vmap(vjp)(factor(f).T)  # per layer: (K, d_out)
        out = {}
        for i, name in covered:
            call, h, delta = layout.calls[i], layer_inputs[i], deltas[i]
            h = jnp.reshape(h, (-1,)).astype(leaves[call.kernel].dtype)
            if call.bias is not None:
                h = jnp.concatenate([h, jnp.ones((1,), h.dtype)])
            delta = jnp.reshape(delta, (delta.shape[0], -1))
            out[name] = KFACFactor(jnp.outer(h, h), delta.T @ delta)
        return out

    total = sum_examples(one, inputs, chunk_size=chunk_size)
    return {name: KFACFactor(total[name].A / n, total[name].G / n) for name in names}


def _kfac_apply(factors: Mapping[str, KFACFactor], fn) -> MatVec:
    """v -> per layer, V̄ -> fn(name, V̄) on the stacked W̄ = [kernel; biasᵀ] layout."""
    names = list(factors)

    def matvec(v):
        leaves, treedef = jax.tree_util.tree_flatten(v)
        paths = subsets.leaf_paths(v)
        index = {path: i for i, path in enumerate(paths)}
        covered = [_leaf(name, key) for name in names for key in ("kernel", "bias")]
        if not set(index) <= set(covered) or any(_leaf(n, "kernel") not in index for n in names):
            raise ValueError(
                f"the vector has leaves {paths}, the K-FAC factors are of layers {names}"
            )
        out = list(leaves)
        for name in names:
            k, b = index[_leaf(name, "kernel")], index.get(_leaf(name, "bias"))
            kernel = leaves[k]
            vbar = kernel if b is None else jnp.concatenate([kernel, leaves[b][None, :]])
            a_dim = factors[name].A.shape[0]
            if vbar.shape != (a_dim, factors[name].G.shape[0]):
                raise ValueError(
                    f"layer {name}: the vector block has shape {vbar.shape}, the factors "
                    f"{(a_dim, factors[name].G.shape[0])}"
                )
            r = fn(name, vbar)
            out[k] = r[: kernel.shape[0]]
            if b is not None:
                out[b] = r[kernel.shape[0]]
        return jax.tree_util.tree_unflatten(treedef, out)

    return matvec


def kfac_fisher(factors: Mapping[str, KFACFactor]) -> MatVec:
    """v -> F_KFAC v, blockwise (A_l ⊗ G_l) vec(V̄_l) = vec(A_l V̄_l G_l).

    Vectors have the structure of the params the factors were computed from.
    """
    return _kfac_apply(factors, lambda name, vbar: factors[name].A @ vbar @ factors[name].G)


def _kfac_power(factors, power, damping, pinv, rcond) -> MatVec:
    """v -> (A ⊗ G + εI)^power v per layer from the eigendecompositions of A and G.

    A ⊗ G + εI = (U_A ⊗ U_G) diag(λ_a λ_g + ε) (U_A ⊗ U_G)ᵀ (λ clipped at 0), so the power is
    exact for any damping. With ``pinv`` the eigenvalues μ = λ_a λ_g + ε ≤ rcond · max μ of a
    layer are treated as zero (pseudo-inverse of that block).
    """
    checks.check_nonnegative_scalar("damping", damping)
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
