"""SGD-noise covariance C, the per-example Hessian second moment E_p[h_p²], and how they
relate to the Hessian H: commutation, alignment and the power law C_ii ∝ H_ii^γ.

Notation (every matrix is a MEAN over the n examples of the batch):

* g_p = ∇ℓ_p, ḡ = (1/n) Σ_p g_p, ĝ_p = g_p − ḡ; Ĝ is the n × P matrix with rows ĝ_p.
* C = (1/n) Σ_p ĝ_p ĝ_pᵀ = ĜᵀĜ / n, the per-sample gradient covariance (population
  normalisation 1/n, not 1/(n − 1)).
* K = ĜĜᵀ / n, the n × n Gram matrix: it has the nonzero eigenvalues of C, and if K u = λu
  with λ > 0 then v = Ĝᵀu / √(nλ) is a unit eigenvector of C with C v = λ v.
  ‖C‖_F² = ‖K‖_F² = tr(K²).
* h_p = ∇²ℓ_p, H = (1/n) Σ_p h_p, E_p[h_p²] = (1/n) Σ_p h_p h_p.

Exact routes never store all n per-example gradients or any P × P per-example matrix:
per-example gradients are made ``chunk_size`` examples at a time, per-example Hessian rows
h_p e_i ``chunk_size`` examples × ``basis_chunk_size`` basis vectors at a time.

Parameter subsets (one layer). Every function takes ``subset`` and then works with the
objective restricted to that subset (:func:`sharpness_jax.subsets.restrict`), so C, H and
their products are the diagonal blocks C_SS, H_SS. For E_p[h_p²] the block and the square do
not commute: by default (``restricted=True``) the functions compute E_p[(h_p)_SS²], the
second moment of the restricted objective (what ``operators.hessian_second_moment(...,
subset=S)`` applies); with ``restricted=False`` they compute (E_p[h_p²])_SS, the S-block of the
full second moment, whose diagonal is (1/n) Σ_p Σ_j (h_p)_ij² with j over ALL parameters.
The difference is (1/n) Σ_p (h_p)_{S,S̄} (h_p)_{S̄,S} ⪰ 0.

Studied in Zhang, Yang & Tu (2026), "SGD noise vs curvature": C ≈ (σ²/2B) E_p[h_p²], C and
H nearly commute (measured by ‖CH − HC‖_F / ‖CH‖_F against a Haar-random rotation of H), and
C_ii ∝ H_ii^γ with 1 ≤ γ ≤ 2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from sharpness_jax import checks, linalg, operators, subsets
from sharpness_jax.objective import Batch, Objective
from sharpness_jax.per_example import sum_over_chunks

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

__all__ = [
    "Commutation",
    "PowerLawFit",
    "RotationBaseline",
    "alignment",
    "diagonal_power_law",
    "eigenbasis_power_law",
    "fit_power_law",
    "gradient_covariance_dense",
    "gradient_covariance_diagonal",
    "gradient_covariance_frobenius_squared",
    "gradient_covariance_gram",
    "gradient_covariance_quadratic_forms",
    "gradient_covariance_top_k",
    "gradient_covariance_trace",
    "haar_orthogonal",
    "hessian_covariance_trace",
    "hessian_second_moment_dense",
    "hessian_second_moment_diagonal",
    "hessian_second_moment_diagonal_hutchinson",
    "hessian_second_moment_quadratic_forms",
    "hessian_second_moment_top_k",
    "hessian_second_moment_trace",
    "minibatch_noise_covariance",
    "minibatch_noise_scale",
    "noise_curvature_alignment",
    "noise_curvature_commutation",
    "noise_curvature_commutation_estimate",
    "relative_commutator",
    "relative_commutator_estimate",
    "rotation_baseline",
]

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------- helpers


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_optional_chunk(name: str, value: Any) -> None:
    if value is not None:
        _check_positive_int(name, value)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _flat(tree: PyTree) -> jax.Array:
    return ravel_pytree(tree)[0]


def _sq_norm(tree: PyTree) -> jax.Array:
    return sum(jnp.sum(jnp.square(a)) for a in jax.tree_util.tree_leaves(tree))


def _stacked_vectors(vectors: PyTree, template: PyTree) -> tuple[jax.Array, int]:
    """Flattens k stacked vectors (an :class:`linalg.Eigen` or a pytree with a leading axis
    k) into a ``(k, P)`` array, checking their structure against ``template``."""
    if isinstance(vectors, linalg.Eigen):
        vectors = vectors.vectors
    if jax.tree_util.tree_structure(vectors) != jax.tree_util.tree_structure(template):
        raise ValueError(
            "the vectors must have the (restricted) parameters' tree structure with a leading "
            f"axis k; got {jax.tree_util.tree_structure(vectors)}, expected "
            f"{jax.tree_util.tree_structure(template)}"
        )
    leaves = jax.tree_util.tree_leaves(vectors)
    tmpl = jax.tree_util.tree_leaves(template)
    k = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in leaves}
    if len(k) != 1 or None in k:
        raise ValueError("the vectors need one common leading axis k over all leaves")
    for a, t in zip(leaves, tmpl, strict=True):
        if jnp.shape(a)[1:] != jnp.shape(t):
            raise ValueError(
                f"a vector leaf has shape {jnp.shape(a)[1:]}, the parameter has {jnp.shape(t)}"
            )
        if jnp.result_type(a) != jnp.result_type(t):
            raise TypeError(
                f"a vector leaf has dtype {jnp.result_type(a)}, the parameter has "
                f"{jnp.result_type(t)}"
            )
    return jax.vmap(_flat)(vectors), k.pop()


def _centred_grads(objective, params, g_bar_flat, chunk, mask) -> jax.Array:
    """Rows ĝ_p = g_p − ḡ of the chunk as a ``(c, P)`` array; zero on padding."""
    grad = jax.grad(objective.example_loss)
    x, y = chunk
    g = jax.vmap(lambda xp, yp: _flat(grad(params, xp, yp)))(x, y)
    return jnp.where(mask[:, None], g - g_bar_flat[None, :], 0)


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
    if chunk_size is None or chunk_size >= n:
        g = _centred_grads(objective, params, g_bar, batch, jnp.ones((n,), bool))
        return _matmul(g, g.T) / n

    def row_fn(rows, row_mask, row_index):
        g_rows = _centred_grads(objective, params, g_bar, rows, row_mask)

        def col_fn(cols, col_mask, col_index):
            g_cols = _centred_grads(objective, params, g_bar, cols, col_mask)
            block = _matmul(g_rows, g_cols.T)
            strip = jnp.zeros((g_rows.shape[0], n), dtype)
            return strip.at[:, col_index].set(block, mode="drop")

        strip = sum_over_chunks(col_fn, batch, chunk_size=chunk_size)
        return jnp.zeros((n, n), dtype).at[row_index].set(strip, mode="drop")

    return sum_over_chunks(row_fn, batch, chunk_size=chunk_size) / n


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
    _check_positive_int("k", k)
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
    flat_vectors, _ = _stacked_vectors(vectors, params)
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


def minibatch_noise_scale(num_examples: int, batch_size: int, *, replacement: bool) -> float:
    """The factor s with Cov(g_B) = s · C for a mini-batch mean g_B = (1/B) Σ_{p∈B} g_p.

    s = 1/B when the B examples are drawn uniformly with replacement; s = (n − B)/(B(n − 1))
    without replacement (finite-population correction; C uses the 1/n normalisation).

    Raises:
      ValueError: if B < 1, or B > n (or n < 2) without replacement.
    """
    _check_positive_int("num_examples", num_examples)
    _check_positive_int("batch_size", batch_size)
    if replacement:
        return 1.0 / batch_size
    if batch_size > num_examples:
        raise ValueError(
            f"batch_size={batch_size} exceeds n={num_examples}; without replacement B ≤ n"
        )
    if num_examples < 2:
        raise ValueError("sampling without replacement needs n ≥ 2")
    return (num_examples - batch_size) / (batch_size * (num_examples - 1))


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
    :func:`minibatch_noise_scale`. C is :func:`operators.gradient_covariance` (exact).
    """
    n = operators.prepare(objective, params, batch, chunk_size=chunk_size)[2]
    s = minibatch_noise_scale(n, batch_size, replacement=replacement)
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
    """tr(HC) = (1/n) Σ_p (g_p − ḡ)ᵀ H (g_p − ḡ), exactly.

    For each chunk of examples the centred per-example gradients are formed and H is applied
    to each of them (a full-batch Hessian-vector product, itself chunked by ``chunk_size``):
    n Hessian-vector products in all, i.e. about n² per-example HVPs. Memory about
    ``chunk_size`` × (P + the activations of ``chunk_size`` examples).
    """
    objective, params, n, g_bar = _prepare_covariance(objective, params, batch, chunk_size, subset)
    _, unravel = ravel_pytree(params)
    hvp = operators.hessian(objective, params, batch, chunk_size=chunk_size)

    def chunk_fn(chunk, mask, index):
        del index
        g = _centred_grads(objective, params, g_bar, chunk, mask)
        hg = jax.vmap(lambda row: _flat(hvp(unravel(row))))(g)
        return jnp.sum(g * hg)

    return sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size) / n


# --------------------------------------------------------------- second moment E_p[h_p²]


def _row_function(objective, params, batch, chunk_size, subset, restricted):
    """Sets up per-example Hessian rows for the (restricted) parameters.

    Returns ``(row_fn, sub_params, n)``: ``row_fn(sub, x, y)`` is ``(inside, outside)``, the
    per-example gradient in the subset (a pytree like ``sub``) and, when ``restricted`` is
    False, the list of its other leaves (else ``[]``). The JVP of ``row_fn`` along e_i is
    therefore the i-th per-example Hessian row over the rows that count.
    """
    full_objective, full_params = objective, params
    objective, sub, n = operators.prepare(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    if restricted or subset is None:
        grad = jax.grad(objective.example_loss)
        return (lambda q, x, y: (grad(q, x, y), [])), sub, n

    chosen = sorted(sub)
    full_grad = jax.grad(full_objective.example_loss)

    def row_fn(q, x, y):
        g = full_grad(subsets.merge(full_params, q), x, y)
        paths = subsets.leaf_paths(g)
        outside = [
            leaf
            for path, leaf in zip(paths, jax.tree_util.tree_leaves(g), strict=True)
            if path not in sub
        ]
        return subsets.select(g, chosen), outside

    return row_fn, sub, n


def _check_restricted(restricted: Any) -> None:
    if not isinstance(restricted, bool):
        raise TypeError(f"restricted must be a bool, got {restricted!r}")


def _second_moment_row_stats(
    objective,
    params,
    batch,
    *,
    chunk_size,
    basis_chunk_size,
    subset,
    restricted,
    with_hessian_diagonal,
    max_bytes=None,
):
    """diag E_p[h_p²] (and diag H) exactly, from per-example Hessian rows h_p e_i.

    For every chunk of examples and every chunk of basis vectors, the per-example HVPs
    h_p e_i (forward-over-reverse) are formed for all (p, i) pairs at once by a double vmap
    and reduced leaf by leaf to Σ_j (h_p e_i)_j² (and to e_iᵀ h_p e_i); the primal pass does
    not depend on e_i, so it is shared by the basis chunk. Nothing larger than
    chunk_size × basis_chunk_size × P is held.
    """
    _check_restricted(restricted)
    _check_optional_chunk("basis_chunk_size", basis_chunk_size)
    row_fn, sub, n = _row_function(objective, params, batch, chunk_size, subset, restricted)
    flat, unravel = ravel_pytree(sub)
    size, dtype = flat.size, flat.dtype
    full_size = size if restricted or subset is None else subsets.num_params(params)
    examples = n if chunk_size is None else min(chunk_size, n)
    basis = min(size, basis_chunk_size or max(1, min(size, 2**24 // size)))
    checks.check_memory(
        3.0 * examples * basis * full_size * dtype.itemsize,
        max_bytes=max_bytes,
        what=f"per-example Hessian rows of {examples} examples × {basis} basis vectors × "
        f"{full_size:,} parameters at once",
        cheaper="lower chunk_size and basis_chunk_size (memory ~ chunk_size · "
        "basis_chunk_size · P), or use hessian_second_moment_diagonal_hutchinson",
    )

    def chunk_fn(chunk, mask, index):
        del index
        x, y = chunk

        def coordinate(i):
            e = unravel(jax.nn.one_hot(i, size, dtype=dtype))

            def one(xp, yp):
                inside, outside = jax.jvp(lambda q: row_fn(q, xp, yp), (sub,), (e,))[1]
                sq = _sq_norm(inside) + _sq_norm(outside)
                if not with_hessian_diagonal:
                    return sq, jnp.zeros((), dtype)
                return sq, optax.tree.vdot(inside, e)

            sq, diag = jax.vmap(one)(x, y)
            return jnp.sum(jnp.where(mask, sq, 0)), jnp.sum(jnp.where(mask, diag, 0))

        return linalg.basis_map(coordinate, size, basis_chunk_size)

    sq, diag = sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size)
    return unravel(sq / n), unravel(diag / n)


def hessian_second_moment_diagonal(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    basis_chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    restricted: bool = True,
    max_bytes: float | None = None,
) -> PyTree:
    """diag(E_p[h_p²])_i = (1/n) Σ_p Σ_j (h_p)_ij² = (1/n) Σ_p ‖h_p e_i‖², exactly.

    Streams per-example Hessian rows: for each chunk of ``chunk_size`` examples and each
    chunk of ``basis_chunk_size`` basis vectors e_i, the n·P per-example HVPs h_p e_i are
    evaluated together (vmap over examples × basis vectors) and reduced to their squared
    norms at once; no P × P matrix is formed. Cost: n·P per-example HVPs, i.e. O(n·P²);
    memory ~ chunk_size · basis_chunk_size · P. Chunks with chunk_size · basis_chunk_size of
    a few hundred work well on CPU: a tanh MLP 784-12-10 (P = 9,550) on n = 1,000 examples in
    float32 takes about 30 s on 2 CPU cores with ``chunk_size=25, basis_chunk_size=8``.

    Args:
      chunk_size: examples per chunk (None: all).
      basis_chunk_size: basis vectors per chunk (None: min(P, 2²⁴/P) at a time).
      subset: restrict to these parameters.
      restricted: with a subset, True computes the diagonal of E_p[(h_p)_SS²] (the second
        moment of the restricted objective, j ∈ S); False the diagonal of the S-block of the
        full E_p[h_p²] (j over all parameters). See the module docstring.
      max_bytes: refuse (MemoryError, naming the cheaper routes) when the rows held at once
        would exceed this (default ``checks.MEMORY_LIMIT_BYTES``).

    Returns:
      A pytree like the (restricted) params.
    """
    return _second_moment_row_stats(
        objective,
        params,
        batch,
        chunk_size=chunk_size,
        basis_chunk_size=basis_chunk_size,
        subset=subset,
        restricted=restricted,
        with_hessian_diagonal=False,
        max_bytes=max_bytes,
    )[0]


def hessian_second_moment_trace(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    basis_chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    restricted: bool = True,
    max_bytes: float | None = None,
) -> jax.Array:
    """tr(E_p[h_p²]) = (1/n) Σ_p ‖h_p‖_F², exactly (the sum of the exact diagonal)."""
    diag = hessian_second_moment_diagonal(
        objective,
        params,
        batch,
        chunk_size=chunk_size,
        basis_chunk_size=basis_chunk_size,
        subset=subset,
        restricted=restricted,
        max_bytes=max_bytes,
    )
    return sum(jnp.sum(d) for d in jax.tree_util.tree_leaves(diag))


def _second_moment_operator(objective, params, batch, chunk_size, subset, restricted):
    """``(matvec, template)`` of E_p[(h_p)_SS²] (restricted) or (E_p[h_p²])_SS."""
    _check_restricted(restricted)
    if restricted or subset is None:
        _, sub, _ = operators.prepare(
            objective, params, batch, chunk_size=chunk_size, subset=subset
        )
        return (
            operators.hessian_second_moment(
                objective, params, batch, chunk_size=chunk_size, subset=subset
            ),
            sub,
        )
    full = operators.hessian_second_moment(objective, params, batch, chunk_size=chunk_size)
    sub = subsets.select(params, subset)
    paths = sorted(sub)

    def matvec(v):
        return subsets.select(full(subsets.embed(v, params)), paths)

    return matvec, sub


def hessian_second_moment_dense(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    basis_chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    restricted: bool = True,
) -> jax.Array:
    """The P × P matrix E_p[h_p²] (flat basis) by :func:`linalg.dense`, for small P.

    ``restricted`` as in :func:`hessian_second_moment_diagonal`.
    """
    matvec, template = _second_moment_operator(
        objective, params, batch, chunk_size, subset, restricted
    )
    return linalg.dense(matvec, template, chunk_size=basis_chunk_size)


def hessian_second_moment_top_k(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    k: int,
    num_iters: int = 50,
    key: jax.Array | None = None,
    tol: float | None = None,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    restricted: bool = True,
) -> linalg.Eigen:
    """Top-k eigenpairs of E_p[h_p²] by :func:`linalg.lanczos_top_k` on its exact matvec.

    ``restricted`` as in :func:`hessian_second_moment_diagonal`.
    """
    matvec, template = _second_moment_operator(
        objective, params, batch, chunk_size, subset, restricted
    )
    return linalg.lanczos_top_k(matvec, template, k=k, num_iters=num_iters, key=key, tol=tol)


def hessian_second_moment_quadratic_forms(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    vectors: PyTree,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    restricted: bool = True,
) -> jax.Array:
    """v_iᵀ E_p[h_p²] v_i = (1/n) Σ_p ‖h_p v_i‖² for k vectors at once, exactly.

    Args:
      vectors: an :class:`linalg.Eigen` or a pytree like the (restricted) params with a
        leading axis k.
      restricted: as in :func:`hessian_second_moment_diagonal` (False: ‖h_p v‖² over all
        rows, i.e. vᵀ(E_p[h_p²])_SS v).

    Returns:
      ``(k,)`` array.
    """
    _check_restricted(restricted)
    row_fn, sub, n = _row_function(objective, params, batch, chunk_size, subset, restricted)
    flat_vectors, _ = _stacked_vectors(vectors, sub)
    _, unravel = ravel_pytree(sub)

    def chunk_fn(chunk, mask, index):
        del index
        x, y = chunk

        def one_vector(v):
            def one(xp, yp):
                return _sq_norm(jax.jvp(lambda q: row_fn(q, xp, yp), (sub,), (unravel(v),))[1])

            return jnp.sum(jnp.where(mask, jax.vmap(one)(x, y), 0))

        return jax.vmap(one_vector)(flat_vectors)

    return sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size) / n


def hessian_second_moment_diagonal_hutchinson(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    key: jax.Array,
    num_probes: int,
    probe_chunk: int | None = None,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    restricted: bool = True,
) -> linalg.Estimate:
    """Hutchinson estimate of diag(E_p[h_p²]) for large P.

    For Rademacher z, E_z[(h z)_i²] = Σ_j h_ij², so each probe gives the unbiased sample
    d(z) = (1/n) Σ_p (h_p z) ⊙ (h_p z) (one per-example HVP per example; the same z for all
    examples). The estimate is the mean of d over ``num_probes`` probes and its standard
    error is the sample standard deviation / √num_probes, per coordinate.

    Args:
      key: PRNG key for the probes.
      num_probes: number of probes m (m ≥ 2 for a finite standard error).
      probe_chunk: probes evaluated together (bounds memory; default all).
      restricted: as in :func:`hessian_second_moment_diagonal` (False: z runs over all
        parameters and the subset's entries of (h_p z)² are kept).

    Returns:
      :class:`linalg.Estimate` whose value and stderr are pytrees like the (restricted) params.
    """
    _check_restricted(restricted)
    _check_positive_int("num_probes", num_probes)
    _check_optional_chunk("probe_chunk", probe_chunk)
    _, sub, n = operators.prepare(objective, params, batch, chunk_size=chunk_size, subset=subset)
    if subset is not None and restricted:
        objective, params = subsets.restrict(objective, params, subset)
    paths = sorted(sub)
    keep_subset = subset is not None and not restricted

    def keep(tree):
        return subsets.select(tree, paths) if keep_subset else tree

    flat, unravel = ravel_pytree(params)
    _, unravel_sub = ravel_pytree(sub)
    grad = jax.grad(objective.example_loss)

    def probe(k):
        z = unravel(jax.random.rademacher(k, flat.shape, flat.dtype))

        def chunk_fn(chunk, mask, index):
            del index
            x, y = chunk

            def one(xp, yp):
                hz = jax.jvp(lambda q: grad(q, xp, yp), (params,), (z,))[1]
                return jnp.square(_flat(keep(hz)))

            sq = jax.vmap(one)(x, y)
            return jnp.sum(jnp.where(mask[:, None], sq, 0), axis=0)

        return sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size) / n

    keys = jax.random.split(key, num_probes)
    samples = jax.lax.map(probe, keys, batch_size=min(probe_chunk or num_probes, num_probes))
    mean = jnp.mean(samples, axis=0)
    if num_probes > 1:
        sem = jnp.std(samples, axis=0, ddof=1) / jnp.sqrt(float(num_probes))
    else:
        sem = jnp.full_like(mean, jnp.inf)
    return linalg.Estimate(unravel_sub(mean), unravel_sub(sem), num_probes)


# ---------------------------------------------------------------------------- commutation


class RotationBaseline(NamedTuple):
    """The relative commutator with B replaced by Q B Qᵀ, Q Haar-random orthogonal.

    Attributes:
      values: ``(R,)`` one value per rotation.
      stderr: ``(R,)`` their standard errors (0 when computed exactly).
      mean: mean over the R rotations.
      std: sample standard deviation over the rotations (ddof = 1; NaN for R = 1).
    """

    values: jax.Array
    stderr: jax.Array
    mean: jax.Array
    std: jax.Array


class Commutation(NamedTuple):
    """‖CH − HC‖_F / ‖CH‖_F and its random-rotation baseline.

    Attributes:
      relative: the relative commutator (an array when exact, an :class:`linalg.Estimate`
        when estimated).
      baseline: :class:`RotationBaseline`, the same with H → Q H Qᵀ.
    """

    relative: Any
    baseline: RotationBaseline


def _check_square(name: str, a: jax.Array) -> None:
    if jnp.ndim(a) != 2 or jnp.shape(a)[0] != jnp.shape(a)[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {jnp.shape(a)}")


def relative_commutator(a: jax.Array, b: jax.Array) -> jax.Array:
    """‖AB − BA‖_F / ‖AB‖_F for dense square matrices (0 iff A and B commute).

    Raises:
      ValueError: if the matrices are not square of one size.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    _check_square("a", a)
    _check_square("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {a.shape} and {b.shape}")
    ab = _matmul(a, b)
    return jnp.linalg.norm(ab - _matmul(b, a)) / jnp.linalg.norm(ab)


def haar_orthogonal(key: jax.Array, size: int, *, dtype=None) -> jax.Array:
    """A Haar-distributed random orthogonal ``size × size`` matrix.

    QR of a standard Gaussian matrix G = QR, then Q·diag(sign(diag R)) (Mezzadri 2007), which
    makes the distribution exactly Haar (plain QR is not, since its sign convention depends on
    G).
    """
    _check_positive_int("size", size)
    g = jax.random.normal(key, (size, size), dtype or jnp.result_type(float))
    q, r = jnp.linalg.qr(g)
    signs = jnp.where(jnp.diagonal(r) < 0, -1, 1).astype(q.dtype)
    return q * signs[None, :]


def _baseline_summary(values: jax.Array, stderr: jax.Array) -> RotationBaseline:
    num = values.shape[0]
    std = jnp.std(values, ddof=1) if num > 1 else jnp.full((), jnp.nan, values.dtype)
    return RotationBaseline(values, stderr, jnp.mean(values), std)


def rotation_baseline(
    a: jax.Array, b: jax.Array, *, key: jax.Array, num_rotations: int = 5
) -> RotationBaseline:
    """‖AB' − B'A‖_F / ‖AB'‖_F for B' = Q B Qᵀ over ``num_rotations`` Haar rotations Q.

    B' has B's spectrum in a random eigenbasis, so this is the commutator to expect when the
    eigenbases of A and B are unrelated.
    """
    _check_positive_int("num_rotations", num_rotations)
    a, b = jnp.asarray(a), jnp.asarray(b)
    _check_square("b", b)

    def one(k):
        q = haar_orthogonal(k, b.shape[0], dtype=b.dtype)
        return relative_commutator(a, _matmul(_matmul(q, b), q.T))

    values = jax.lax.map(one, jax.random.split(key, num_rotations))
    return _baseline_summary(values, jnp.zeros_like(values))


def relative_commutator_estimate(
    a_matvec: MatVec,
    b_matvec: MatVec,
    template: PyTree,
    /,
    *,
    key: jax.Array,
    num_probes: int,
    probe_chunk: int | None = None,
) -> linalg.Estimate:
    """Estimates ‖AB − BA‖_F / ‖AB‖_F from matvecs.

    With Rademacher probes z_j (E zzᵀ = I), α_j = ‖(AB − BA) z_j‖² and β_j = ‖AB z_j‖² are
    unbiased for ‖AB − BA‖_F² and ‖AB‖_F²; both use the same probes (4 matvecs per probe).
    The estimate is ρ̂ = √(ᾱ / β̄) (ratio estimator, bias O(1/m)); its standard error is the
    delta method: SE(ρ̂²)² = (s_α² − 2ρ̂² s_αβ + ρ̂⁴ s_β²) / (m β̄²) with sample (co)variances,
    and SE(ρ̂) = SE(ρ̂²) / (2ρ̂).

    Args:
      a_matvec, b_matvec: the operators.
      template: pytree of the vector space.
      key: PRNG key; num_probes: m (≥ 2 for a finite SE); probe_chunk: probes at a time.

    Returns:
      :class:`linalg.Estimate`.
    """
    _check_positive_int("num_probes", num_probes)
    _check_optional_chunk("probe_chunk", probe_chunk)
    flat, unravel = ravel_pytree(template)

    def probe(k):
        z = unravel(jax.random.rademacher(k, flat.shape, flat.dtype))
        abz = a_matvec(b_matvec(z))
        baz = b_matvec(a_matvec(z))
        return _sq_norm(jax.tree_util.tree_map(jnp.subtract, abz, baz)), _sq_norm(abz)

    keys = jax.random.split(key, num_probes)
    alpha, beta = jax.lax.map(probe, keys, batch_size=min(probe_chunk or num_probes, num_probes))
    return _ratio_estimate(alpha, beta)


def _ratio_estimate(alpha: jax.Array, beta: jax.Array) -> linalg.Estimate:
    """√(mean α / mean β) with a delta-method standard error (see above)."""
    m = alpha.shape[0]
    a_bar, b_bar = jnp.mean(alpha), jnp.mean(beta)
    rho_sq = a_bar / b_bar
    rho = jnp.sqrt(rho_sq)
    if m < 2:
        return linalg.Estimate(rho, jnp.full_like(rho, jnp.inf), m)
    da, db = alpha - a_bar, beta - b_bar
    var_a = jnp.sum(da * da) / (m - 1)
    var_b = jnp.sum(db * db) / (m - 1)
    cov = jnp.sum(da * db) / (m - 1)
    var_ratio = (var_a - 2 * rho_sq * cov + rho_sq**2 * var_b) / (m * b_bar**2)
    se_sq = jnp.sqrt(jnp.maximum(var_ratio, 0))
    positive = rho > 0
    se = jnp.where(positive, se_sq / (2 * jnp.where(positive, rho, 1)), jnp.sqrt(se_sq))
    return linalg.Estimate(rho, se, m)


def _covariance_and_hessian(objective, params, batch, chunk_size, subset):
    c = operators.gradient_covariance(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    h = operators.hessian(objective, params, batch, chunk_size=chunk_size, subset=subset)
    template = operators.prepare(objective, params, batch, chunk_size=chunk_size, subset=subset)[1]
    return c, h, template


def noise_curvature_commutation(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    key: jax.Array,
    num_rotations: int = 5,
    chunk_size: int | None = None,
    basis_chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> Commutation:
    """‖CH − HC‖_F / ‖CH‖_F exactly from dense C and H (small P), with the baseline for H
    replaced by Q H Qᵀ over ``num_rotations`` Haar rotations (:func:`rotation_baseline`).

    C is :func:`gradient_covariance_dense`; H is :func:`linalg.dense` of the exact Hessian
    (``basis_chunk_size`` basis vectors at a time). Memory O(P²).
    """
    _check_positive_int("num_rotations", num_rotations)
    c = gradient_covariance_dense(objective, params, batch, chunk_size=chunk_size, subset=subset)
    _, h_mv, template = _covariance_and_hessian(objective, params, batch, chunk_size, subset)
    h = linalg.dense(h_mv, template, chunk_size=basis_chunk_size)
    return Commutation(
        relative_commutator(c, h),
        rotation_baseline(c, h, key=key, num_rotations=num_rotations),
    )


def noise_curvature_commutation_estimate(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    key: jax.Array,
    num_probes: int,
    num_rotations: int = 0,
    probe_chunk: int | None = None,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> Commutation:
    """‖CH − HC‖_F / ‖CH‖_F estimated from exact C and H matvecs
    (:func:`relative_commutator_estimate`, ratio estimator with a delta-method SE).

    With ``num_rotations`` > 0 the baseline uses H' v = Q H Qᵀ v with a dense Haar Q
    (memory P², so only for moderate P), each with the same number of probes; otherwise the
    baseline arrays are empty.
    """
    if isinstance(num_rotations, bool) or not isinstance(num_rotations, int) or num_rotations < 0:
        raise ValueError(f"num_rotations must be a non-negative int, got {num_rotations!r}")
    c, h, template = _covariance_and_hessian(objective, params, batch, chunk_size, subset)
    key, rot_key = jax.random.split(key)
    kwargs = dict(num_probes=num_probes, probe_chunk=probe_chunk)
    relative = relative_commutator_estimate(c, h, template, key=key, **kwargs)
    if num_rotations == 0:
        empty = jnp.zeros((0,), relative.value.dtype)
        nan = jnp.full((), jnp.nan, relative.value.dtype)
        return Commutation(relative, RotationBaseline(empty, empty, nan, nan))
    flat, unravel = ravel_pytree(template)

    def one(k):
        q_key, probe_key = jax.random.split(k)
        q = haar_orthogonal(q_key, flat.size, dtype=flat.dtype)

        def rotated(v):
            w = unravel(_matmul(q.T, _flat(v)))
            return unravel(_matmul(q, _flat(h(w))))

        est = relative_commutator_estimate(c, rotated, template, key=probe_key, **kwargs)
        return est.value, est.stderr

    values, stderr = jax.lax.map(one, jax.random.split(rot_key, num_rotations))
    return Commutation(relative, _baseline_summary(values, stderr))


# ------------------------------------------------------------------------------ alignment


def alignment(a: jax.Array, b: jax.Array) -> jax.Array:
    """tr(AB) / (‖A‖_F ‖B‖_F) for dense symmetric matrices (the cosine between them)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    _check_square("a", a)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {a.shape} and {b.shape}")
    return jnp.sum(a * b.T) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))


def noise_curvature_alignment(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    key: jax.Array | None = None,
    num_probes: int | None = None,
    chunk_size: int | None = None,
    basis_chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> jax.Array | linalg.Estimate:
    """Noise–Hessian alignment tr(HC) / (‖H‖_F ‖C‖_F), without forming C or H.

    tr(HC) is :func:`hessian_covariance_trace` (exact), ‖C‖_F² = ‖K‖_F² from the Gram matrix
    (exact). ‖H‖_F² is :func:`linalg.frobenius_squared_exact` (P Hessian-vector products,
    ``basis_chunk_size`` at a time) unless ``key`` and ``num_probes`` are given; then it is the
    stochastic :func:`linalg.frobenius_squared` and the result is an :class:`linalg.Estimate`
    with the delta-method SE  SE(a) = a · SE(‖H‖_F²) / (2‖H‖_F²).
    """
    if (key is None) != (num_probes is None):
        raise ValueError("give both key and num_probes (stochastic ‖H‖_F) or neither (exact)")
    trace_hc = hessian_covariance_trace(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    c_fro = jnp.sqrt(
        gradient_covariance_frobenius_squared(
            objective, params, batch, chunk_size=chunk_size, subset=subset
        )
    )
    _, h, template = _covariance_and_hessian(objective, params, batch, chunk_size, subset)
    if key is None:
        h_sq = linalg.frobenius_squared_exact(h, template, chunk_size=basis_chunk_size)
        return trace_hc / (jnp.sqrt(h_sq) * c_fro)
    est = linalg.frobenius_squared(h, template, key=key, num_probes=num_probes)
    value = trace_hc / (jnp.sqrt(est.value) * c_fro)
    return linalg.Estimate(value, jnp.abs(value) * est.stderr / (2 * est.value), num_probes)


# ------------------------------------------------------------------------------ power laws


class PowerLawFit(NamedTuple):
    """Least-squares fit of log y = intercept + γ log x (natural logs) over the pairs with
    x > 0 and y > 0, with a bootstrap confidence interval for γ.

    Attributes:
      gamma: the slope γ.
      intercept: log c in y ≈ c x^γ.
      r2: coefficient of determination of the log-log fit.
      ci_low, ci_high: percentile-bootstrap confidence interval for γ.
      num_used: pairs used in the fit.
      num_excluded: pairs excluded (x or y not a positive finite number).
      num_excluded_x: pairs whose x is not a positive finite number.
      num_excluded_y: pairs whose y is not a positive finite number (a pair may count in both).
    """

    gamma: jax.Array
    intercept: jax.Array
    r2: jax.Array
    ci_low: jax.Array
    ci_high: jax.Array
    num_used: jax.Array
    num_excluded: jax.Array
    num_excluded_x: jax.Array
    num_excluded_y: jax.Array


def _weighted_line(lx, ly, w):
    """Weighted least squares of ly on lx: (slope, intercept, r2)."""
    sw = jnp.sum(w)
    mx, my = jnp.sum(w * lx) / sw, jnp.sum(w * ly) / sw
    dx, dy = lx - mx, ly - my
    sxx, syy, sxy = jnp.sum(w * dx * dx), jnp.sum(w * dy * dy), jnp.sum(w * dx * dy)
    slope = sxy / sxx
    return slope, my - slope * mx, sxy * sxy / (sxx * syy)


def fit_power_law(
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    num_resamples: int = 1000,
    level: float = 0.95,
    resample_chunk: int | None = 256,
) -> PowerLawFit:
    """Fits y ≈ c · x^γ by ordinary least squares on (log x, log y).

    Pairs where x or y is not a positive finite number are excluded and counted. The
    confidence interval is the percentile bootstrap: the used pairs are resampled with
    replacement ``num_resamples`` times, γ refitted on each, and the (1 ∓ level)/2 quantiles
    taken (resamples whose log x are all equal are ignored). With fewer than two distinct
    used x the fit is NaN. Works on any data; jit-compatible.

    Args:
      x, y: 1-D arrays of one shape and floating dtype.
      key: PRNG key for the bootstrap.
      num_resamples: bootstrap resamples (≥ 2).
      level: confidence level in (0, 1).
      resample_chunk: resamples evaluated together (bounds memory; None: all).

    Returns:
      :class:`PowerLawFit`.

    Raises:
      ValueError / TypeError: on bad shapes, dtypes, level or resample count.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D of one shape, got {x.shape} and {y.shape}")
    if x.size < 2:
        raise ValueError(f"a power-law fit needs at least 2 pairs, got {x.size}")
    if not (jnp.issubdtype(x.dtype, jnp.floating) and x.dtype == y.dtype):
        raise TypeError(f"x and y need one floating dtype, got {x.dtype} and {y.dtype}")
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, int) or num_resamples < 2:
        raise ValueError(f"num_resamples must be an int ≥ 2, got {num_resamples!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    _check_optional_chunk("resample_chunk", resample_chunk)

    ok_x = jnp.isfinite(x) & (x > 0)
    ok_y = jnp.isfinite(y) & (y > 0)
    valid = ok_x & ok_y
    size = x.size
    num_used = jnp.sum(valid, dtype=jnp.int32)
    lx = jnp.log(jnp.where(valid, x, 1))
    ly = jnp.log(jnp.where(valid, y, 1))
    gamma, intercept, r2 = _weighted_line(lx, ly, valid.astype(x.dtype))

    order = jnp.argsort(~valid, stable=True)  # the used pairs first
    first = (jnp.arange(size, dtype=jnp.int32) < num_used).astype(x.dtype)

    def resample(k):
        pick = order[jax.random.randint(k, (size,), 0, jnp.maximum(num_used, 1), dtype=jnp.int32)]
        return _weighted_line(lx[pick], ly[pick], first)[0]

    keys = jax.random.split(key, num_resamples)
    batch = num_resamples if resample_chunk is None else min(resample_chunk, num_resamples)
    slopes = jax.lax.map(resample, keys, batch_size=batch)
    slopes = jnp.where(jnp.isfinite(slopes), slopes, jnp.nan)
    lo, hi = jnp.nanquantile(slopes, jnp.array([(1 - level) / 2, (1 + level) / 2], x.dtype))
    return PowerLawFit(
        gamma,
        intercept,
        r2,
        lo,
        hi,
        num_used,
        jnp.int32(size) - num_used,
        jnp.sum(~ok_x, dtype=jnp.int32),
        jnp.sum(~ok_y, dtype=jnp.int32),
    )


_AGAINST = ("covariance", "second_moment")


def _check_against(against: str) -> None:
    if against not in _AGAINST:
        raise ValueError(f"against must be one of {_AGAINST}, got {against!r}")


def diagonal_power_law(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    key: jax.Array,
    against: str = "covariance",
    num_resamples: int = 1000,
    level: float = 0.95,
    chunk_size: int | None = None,
    basis_chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    restricted: bool = True,
) -> PowerLawFit:
    """γ in C_ii ∝ H_ii^γ over the coordinates (or E_p[h_p²]_ii ∝ H_ii^γ), exactly computed
    diagonals fitted by :func:`fit_power_law`.

    Coordinates with H_ii ≤ 0 (or a non-positive C_ii / E_p[h_p²]_ii) are excluded and
    counted.

    Args:
      against: ``"covariance"`` (y = diag C, x = diag H by :func:`linalg.diagonal_exact`,
        P Hessian-vector products) or ``"second_moment"`` (y = diag E_p[h_p²], the
        prediction of the activity–weight duality; x and y from one pass over per-example
        Hessian rows).
      restricted: for ``"second_moment"`` with a subset, see
        :func:`hessian_second_moment_diagonal`.
    """
    _check_against(against)
    if against == "covariance":
        y = gradient_covariance_diagonal(
            objective, params, batch, chunk_size=chunk_size, subset=subset
        )
        _, h, template = _covariance_and_hessian(objective, params, batch, chunk_size, subset)
        x = linalg.diagonal_exact(h, template, chunk_size=basis_chunk_size)
    else:
        y, x = _second_moment_row_stats(
            objective,
            params,
            batch,
            chunk_size=chunk_size,
            basis_chunk_size=basis_chunk_size,
            subset=subset,
            restricted=restricted,
            with_hessian_diagonal=True,
        )
    return fit_power_law(_flat(x), _flat(y), key=key, num_resamples=num_resamples, level=level)


def eigenbasis_power_law(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    key: jax.Array,
    num_eigen: int | None = None,
    eigen: linalg.Eigen | None = None,
    against: str = "covariance",
    num_iters: int | None = None,
    tol: float | None = None,
    num_resamples: int = 1000,
    level: float = 0.95,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    restricted: bool = True,
) -> PowerLawFit:
    """γ in v_iᵀ C v_i ∝ λ_i^γ over the top Hessian eigenpairs (H v_i = λ_i v_i), as in the
    noise–curvature code (per layer: the top eigendirections of one layer's Hessian block).

    The eigenpairs are ``eigen`` if given (eigenpairs of the Hessian of the objective
    restricted to ``subset``, vectors shaped like the sub-params), else the top ``num_eigen`` by
    :func:`linalg.lanczos_top_k` on the exact Hessian (``num_iters`` default
    min(P, 2·num_eigen + 20)). v_iᵀ C v_i is :func:`gradient_covariance_quadratic_forms`, or
    v_iᵀ E_p[h_p²] v_i (:func:`hessian_second_moment_quadratic_forms`) with
    ``against="second_moment"``. Eigenpairs with λ_i ≤ 0 are excluded and counted.
    """
    _check_against(against)
    if (eigen is None) == (num_eigen is None):
        raise ValueError("give exactly one of num_eigen (compute the eigenpairs) and eigen")
    key, lanczos_key = jax.random.split(key)
    if eigen is None:
        _check_positive_int("num_eigen", num_eigen)
        _, h, template = _covariance_and_hessian(objective, params, batch, chunk_size, subset)
        size = sum(a.size for a in jax.tree_util.tree_leaves(template))
        iters = min(size, 2 * num_eigen + 20) if num_iters is None else num_iters
        eigen = linalg.lanczos_top_k(
            h, template, k=num_eigen, num_iters=iters, key=lanczos_key, tol=tol
        )
    if against == "covariance":
        y = gradient_covariance_quadratic_forms(
            objective, params, batch, eigen, chunk_size=chunk_size, subset=subset
        )
    else:
        y = hessian_second_moment_quadratic_forms(
            objective,
            params,
            batch,
            eigen,
            chunk_size=chunk_size,
            subset=subset,
            restricted=restricted,
        )
    return fit_power_law(eigen.values, y, key=key, num_resamples=num_resamples, level=level)
