"""Fisher metrics: the exact diagonals of the true and the empirical Fisher.

All metrics are MEANS over the n examples:

=================================  =========================================================
function                           metric
=================================  =========================================================
``operators.fisher``               full true Fisher F = (1/n) Σ_p J_pᵀ B_p B_pᵀ J_p (matvec)
:func:`fisher_diagonal`            diag F = (1/n) Σ_p Σ_k (J_pᵀ B_p e_k)²  (exact, K VJPs)
:func:`empirical_fisher_diagonal`  diag F_emp = (1/n) Σ_p g_p ⊙ g_p  (exact; NOT ḡ ⊙ ḡ)
``kfac.kfac_factors``              K-FAC: per Dense layer F_l ≈ A_l ⊗ G_l (exact factors)
=================================  =========================================================

B_p is the loss's ``output_fisher_factor`` (F_out = B Bᵀ), J_p = ∂f(θ, x_p)/∂θ, g_p = ∇ℓ_p.
For softmax cross-entropy and squared error the true Fisher equals the Gauss–Newton matrix.

:func:`diagonal_inverse_sqrt` turns a diagonal metric into the map v -> (D + εI)^{-1/2} v that
:mod:`sharpness_jax.riemannian` whitens the Hessian with. (The module is not called ``fisher``:
``sharpness_jax.fisher`` is the Fisher operator itself.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sharpness_jax import checks, dense_factors, operators, subsets
from sharpness_jax.objective import Batch, Objective
from sharpness_jax.per_example import sum_examples, sum_over_chunks

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

__all__ = ["diagonal_inverse_sqrt", "empirical_fisher_diagonal", "fisher_diagonal"]


def _example_mean(per_example, objective, params, batch, chunk_size, subset) -> PyTree:
    """(1/n) Σ_p per_example(objective, params, (x_p, y_p)), leaf by leaf, streamed in chunks.

    ``per_example`` gets the validated objective and params (restricted, with ``subset``).
    """
    objective, params, n = operators.prepare(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    total = sum_examples(
        lambda example: per_example(objective, params, example), tuple(batch), chunk_size=chunk_size
    )
    return jax.tree_util.tree_map(lambda a: a / n, total)


def _squared_gradient(objective: Objective, params: PyTree, example) -> PyTree:
    """g_p ⊙ g_p, g_p = ∇θ ℓ_p(θ)."""
    x, y = example
    return jax.tree_util.tree_map(jnp.square, jax.grad(objective.example_loss)(params, x, y))


def _squared_fisher_columns(objective: Objective, params: PyTree, example) -> PyTree:
    """Σ_k (J_pᵀ B_p e_k)² over the K columns of the output Fisher factor B_p."""
    x, _ = example
    f, vjp = jax.vjp(lambda p: objective.predict(p, x), params)
    columns = jax.vmap(lambda u: vjp(u)[0])(
        objective.predictive("output_fisher_factor", "the Fisher diagonal")(f).T
    )
    return jax.tree_util.tree_map(lambda c: jnp.sum(jnp.square(c), axis=0), columns)


def empirical_fisher_diagonal(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    method: str = "auto",
) -> PyTree:
    """diag F_emp = (1/n) Σ_p g_p ⊙ g_p, g_p = ∇θ ℓ_p(θ), exactly.

    The squared PER-EXAMPLE gradients are summed, streamed over chunks of examples; this is
    not the square of the batch gradient ḡ ⊙ ḡ. ``method="factored"`` (taken by ``"auto"``
    when every free leaf is the kernel or bias of a flax ``nn.Dense`` call,
    :func:`sharpness_jax.dense_factors.dense_layout`) forms no per-example gradient: a Dense
    layer applied at one position has g_p,W = a_p δ_pᵀ (input a_p, output-gradient δ_p), so
    Σ_p g_p,W ⊙ g_p,W = Σ_p (a_p ⊙ a_p)(δ_p ⊙ δ_p)ᵀ, one matrix product of squared factors
    after one batched backward pass (about two gradients in all); at T > 1 positions the
    layer's Σ_t a_pt δ_ptᵀ is formed per example of a chunk. ``"per_example"`` squares
    per-example gradients (memory ``chunk_size`` × P).

    Args:
      method: ``"auto"``, ``"factored"`` or ``"per_example"``.

    Returns:
      A pytree like ``params`` (or the subset's ``{path: leaf}`` dict).

    Raises:
      ValueError: on an unknown method, or ``"factored"`` where it does not apply.
    """
    if method not in ("auto", "factored", "per_example"):
        raise ValueError(f"method must be 'auto', 'factored' or 'per_example', got {method!r}")
    if method != "per_example":
        restricted, free, n = operators.prepare(
            objective, params, batch, chunk_size=chunk_size, subset=subset
        )
        example = jax.tree_util.tree_map(lambda a: a[0], Batch(*batch).inputs)
        layout = dense_factors.dense_layout(restricted, free, example)
        if layout.applicable:
            return _factored_squares(restricted, free, Batch(*batch), layout, chunk_size, n)
        if method == "factored":
            raise ValueError(f"the factored Fisher diagonal does not apply: {layout.reason}")
    return _example_mean(_squared_gradient, objective, params, batch, chunk_size, subset)


def _factored_squares(objective, params, batch, layout, chunk_size, n) -> PyTree:
    """(1/n) Σ_p g_p ⊙ g_p from every Dense call's inputs and output-gradients."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    high = jax.lax.Precision.HIGHEST

    def chunk_fn(chunk, mask, index):
        del index
        acts, deltas = dense_factors.layer_signals(objective, params, chunk, mask, layout)
        out = [None] * len(leaves)
        size = mask.shape[0]
        for c, a, d in zip(layout.calls, acts, deltas, strict=True):
            a = jnp.where(mask[:, None, None], a.reshape(size, c.positions, -1), 0)
            d = d.reshape(size, c.positions, -1)  # zero on padding
            if c.kernel is not None:
                if c.positions == 1:
                    sq = jnp.einsum("pd,pm->dm", a[:, 0] ** 2, d[:, 0] ** 2, precision=high)
                else:
                    w = jnp.einsum("ptd,ptm->pdm", a, d, precision=high)
                    sq = jnp.sum(jnp.square(w), axis=0)
                out[c.kernel] = sq.reshape(leaves[c.kernel].shape)
            if c.bias is not None:
                sq = jnp.sum(jnp.square(jnp.sum(d, axis=1)), axis=0)
                out[c.bias] = sq.reshape(leaves[c.bias].shape)
        return [x.astype(leaf.dtype) for x, leaf in zip(out, leaves, strict=True)]

    total = sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size)
    return jax.tree_util.tree_unflatten(treedef, [x / n for x in total])


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
    return _example_mean(_squared_fisher_columns, objective, params, batch, chunk_size, subset)


def diagonal_inverse_sqrt(diagonal: PyTree, *, damping: float = 0.0) -> MatVec:
    """v -> (D + εI)^{-1/2} v for a diagonal metric D (a pytree of its entries).

    Coordinates with D_ii + ε = 0 (possible only with ε = 0) are EXCLUDED: their entry is set
    to 0, i.e. the pseudo-inverse square root, which restricts the problem to the other
    coordinates.

    Args:
      diagonal: D_ii ≥ 0, a pytree shaped like the vectors.
      damping: ε ≥ 0.
    """
    checks.check_nonnegative_scalar("damping", damping)
    scale = jax.tree_util.tree_map(
        lambda d: jnp.where(
            d + damping > 0, 1 / jnp.sqrt(jnp.where(d + damping > 0, d + damping, 1)), 0
        ),
        diagonal,
    )

    def matvec(v):
        return jax.tree_util.tree_map(jnp.multiply, scale, v)

    return matvec
