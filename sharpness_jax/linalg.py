"""Linear algebra on matrix-free symmetric operators ``matvec: pytree -> pytree``.

Pytrees at the boundary: every function takes a ``template`` pytree (usually the params)
that fixes the vector space; flat vectors exist only inside the algorithms.

* Exact: :func:`dense`, :func:`diagonal_exact`, :func:`trace_exact`,
  :func:`frobenius_squared_exact` — one matvec per basis vector, ``chunk_size`` basis
  vectors at a time.
* Eigenvalues: :func:`lanczos_top_k` (partial or full reorthogonalisation, breakdown-safe,
  optional convergence stop, warm start), :func:`power_iteration`, :func:`lobpcg_top_k`.
* Stochastic, each with an explicit key and probe count and a standard error:
  :func:`hutchinson_trace`, :func:`hutchinson_diagonal`, :func:`xtrace`,
  :func:`frobenius_squared` (integrands and samplers from ``matfree.stochtrace``), and the
  spectral density :func:`spectral_density` (stochastic Lanczos quadrature).

Lanczos is written here rather than taken from ``matfree.decomp.tridiag_sym`` because the
latter neither survives a Krylov breakdown (it returns wrong Ritz values once the Krylov space
becomes invariant, which happens for the low-rank C and for small models) nor stops at a
tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from matfree import stochtrace

from sharpness_jax import checks

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

__all__ = [
    "Eigen",
    "Estimate",
    "SpectralDensity",
    "basis_map",
    "dense",
    "diagonal_exact",
    "flatten_operator",
    "frobenius_squared",
    "frobenius_squared_exact",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "lanczos_top_k",
    "lobpcg_top_k",
    "power_iteration",
    "spectral_density",
    "trace_exact",
    "xtrace",
]


class Estimate(NamedTuple):
    """A stochastic estimate: ``value`` ± ``stderr`` (standard error of the mean) from
    ``num_probes`` probe vectors. For diagonals, value and stderr are pytrees."""

    value: Any
    stderr: Any
    num_probes: int


class Eigen(NamedTuple):
    """Top eigenpairs of a symmetric operator.

    Attributes:
      values: ``(k,)`` eigenvalues, descending.
      vectors: pytree like the template with a leading axis k, unit norm.
      residuals: ``(k,)`` residual norms ‖A u − λ u‖ (Lanczos: the exact-arithmetic bound
        |β_m s_mi|; LOBPCG and power iteration: computed).
      num_matvecs: matvecs spent.
    """

    values: jax.Array
    vectors: PyTree
    residuals: jax.Array
    num_matvecs: jax.Array


class SpectralDensity(NamedTuple):
    """A smoothed spectral density ∫ density = 1 (the eigenvalue distribution (1/P) Σ δ_λi
    convolved with a Gaussian of standard deviation ``sigma``)."""

    grid: jax.Array
    density: jax.Array
    sigma: jax.Array
    num_probes: int
    num_iters: int


def flatten_operator(matvec: MatVec, template: PyTree):
    """``(flat_matvec, flat_template, unravel)`` for a pytree operator."""
    flat, unravel = ravel_pytree(template)

    def flat_matvec(x):
        return ravel_pytree(matvec(unravel(x)))[0]

    return flat_matvec, flat, unravel


def _check_template(template: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(template)
    if not leaves:
        raise TypeError("the template pytree is empty")
    dtypes = {jnp.result_type(leaf) for leaf in leaves}
    if len(dtypes) != 1 or not jnp.issubdtype(next(iter(dtypes)), jnp.floating):
        raise TypeError(f"operators need one floating dtype across the template, got {dtypes}")
    return int(sum(jnp.size(leaf) for leaf in leaves))


def _check_reorthogonalisation(value: Any) -> None:
    if value not in REORTHOGONALISATION:
        raise ValueError(f"reorthogonalisation must be one of {REORTHOGONALISATION}, got {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


#: Basis vectors per batched matvec when ``chunk_size`` is None: as many as fit, P at a time,
#: in this many numbers (the batch of one-hot vectors alone is chunk × P numbers).
_AUTO_BASIS_NUMBERS = 2**24


def basis_map(fn, size: int, chunk_size: int | None):
    """``fn(i)`` for i = 0 … size − 1, stacked; ``chunk_size`` indices at a time by
    ``lax.map`` (None: ``min(size, 2**24 // size)`` at a time, so the basis batch stays small).
    """
    idx = jnp.arange(size, dtype=jnp.int32)
    if chunk_size is None:
        chunk_size = max(1, min(size, _AUTO_BASIS_NUMBERS // size))
    _check_positive_int("chunk_size", chunk_size)
    if chunk_size >= size:
        return jax.vmap(fn)(idx)
    return jax.lax.map(fn, idx, batch_size=chunk_size)


def dense(
    matvec: MatVec,
    template: PyTree,
    *,
    chunk_size: int | None = None,
    max_bytes: float | None = None,
) -> jax.Array:
    """The P × P matrix of the operator in the flat (``ravel_pytree``) basis.

    Args:
      matvec: the operator.
      template: a pytree of the vector space (e.g. params).
      chunk_size: basis vectors per batched matvec (bounds the intermediate memory; None:
        automatic, see :func:`basis_map`).
      max_bytes: refuse when the P × P result exceeds this (default
        ``checks.MEMORY_LIMIT_BYTES``).

    Raises:
      MemoryError: when the matrix would not fit, naming the matrix-free routes.
    """
    size = _check_template(template)
    mv, flat, _ = flatten_operator(matvec, template)
    checks.check_memory(
        2.0 * size * size * flat.dtype.itemsize,
        max_bytes=max_bytes,
        what=f"a dense {size:,} × {size:,} matrix",
        cheaper="use the matrix-free routes (lanczos_top_k, hutchinson_trace, "
        "hutchinson_diagonal, xtrace, spectral_density)",
    )
    cols = basis_map(lambda i: mv(jax.nn.one_hot(i, size, dtype=flat.dtype)), size, chunk_size)
    return cols.T


def diagonal_exact(matvec: MatVec, template: PyTree, *, chunk_size: int | None = None) -> PyTree:
    """diag(A) exactly, e_iᵀ A e_i for every basis vector; a pytree like ``template``."""
    size = _check_template(template)
    mv, flat, unravel = flatten_operator(matvec, template)
    diag = basis_map(lambda i: mv(jax.nn.one_hot(i, size, dtype=flat.dtype))[i], size, chunk_size)
    return unravel(diag)


def trace_exact(matvec: MatVec, template: PyTree, *, chunk_size: int | None = None) -> jax.Array:
    """tr(A) = Σ_i e_iᵀ A e_i exactly (P matvecs)."""
    return sum(
        jnp.sum(d)
        for d in jax.tree_util.tree_leaves(diagonal_exact(matvec, template, chunk_size=chunk_size))
    )


def frobenius_squared_exact(
    matvec: MatVec, template: PyTree, *, chunk_size: int | None = None
) -> jax.Array:
    """‖A‖_F² = Σ_i ‖A e_i‖² exactly (P matvecs)."""
    size = _check_template(template)
    mv, flat, _ = flatten_operator(matvec, template)
    sq = basis_map(
        lambda i: jnp.sum(jnp.square(mv(jax.nn.one_hot(i, size, dtype=flat.dtype)))),
        size,
        chunk_size,
    )
    return jnp.sum(sq)


# ----------------------------------------------------------------------------- Lanczos


def _tridiagonal(alpha, beta_off):
    return jnp.diag(alpha) + jnp.diag(beta_off, 1) + jnp.diag(beta_off, -1)


def _ritz(alpha, beta, used):
    """Eigen-decomposition of the leading ``used`` × ``used`` block of the Lanczos matrix.

    Unused rows are decoupled and pushed below every Ritz value (Gershgorin), so the
    descending order puts the real Ritz pairs first. Returns ``(values, S, residuals)`` with
    residual bounds |β_last s_last,i| (exact arithmetic), sorted descending.
    """
    m = alpha.shape[0]
    used = jnp.asarray(used, jnp.int32)
    active = jnp.arange(m, dtype=jnp.int32) < used
    off = jnp.where(jnp.arange(m - 1, dtype=jnp.int32) < used - 1, beta[:-1], 0)
    bound = jnp.max(jnp.where(active, jnp.abs(alpha), 0)) + 2 * jnp.max(jnp.abs(beta)) + 1
    diag = jnp.where(active, alpha, -bound - 1 - jnp.arange(m, dtype=alpha.dtype))
    vals, vecs = jnp.linalg.eigh(_tridiagonal(diag, off))
    order = jnp.argsort(-vals)
    vals, vecs = vals[order], vecs[:, order]
    last = jnp.take(vecs, used - 1, axis=0)
    residuals = jnp.abs(jnp.take(beta, used - 1) * last)
    return vals, vecs, residuals


#: Lanczos vectors per block of the reorthogonalisation (its cost follows the vectors in use).
_ORTHO_BLOCK = 8


def _orthogonalise(w, basis, used):
    """w minus its projection on the first ``used`` rows of ``basis``, twice.

    Only the first ``ceil(used / _ORTHO_BLOCK)`` blocks of rows are visited (``used`` may be
    traced), so the cost grows with the Krylov dimension reached, not with ``num_iters``; rows
    beyond ``used`` are zero, and ``basis`` has a multiple of ``_ORTHO_BLOCK`` rows.
    """
    num_blocks = (used + _ORTHO_BLOCK - 1) // _ORTHO_BLOCK

    def project_out(i, w):
        rows = jax.lax.dynamic_slice_in_dim(basis, i * _ORTHO_BLOCK, _ORTHO_BLOCK, axis=0)
        return w - rows.T @ (rows @ w)

    for _ in range(2):
        w = jax.lax.fori_loop(0, num_blocks, project_out, w)
    return w


#: The ways of keeping the Lanczos vectors orthogonal (see :func:`lanczos_top_k`).
REORTHOGONALISATION = ("partial", "full")


def _omega_step(omega, omega_prev, alpha, beta, a, b_prev, b0, j, eps):
    """Simon's recurrence for the estimated inner products ω_{j+1,k} ≈ q_{j+1}ᵀ q_k, k < j.

    β_j ω_{j+1,k} = β_k ω_{j,k+1} + (α_k − α_j) ω_{j,k} + β_{k−1} ω_{j,k−1} − β_{j−1} ω_{j−1,k}
    plus a rounding term of size ε (β_k + β_j), added with the sign that enlarges |ω|
    (H. D. Simon, Math. Comp. 42, 1984). ``omega``/``omega_prev`` are the rows j and j − 1
    (ω_{j,j} = 1); ``a`` = α_j, ``b_prev`` = β_{j−1}, ``b0`` = ‖w‖ before any
    reorthogonalisation. Entries k ≥ j of the result are left for the caller.
    """
    size = omega.shape[0]
    zero = jnp.zeros((1,), omega.dtype)
    up = jnp.concatenate([omega[1:], zero])  # ω_{j,k+1}
    down = jnp.concatenate([zero, omega[:-1]])  # ω_{j,k−1}
    beta_down = jnp.concatenate([zero, beta[:-1]])  # β_{k−1}
    t = beta * up + (alpha - a) * omega + beta_down * down - b_prev * omega_prev
    t = t + jnp.where(t >= 0, 1, -1) * eps * (beta + b0)
    below = jnp.arange(size, dtype=jnp.int32) < j
    # A zero b0 is a breakdown; the caller then orthogonalises a fresh vector in full.
    return jnp.where(below, t / jnp.where(b0 > 0, b0, 1), 0)


#: A Lanczos basis larger than this grows in two stages (see :func:`_lanczos`).
_FIRST_STAGE_BYTES = 32 * 2**20
#: Fewest vectors in the first stage's basis.
_FIRST_STAGE_MIN_ROWS = 16


def _first_stage_rows(padded, size, itemsize):
    """Rows of the first stage's basis; ``padded`` (one stage) when the whole basis is small."""
    if padded * size * itemsize <= _FIRST_STAGE_BYTES:
        return padded
    fit = _FIRST_STAGE_BYTES // (size * itemsize) // _ORTHO_BLOCK * _ORTHO_BLOCK
    return min(padded, max(_FIRST_STAGE_MIN_ROWS, fit))


def _lanczos(
    mv, v0, *, num_iters, key, k, tol, min_iters=1, reorthogonalisation="partial", num_vectors=0
):
    """Lanczos on the three-term recurrence, kept orthogonal by ``reorthogonalisation``;
    restarts with a random orthogonal vector on breakdown (the Lanczos matrix then gets a zero
    coupling, which is exact).

    "partial": Simon's ω recurrence estimates the loss of orthogonality at O(num_iters)
    scalar cost per step; when an estimate exceeds √ε the new vector and the next one are
    orthogonalised against all previous vectors (twice). The basis then stays orthogonal to
    about √ε (semi-orthogonality), which keeps the Lanczos matrix equal to the projection of
    the operator up to rounding, so Ritz values are as accurate as with full
    reorthogonalisation. "full": every new vector against all previous ones (twice).

    A basis of more than ``_FIRST_STAGE_BYTES`` is grown in two stages: the iteration runs in
    a small basis first and moves to the full one only if it has not converged there. Memory
    is then touched in proportion to the Krylov dimension reached (on CPU every fresh page
    costs a fault, which for a 64-vector basis of a 670k-parameter model takes about 50 ms,
    2.5 gradients); the operator is traced once per stage.

    Returns ``(alpha, beta, used, num_reorthogonalisations, vectors)`` with the top
    ``num_vectors`` Ritz vectors as rows of ``vectors``.
    """
    size = v0.shape[0]
    dtype = v0.dtype
    eps = jnp.finfo(dtype).eps
    full = reorthogonalisation == "full"
    # The local loss of orthogonality |q_{j+1}ᵀ q_j| after one step in floating point.
    psi = jnp.asarray(eps * max(size, 1) ** 0.5, dtype)
    threshold = jnp.sqrt(eps)
    index = jnp.arange(num_iters, dtype=jnp.int32)

    def step(state):
        j, basis, alpha, beta, q, q_prev, omega, omega_prev, force, count, _ = state
        basis = basis.at[j].set(q)
        w = mv(q)
        a = jnp.vdot(q, w)
        b_prev = jnp.where(j > 0, beta[jnp.maximum(j - 1, 0)], 0)
        w = w - a * q - b_prev * q_prev
        b0 = jnp.linalg.norm(w)
        alpha = alpha.at[j].set(a)
        omega_next = _omega_step(omega, omega_prev, alpha, beta, a, b_prev, b0, j, eps)
        lost = (jnp.max(jnp.abs(omega_next)) > threshold) | (b0 <= 0)
        reorth = full | force | lost
        w = jax.lax.cond(reorth, lambda w: _orthogonalise(w, basis, j + 1), lambda w: w, w)
        b = jnp.linalg.norm(w)
        scale = jnp.maximum(jnp.max(jnp.abs(alpha)), jnp.abs(a)) + jnp.max(beta)
        broke = b <= jnp.sqrt(eps) * jnp.maximum(scale, jnp.finfo(dtype).tiny)

        def restart():
            normal = jax.random.normal(jax.random.fold_in(key, j), (size,), dtype)
            fresh = _orthogonalise(normal, basis, j + 1)
            return fresh / jnp.linalg.norm(fresh)

        q_next = jax.lax.cond(broke, restart, lambda: w / jnp.where(broke, 1, b))
        beta = beta.at[j].set(jnp.where(broke, 0, b))
        # After an orthogonalisation against all previous vectors only rounding is left.
        omega_next = jnp.where(reorth | broke, jnp.where(index <= j, psi, 0), omega_next)
        omega_next = jnp.where(index == j, psi, omega_next)
        omega_next = jnp.where(index == j + 1, 1, omega_next)
        converged = jnp.bool_(False)
        if tol is not None:
            vals, _, res = _ritz(alpha, beta, j + 1)
            top = jnp.abs(vals[:k])
            converged = (j + 1 >= max(k, min_iters)) & ~broke & jnp.all(res[:k] <= tol * top)
        # Simon: a vector orthogonalised because the estimate crossed √ε takes the next
        # vector with it (the recurrence couples three consecutive rows).
        force_next = lost & ~force & ~broke
        count = count + reorth.astype(jnp.int32)
        return (
            j + 1,
            basis,
            alpha,
            beta,
            q_next,
            q,
            omega_next,
            omega,
            force_next,
            count,
            converged,
        )

    def run(state, stop):
        return jax.lax.while_loop(lambda s: (s[0] < stop) & ~s[-1], step, state)

    def finish(state):
        used, basis, alpha, beta, *_, count, _ = state
        _, vecs, _ = _ritz(alpha, beta, used)
        return alpha, beta, used, count, _combine(vecs[:, :num_vectors], basis, used)

    padded = -(-num_iters // _ORTHO_BLOCK) * _ORTHO_BLOCK
    rows = _first_stage_rows(padded, size, jnp.dtype(dtype).itemsize)
    init = (
        jnp.int32(0),
        jnp.zeros((rows, size), dtype),
        jnp.zeros((num_iters,), dtype),
        jnp.zeros((num_iters,), dtype),
        v0 / jnp.linalg.norm(v0),
        jnp.zeros_like(v0),
        jnp.zeros((num_iters,), dtype).at[0].set(1),
        jnp.zeros((num_iters,), dtype),
        jnp.bool_(False),
        jnp.int32(0),
        jnp.bool_(False),
    )
    state = run(init, min(rows, num_iters))
    if rows >= num_iters:
        return finish(state)

    def grow(state):
        basis = jnp.zeros((padded, size), dtype).at[:rows].set(state[1])
        return finish(run((state[0], basis, *state[2:]), num_iters))

    return jax.lax.cond(state[-1], finish, grow, state)


def _combine(coefficients, basis, used):
    """``coefficients (m, k)``ᵀ times the first ``used`` rows of ``basis``: (k, size).

    Visits only the blocks of rows in use (``basis`` has a multiple of ``_ORTHO_BLOCK`` rows,
    zero beyond ``used``; coefficients beyond ``used`` are zero), so the cost follows the
    Krylov dimension reached.
    """
    rows = basis.shape[0]
    k = coefficients.shape[1]
    # Coefficients beyond ``used`` are zero; cut or pad them to the basis's rows.
    coefficients = coefficients[:rows]
    coefficients = jnp.pad(coefficients, ((0, rows - coefficients.shape[0]), (0, 0)))
    num_blocks = (used + _ORTHO_BLOCK - 1) // _ORTHO_BLOCK

    def add(i, acc):
        block = jax.lax.dynamic_slice_in_dim(basis, i * _ORTHO_BLOCK, _ORTHO_BLOCK, axis=0)
        c = jax.lax.dynamic_slice_in_dim(coefficients, i * _ORTHO_BLOCK, _ORTHO_BLOCK, axis=0)
        return acc + c.T @ block

    return jax.lax.fori_loop(0, num_blocks, add, jnp.zeros((k, basis.shape[1]), basis.dtype))


def _start_vector(template, flat, key, init):
    """A start vector: the (sum of the normalised) warm-start vectors plus a little noise."""
    noise = jax.random.normal(key, flat.shape, flat.dtype)
    noise = noise / jnp.linalg.norm(noise)
    if init is None:
        return noise
    init_leaves = jax.tree_util.tree_leaves(init)
    tmpl_leaves = jax.tree_util.tree_leaves(template)
    if jax.tree_util.tree_structure(init) != jax.tree_util.tree_structure(template):
        raise ValueError("init must have the template's tree structure")
    if all(a.shape == b.shape for a, b in zip(init_leaves, tmpl_leaves, strict=True)):
        init = jax.tree_util.tree_map(lambda a: a[None], init)
    elif not all(a.shape[1:] == b.shape for a, b in zip(init_leaves, tmpl_leaves, strict=True)):
        raise ValueError("init must be shaped like the template, or stacked along a leading axis")
    rows = jax.vmap(lambda t: ravel_pytree(t)[0])(init).astype(flat.dtype)
    rows = rows / jnp.maximum(
        jnp.linalg.norm(rows, axis=1, keepdims=True), jnp.finfo(flat.dtype).tiny
    )
    v0 = jnp.sum(rows, axis=0)
    return v0 / jnp.maximum(jnp.linalg.norm(v0), jnp.finfo(flat.dtype).tiny) + 1e-3 * noise


def lanczos_top_k(
    matvec: MatVec,
    template: PyTree,
    /,
    *,
    k: int = 1,
    num_iters: int = 50,
    key: jax.Array | None = None,
    init: PyTree | None = None,
    tol: float | None = None,
    min_iters: int = 1,
    reorthogonalisation: str = "partial",
) -> Eigen:
    """Top-k (largest algebraic) eigenpairs of a symmetric operator by Lanczos.

    The Lanczos vectors are kept orthogonal by partial reorthogonalisation (the default) or
    full reorthogonalisation against all previous vectors; restart with a random orthogonal
    vector on breakdown. With ``tol`` the iteration stops as soon as every
    one of the top k Ritz pairs has residual bound |β_m s_mi| ≤ tol · |θ_i|; the eigenvalue
    error is then below about tol² |θ| / gap.

    Args:
      matvec: symmetric operator.
      template: pytree of the vector space.
      k: number of eigenpairs.
      num_iters: maximum Krylov dimension (capped at P).
      key: PRNG key for the start vector (default ``PRNGKey(0)``).
      init: warm start, one vector or k vectors stacked along a leading axis (e.g. the
        previous training step's eigenvectors).
      tol: relative residual tolerance for early stopping (``None``: run all iterations).
      min_iters: never stop before this many matvecs. A warm start that is still nearly an
        eigenvector converges at once, even if another eigenvalue has meanwhile become the
        largest; a few extra iterations (the Lanczos vectors after the first explore the
        random part of the start vector) or k ≥ 2 guard against that.
      reorthogonalisation: ``"partial"`` (default): Simon's recurrence estimates the loss of
        orthogonality for a few scalar operations per step, and a vector is orthogonalised
        against all previous ones only when the estimate exceeds √ε (then the next one as
        well). The basis stays orthogonal to about √ε, which keeps the Ritz values as
        accurate as full reorthogonalisation does (Simon 1984), at a fraction of its cost in
        memory traffic when P is large. ``"full"``: every vector, twice.

    Returns:
      :class:`Eigen` with memory O(num_iters · P).

    Raises:
      ValueError: if k exceeds P or num_iters, or the counts are not positive ints.
    """
    size = _check_template(template)
    _check_positive_int("k", k)
    _check_positive_int("num_iters", num_iters)
    if k > size:
        raise ValueError(f"k={k} exceeds the number of parameters P={size}")
    num_iters = min(num_iters, size)
    if k > num_iters:
        raise ValueError(f"k={k} needs num_iters >= k, got num_iters={num_iters}")
    key = jax.random.PRNGKey(0) if key is None else key
    mv, flat, unravel = flatten_operator(matvec, template)
    start_key, restart_key = jax.random.split(key)
    v0 = _start_vector(template, flat, start_key, init)
    _check_positive_int("min_iters", min_iters)
    _check_reorthogonalisation(reorthogonalisation)
    alpha, beta, used, _, ritz_vectors = _lanczos(
        mv,
        v0,
        num_iters=num_iters,
        key=restart_key,
        k=k,
        tol=tol,
        min_iters=min(min_iters, num_iters),
        reorthogonalisation=reorthogonalisation,
        num_vectors=k,
    )
    vals, _, residuals = _ritz(alpha, beta, used)
    return Eigen(vals[:k], jax.vmap(unravel)(ritz_vectors), residuals[:k], used)


def power_iteration(
    matvec: MatVec,
    template: PyTree,
    /,
    *,
    num_iters: int = 100,
    tol: float = 1e-6,
    key: jax.Array | None = None,
    init: PyTree | None = None,
) -> Eigen:
    """The eigenpair of largest |λ| by power iteration (stops when the Rayleigh quotient
    changes by less than ``tol`` relative). Returns an :class:`Eigen` with k = 1."""
    _check_template(template)
    _check_positive_int("num_iters", num_iters)
    key = jax.random.PRNGKey(0) if key is None else key
    mv, flat, unravel = flatten_operator(matvec, template)
    v0 = _start_vector(template, flat, key, init)
    v0 = v0 / jnp.linalg.norm(v0)

    def cond(state):
        i, _, _, lam, lam_prev = state
        return (i < num_iters) & (jnp.abs(lam - lam_prev) > tol * jnp.abs(lam))

    def step(state):
        i, v, av, lam, _ = state
        v = av / jnp.maximum(jnp.linalg.norm(av), jnp.finfo(av.dtype).tiny)
        av_new = mv(v)
        return i + 1, v, av_new, jnp.vdot(v, av_new), lam

    av0 = mv(v0)
    lam0 = jnp.vdot(v0, av0)
    init_state = (jnp.int32(1), v0, av0, lam0, lam0 + 1 + jnp.abs(lam0))
    iters, v, av, lam, _ = jax.lax.while_loop(cond, step, init_state)
    residual = jnp.linalg.norm(av - lam * v)
    return Eigen(lam[None], jax.vmap(unravel)(v[None]), residual[None], iters)


def lobpcg_top_k(
    matvec: MatVec,
    template: PyTree,
    /,
    *,
    k: int = 1,
    num_iters: int = 100,
    key: jax.Array | None = None,
    init: PyTree | None = None,
    tol: float | None = None,
) -> Eigen:
    """Top-k eigenpairs by LOBPCG (``jax.experimental.sparse.linalg.lobpcg_standard``).

    Needs 5k < P. ``init`` (k stacked vectors) warm-starts the block. Residuals are computed
    with k extra matvecs.
    """
    size = _check_template(template)
    _check_positive_int("k", k)
    _check_positive_int("num_iters", num_iters)
    if not 5 * k < size:
        raise ValueError(f"LOBPCG needs 5k < P; got k={k}, P={size}. Use lanczos_top_k.")
    from jax.experimental.sparse.linalg import lobpcg_standard

    key = jax.random.PRNGKey(0) if key is None else key
    mv, flat, unravel = flatten_operator(matvec, template)
    block = jax.random.normal(key, (size, k), flat.dtype)
    if init is not None:
        rows = jax.vmap(lambda t: ravel_pytree(t)[0])(init).astype(flat.dtype)
        if rows.shape != (k, size):
            raise ValueError(f"init must stack k={k} vectors, got {rows.shape[0]}")
        block = rows.T + 1e-3 * block / jnp.sqrt(size)
    matmat = jax.vmap(mv, in_axes=1, out_axes=1)
    vals, vecs, iters = lobpcg_standard(matmat, block, num_iters, tol)
    order = jnp.argsort(-vals)
    vals, vecs = vals[order], vecs[:, order]
    residuals = jnp.linalg.norm(matmat(vecs) - vecs * vals[None, :], axis=0)
    return Eigen(vals, jax.vmap(unravel)(vecs.T), residuals, (iters + 1) * k)


# -------------------------------------------------------------------- stochastic estimators


def _probe_values(integrand, matvec, template, key, num_probes, probe_chunk, sampler):
    """Per-probe integrand values, ``probe_chunk`` probes at a time; leading axis num_probes."""
    _check_template(template)
    _check_positive_int("num_probes", num_probes)
    chunk = num_probes if probe_chunk is None else min(probe_chunk, num_probes)
    _check_positive_int("probe_chunk", chunk)
    num_chunks = -(-num_probes // chunk)
    draw = sampler(template, num=chunk)
    keys = jax.random.split(key, num_chunks)

    def one_chunk(k):
        return jax.vmap(lambda z: integrand(matvec, z))(draw(k))

    values = jax.lax.map(one_chunk, keys)
    return jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[2:])[:num_probes], values)


def _mean_and_sem(samples):
    m = samples.shape[0]
    mean = jnp.mean(samples, axis=0)
    sem = jnp.std(samples, axis=0, ddof=1) / jnp.sqrt(m) if m > 1 else jnp.full_like(mean, jnp.inf)
    return mean, sem


def hutchinson_trace(
    matvec: MatVec,
    template: PyTree,
    /,
    *,
    key: jax.Array,
    num_probes: int,
    probe_chunk: int | None = None,
) -> Estimate:
    """Hutchinson's tr(A) ≈ (1/m) Σ_j z_jᵀ A z_j with Rademacher z; SE from the m samples.

    Args:
      probe_chunk: probes evaluated together (bounds memory; default all).
    """
    values = _probe_values(
        stochtrace.monte_carlo_trace(),
        matvec,
        template,
        key,
        num_probes,
        probe_chunk,
        stochtrace.sampler_signs,
    )
    mean, sem = _mean_and_sem(values)
    return Estimate(mean, sem, num_probes)


def hutchinson_diagonal(
    matvec: MatVec,
    template: PyTree,
    /,
    *,
    key: jax.Array,
    num_probes: int,
    probe_chunk: int | None = None,
) -> Estimate:
    """Hutchinson's diag(A) ≈ (1/m) Σ_j z_j ⊙ A z_j (Rademacher); value and SE are pytrees."""
    values = _probe_values(
        stochtrace.monte_carlo_diagonal(),
        matvec,
        template,
        key,
        num_probes,
        probe_chunk,
        stochtrace.sampler_signs,
    )
    mean_sem = jax.tree_util.tree_map(_mean_and_sem, values)
    is_pair = lambda x: isinstance(x, tuple)
    mean = jax.tree_util.tree_map(lambda t: t[0], mean_sem, is_leaf=is_pair)
    sem = jax.tree_util.tree_map(lambda t: t[1], mean_sem, is_leaf=is_pair)
    return Estimate(mean, sem, num_probes)


def frobenius_squared(
    matvec: MatVec,
    template: PyTree,
    /,
    *,
    key: jax.Array,
    num_probes: int,
    probe_chunk: int | None = None,
) -> Estimate:
    """‖A‖_F² ≈ (1/m) Σ_j ‖A z_j‖² (Rademacher z, E zzᵀ = I)."""
    values = _probe_values(
        stochtrace.monte_carlo_frobeniusnorm_squared(),
        matvec,
        template,
        key,
        num_probes,
        probe_chunk,
        stochtrace.sampler_signs,
    )
    mean, sem = _mean_and_sem(values)
    return Estimate(mean, sem, num_probes)


def xtrace(matvec: MatVec, template: PyTree, /, *, key: jax.Array, num_probes: int) -> Estimate:
    """XTrace (Epperly, Tropp & Webber 2024), the exchangeable successor of Hutch++.

    A rank-``num_probes`` range finder captures the top of the spectrum exactly and Hutchinson
    handles the rest, leaving each probe out in turn; the SE is that of the leave-one-out
    estimates. Memory O(num_probes · P). Much lower variance than Hutchinson when the spectrum
    decays (Hessians, C).
    """
    size = _check_template(template)
    _check_positive_int("num_probes", num_probes)
    if num_probes > size:
        raise ValueError(f"xtrace needs num_probes <= P={size}, got {num_probes}")
    estimate = stochtrace.estimator_leave_one_out_mean_and_sem(
        stochtrace.leave_one_out_xtrace(), stochtrace.sampler_sphere(template, num=num_probes)
    )
    # matfree's XTrace relies on implicit rank promotion; allow it for this call only.
    with jax.numpy_rank_promotion("allow"):
        mean, sem = estimate(matvec, key)
    return Estimate(mean, sem, num_probes)


def spectral_density(
    matvec: MatVec,
    template: PyTree,
    /,
    *,
    key: jax.Array,
    num_probes: int = 8,
    num_iters: int = 64,
    sigma: float | None = None,
    grid: jax.Array | None = None,
    num_points: int = 512,
    reorthogonalisation: str = "partial",
) -> SpectralDensity:
    """Spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019; Lin et al.).

    For each Rademacher probe z (‖z‖² = P), Lanczos from z gives nodes θ_j and weights
    τ_j = (e_1ᵀ s_j)²; the density is (1/m) Σ_probes Σ_j τ_j N(t; θ_j, σ²), an estimate of
    (1/P) Σ_i N(t; λ_i, σ²), which integrates to 1.

    Args:
      sigma: Gaussian smoothing width; default 1% of the Ritz-value range (stated in the
        result).
      grid: evaluation points; default ``num_points`` points spanning the Ritz values ± 5σ.
      reorthogonalisation: ``"partial"`` or ``"full"``, as in :func:`lanczos_top_k`.

    Returns:
      :class:`SpectralDensity`.
    """
    size = _check_template(template)
    _check_positive_int("num_probes", num_probes)
    _check_positive_int("num_iters", num_iters)
    _check_reorthogonalisation(reorthogonalisation)
    num_iters = min(num_iters, size)
    mv, flat, _ = flatten_operator(matvec, template)
    keys = jax.random.split(key, num_probes)

    def one_probe(k):
        zkey, rkey = jax.random.split(k)
        z = jax.random.rademacher(zkey, flat.shape, flat.dtype)
        alpha, beta, used, _, _ = _lanczos(
            mv,
            z,
            num_iters=num_iters,
            key=rkey,
            k=1,
            tol=None,
            reorthogonalisation=reorthogonalisation,
        )
        vals, vecs, _ = _ritz(alpha, beta, used)
        weights = jnp.where(jnp.arange(num_iters, dtype=jnp.int32) < used, jnp.square(vecs[0]), 0)
        return vals, weights

    nodes, weights = jax.lax.map(one_probe, keys)
    real = weights > 0
    lo = jnp.min(jnp.where(real, nodes, jnp.inf))
    hi = jnp.max(jnp.where(real, nodes, -jnp.inf))
    if sigma is None:
        sigma = 0.01 * jnp.maximum(hi - lo, jnp.finfo(flat.dtype).eps * (1 + jnp.abs(hi)))
    sigma = jnp.asarray(sigma, flat.dtype)
    if grid is None:
        grid = jnp.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=flat.dtype)
    z = (grid[:, None, None] - nodes[None]) / sigma
    gauss = jnp.exp(-0.5 * z**2) / (sigma * jnp.sqrt(2 * jnp.pi))
    density = jnp.sum(gauss * weights[None], axis=(1, 2)) / num_probes
    return SpectralDensity(grid, density, sigma, num_probes, num_iters)
