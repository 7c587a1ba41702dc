"""SGD-noise covariance C of the per-example gradients, exactly: its diagonal, trace, Gram
matrix, Frobenius norm, dense matrix, top eigenpairs and quadratic forms, tr(HC), and the
covariance of a mini-batch gradient.

Notation (every matrix is a MEAN over the n examples of the batch):

* g_p = ∇ℓ_p, ḡ = (1/n) Σ_p g_p, ĝ_p = g_p − ḡ; Ĝ is the n × P matrix with rows ĝ_p.
* C = (1/n) Σ_p ĝ_p ĝ_pᵀ = ĜᵀĜ / n, the per-sample gradient covariance (population
  normalisation 1/n, not 1/(n − 1)).
* K = ĜĜᵀ / n, the n × n Gram matrix: it has the nonzero eigenvalues of C, and if K u = λu
  with λ > 0 then v = Ĝᵀu / √(nλ) is a unit eigenvector of C with C v = λ v.
  ‖C‖_F² = ‖K‖_F² = tr(K²).
* h_p = ∇²ℓ_p, H = (1/n) Σ_p h_p.

Exact routes never store all n per-example gradients: they are made ``chunk_size`` examples
at a time.

Parameter subsets (one layer). Every function takes ``subset`` and then works with the
objective restricted to that subset (:func:`sharpness_jax.subsets.restrict`), so C, H and
their products are the diagonal blocks C_SS, H_SS.

The per-example Hessian second moment E_p[h_p²] is in :mod:`sharpness_jax.second_moment`;
how C, E_p[h_p²] and H relate in :mod:`sharpness_jax.comparisons` (commutation, alignment)
and :mod:`sharpness_jax.power_law` (C_ii ∝ H_ii^γ).

Studied in Zhang, Yang & Tu (2026), "SGD noise vs curvature": C ≈ (σ²/2B) E_p[h_p²], C and
H nearly commute (measured by ‖CH − HC‖_F / ‖CH‖_F against a Haar-random rotation of H), and
C_ii ∝ H_ii^γ with 1 ≤ γ ≤ 2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sharpness_jax import (
    batch_moments,
    checks,
    gradient_gram,
    linalg,
    minibatch,
    operators,
    subsets,
)
from sharpness_jax.objective import Batch, Objective
from sharpness_jax.per_example import sum_over_chunks

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

__all__ = [
    "gradient_covariance_dense",
    "gradient_covariance_diagonal",
    "gradient_covariance_frobenius_squared",
    "gradient_covariance_gram",
    "gradient_covariance_quadratic_forms",
    "gradient_covariance_top_k",
    "gradient_covariance_trace",
    "hessian_covariance_trace",
    "minibatch_noise_covariance",
]

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------- helpers


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _flat(tree: PyTree) -> jax.Array:
    return ravel_pytree(tree)[0]


def _centred_grads(objective, params, g_bar_flat, chunk, mask) -> jax.Array:
    """Rows ĝ_p = g_p − ḡ of the chunk as a ``(c, P)`` array; zero on padding."""
    return gradient_gram.flat_example_grads(objective, params, chunk, mask, g_bar_flat)


def _prepare_covariance(objective, params, batch, chunk_size, subset):
    objective, params, n = operators.prepare(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    g_bar = operators.gradient(objective, params, batch, chunk_size=chunk_size)
    return objective, params, n, _flat(g_bar)


# ----------------------------------------------------------------- gradient covariance C


def gradient_covariance_diagonal(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> PyTree:
    """diag(C), C_ii = (1/n) Σ_p (g_p,i − ḡ_i)², exactly.

    ḡ is computed first, then the centred squares are summed chunk by chunk from per-example
    gradients (``chunk_size`` of them in memory at a time); there is no E[g²] − ḡ²
    cancellation.

    Returns:
      A pytree shaped like ``params`` (or like the subset's ``{path: leaf}`` dict).
    """
    objective, params, n, g_bar = _prepare_covariance(objective, params, batch, chunk_size, subset)
    _, unravel = ravel_pytree(params)

    def chunk_fn(chunk, mask, index):
        del index
        return jnp.sum(jnp.square(_centred_grads(objective, params, g_bar, chunk, mask)), axis=0)

    return unravel(sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size) / n)


def gradient_covariance_trace(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> jax.Array:
    """tr(C) = (1/n) Σ_p ‖g_p − ḡ‖², exactly (the sum of :func:`gradient_covariance_diagonal`)."""
    diag = gradient_covariance_diagonal(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    return sum(jnp.sum(d) for d in jax.tree_util.tree_leaves(diag))


def gradient_covariance_gram(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    max_bytes: float | None = None,
) -> jax.Array:
    """The n × n Gram matrix K = ĜĜᵀ / n, K_pq = (g_p − ḡ)·(g_q − ḡ) / n, exactly.

    K has the nonzero eigenvalues of C (rank ≤ min(n − 1, P)). Built block by block: for each
    chunk of rows, the per-example gradients of every chunk of columns are recomputed, so
    memory is O(n² + chunk_size · P) and the cost is about n² / chunk_size per-example
    gradients (n with ``chunk_size=None``, which holds all n gradients at once).

    Returns:
      ``(n, n)`` array, symmetric positive semi-definite, rows in batch order.

    Raises:
      MemoryError: if n² + chunk_size·P numbers exceed ``max_bytes`` (default
        ``checks.MEMORY_LIMIT_BYTES``).
    """
    objective, params, n, g_bar = _prepare_covariance(objective, params, batch, chunk_size, subset)
    dtype = g_bar.dtype
    rows = n if chunk_size is None else min(chunk_size, n)
    checks.check_memory(
        (3.0 * n * n + 2.0 * rows * g_bar.size) * dtype.itemsize,
        max_bytes=max_bytes,
        what=f"the {n:,} × {n:,} Gram matrix with {rows:,} per-example gradients at once",
        cheaper="use a smaller chunk_size, or the matrix-free route "
        "(gradient_covariance_top_k(method='lanczos'))",
    )
    gram = gradient_gram.blocked_gram(
        lambda chunk, mask: _centred_grads(objective, params, g_bar, chunk, mask),
        lambda g_rows, g_cols: _matmul(g_rows, g_cols.T),
        batch,
        chunk_size=chunk_size,
        dtype=dtype,
    )
    return gram / n


def gradient_covariance_frobenius_squared(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> jax.Array:
    """‖C‖_F² = tr(C²) = ‖K‖_F², exactly, from the Gram matrix (no P × P matrix)."""
    k = gradient_covariance_gram(objective, params, batch, chunk_size=chunk_size, subset=subset)
    return jnp.sum(jnp.square(k))


def gradient_covariance_dense(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    max_bytes: float | None = None,
) -> jax.Array:
    """The P × P matrix C = (1/n) Σ_p ĝ_p ĝ_pᵀ (flat ``ravel_pytree`` basis), for small P.

    Accumulated as Σ_chunks Ĝ_cᵀĜ_c from n per-example gradients (much cheaper than P
    matvecs). Refuses (MemoryError) when the matrix exceeds ``max_bytes`` (default
    ``checks.MEMORY_LIMIT_BYTES``).
    """
    objective, params, n, g_bar = _prepare_covariance(objective, params, batch, chunk_size, subset)
    checks.check_memory(
        2.0 * g_bar.size * g_bar.size * g_bar.dtype.itemsize,
        max_bytes=max_bytes,
        what=f"a dense {g_bar.size:,} × {g_bar.size:,} covariance",
        cheaper="use gradient_covariance_diagonal / _top_k / _quadratic_forms or the "
        "operator gradient_covariance",
    )

    def chunk_fn(chunk, mask, index):
        del index
        g = _centred_grads(objective, params, g_bar, chunk, mask)
        return _matmul(g.T, g)

    return sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size) / n


def _gram_eigen(objective, params, batch, n, g_bar, k, chunk_size, gram):
    """Top-k eigenpairs of C from the Gram matrix K (see :func:`gradient_covariance_top_k`)."""
    _, unravel = ravel_pytree(params)
    vals, vecs = jnp.linalg.eigh(gram)
    vals, vecs = vals[::-1][:k], vecs[:, ::-1][:, :k]
    lam = jnp.maximum(vals, 0)
    # Eigenvalues at rounding level (the null space of K) get zero vectors.
    floor = n * jnp.finfo(gram.dtype).eps * jnp.maximum(lam[0], jnp.finfo(gram.dtype).tiny)

    def chunk_fn(chunk, mask, index):
        g = _centred_grads(objective, params, g_bar, chunk, mask)
        u = jnp.take(vecs, index, axis=0, mode="clip")
        return _matmul(g.T, u)  # (P, k)

    gt_u = sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size)
    positive = lam > floor
    scale = jnp.where(positive, 1 / jnp.sqrt(n * jnp.where(positive, lam, 1)), 0)
    flat_vectors = (gt_u * scale[None, :]).T
    # ‖C v − λv‖ = ‖Ĝᵀ r‖ / √(nλ) with r = K u − λu, and ‖Ĝᵀ r‖² = n rᵀK r.
    r = _matmul(gram, vecs) - vecs * vals[None, :]
    r_k_r = jnp.maximum(jnp.sum(r * _matmul(gram, r), axis=0), 0)
    residuals = jnp.where(positive, jnp.sqrt(r_k_r / jnp.where(positive, lam, 1)), 0)
    return linalg.Eigen(vals, jax.vmap(unravel)(flat_vectors), residuals, jnp.int32(0))


def gradient_covariance_top_k(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    k: int,
    method: str = "gram",
    num_iters: int = 50,
    key: jax.Array | None = None,
    tol: float | None = None,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> linalg.Eigen:
    """Top-k eigenpairs of C.

    ``method="gram"`` (exact): eigh of the n × n Gram matrix K = ĜĜᵀ/n (see
    :func:`gradient_covariance_gram`), K u_i = λ_i u_i, and the eigenvectors of C recovered as
    v_i = Ĝᵀ u_i / √(n λ_i) (one more streamed pass over the per-example gradients).
    Eigenvalues beyond the rank of C (≤ n − 1; numerically, λ ≤ n·eps·λ_1) come with zero
    vectors. The
    residuals are the exact ‖C v_i − λ_i v_i‖ = √(r_iᵀ K r_i / λ_i), r_i = K u_i − λ_i u_i
    (rounding level); ``num_matvecs`` is 0.

    ``method="lanczos"``: :func:`linalg.lanczos_top_k` on the exact C matvec
    (``num_iters``, ``key``, ``tol`` are passed on); suited to n ≫ P.

    Args:
      k: number of eigenpairs, 1 ≤ k ≤ P (and k ≤ n for the Gram route).
      method: ``"gram"`` or ``"lanczos"``.

    Returns:
      :class:`linalg.Eigen`, eigenvalues descending.

    Raises:
      ValueError: on an unknown method or k out of range.
    """
    if method not in ("gram", "lanczos"):
        raise ValueError(f"method must be 'gram' or 'lanczos', got {method!r}")
    checks.check_positive_int("k", k)
    objective, params, n, g_bar = _prepare_covariance(objective, params, batch, chunk_size, subset)
    size = g_bar.size
    if k > size:
        raise ValueError(f"k={k} exceeds the number of parameters P={size}")
    if method == "lanczos":
        matvec = operators.gradient_covariance(objective, params, batch, chunk_size=chunk_size)
        return linalg.lanczos_top_k(matvec, params, k=k, num_iters=num_iters, key=key, tol=tol)
    if k > n:
        raise ValueError(f"k={k} exceeds the number of examples n={n} (the Gram matrix is n × n)")
    gram = gradient_covariance_gram(objective, params, batch, chunk_size=chunk_size)
    return _gram_eigen(objective, params, batch, n, g_bar, k, chunk_size, gram)


def gradient_covariance_quadratic_forms(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    vectors: PyTree,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> jax.Array:
    """v_iᵀ C v_i = (1/n) Σ_p ((g_p − ḡ)·v_i)² for k vectors at once, exactly.

    g_p·v = r_pᵀ (J_p v) is a forward-mode product (r_p = ∇_f ℓ), so one linearisation per
    chunk serves all k vectors.

    Args:
      vectors: an :class:`linalg.Eigen` (e.g. the top Hessian eigenpairs) or a pytree like the
        (restricted) params with a leading axis k.

    Returns:
      ``(k,)`` array.
    """
    objective, params, n, g_bar = _prepare_covariance(objective, params, batch, chunk_size, subset)
    flat_vectors, _ = linalg.flatten_vectors(vectors, params)
    _, unravel = ravel_pytree(params)
    gv = _matmul(flat_vectors, g_bar)

    def chunk_fn(chunk, mask, index):
        del index
        inputs, targets = chunk
        outputs, f_jvp = jax.linearize(lambda p: objective.batch_outputs(p, inputs), params)
        r = objective.output_grads(outputs, targets)
        jv = jax.vmap(lambda v: f_jvp(unravel(v)))(flat_vectors)  # (k, c, K)
        s = jnp.sum(r[None] * jv, axis=-1) - gv[:, None]
        return jnp.sum(jnp.where(mask[None, :], jnp.square(s), 0), axis=1)

    return sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size) / n


def minibatch_noise_covariance(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    batch_size: int,
    replacement: bool = True,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> MatVec:
    """The SGD-noise covariance of a mini-batch gradient of size B, as a matvec.

    Cov(g_B) v = s · C v with s = 1/B (with replacement) or (n − B)/(B(n − 1)) (without); see
    :func:`minibatch.minibatch_noise_scale`. C is :func:`operators.gradient_covariance` (exact).
    """
    n = operators.prepare(objective, params, batch, chunk_size=chunk_size)[2]
    s = minibatch.minibatch_noise_scale(n, batch_size, replacement=replacement)
    cov = operators.gradient_covariance(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    return lambda v: jax.tree_util.tree_map(lambda a: a * s, cov(v))


def hessian_covariance_trace(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> jax.Array:
    """tr(HC) = (1/n) Σ_p (g_p − ḡ)ᵀ H (g_p − ḡ), exactly: the ``trace_hc`` of
    :func:`sharpness_jax.batch_moments.gradient_hessian_moments`.

    H is applied to each centred per-example gradient in turn (a full-batch Hessian-vector
    product, itself chunked by ``chunk_size``): n Hessian-vector products in all, i.e. about
    n² per-example HVPs. Memory about ``chunk_size`` × P plus the activations of
    ``chunk_size`` examples.
    """
    moments = batch_moments.gradient_hessian_moments(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    return moments.trace_hc
