"""Top eigenpairs of a symmetric matrix-free operator: Lanczos (:func:`lanczos_top_k`), and
power iteration and LOBPCG beside it.

Lanczos is written here rather than taken from ``matfree.decomp.tridiag_sym`` because the
latter neither survives a Krylov breakdown (it returns wrong Ritz values once the Krylov space
becomes invariant, which happens for the low-rank C and for small models) nor stops at a
tolerance. The iteration itself (:func:`_lanczos`, :func:`_ritz`) also serves stochastic
Lanczos quadrature in :mod:`sharpness_jax.linalg.estimators`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sharpness_jax import checks
from sharpness_jax.linalg.exact import _check_template, flatten_operator
from sharpness_jax.linear_operator import compiled

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

__all__ = [
    "REORTHOGONALISATION",
    "Eigen",
    "flatten_vectors",
    "lanczos_top_k",
    "lobpcg_top_k",
    "power_iteration",
]


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


def flatten_vectors(vectors: PyTree, template: PyTree) -> tuple[jax.Array, int]:
    """Flattens k stacked vectors (an :class:`Eigen` or a pytree with a leading axis k) into
    a ``(k, P)`` array, checking their structure against ``template``.

    Returns:
      ``(rows, k)``.

    Raises:
      ValueError / TypeError: on another tree structure, leaf shape or dtype, or leaves
        without one common leading axis.
    """
    if isinstance(vectors, Eigen):
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
    return jax.vmap(lambda t: ravel_pytree(t)[0])(vectors), k.pop()


def _template_dtype(template: PyTree) -> jnp.dtype:
    return jnp.result_type(*jax.tree_util.tree_leaves(template))


def _check_reorthogonalisation(value: Any) -> None:
    if value not in REORTHOGONALISATION:
        raise ValueError(f"reorthogonalisation must be one of {REORTHOGONALISATION}, got {value!r}")


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


class _Settings(NamedTuple):
    """The static settings of one Lanczos run (see :func:`_lanczos`)."""

    size: int
    dtype: Any
    eps: Any
    omega_eps: Any  # the rounding error of one step, ε of the operator's products
    full: bool
    psi: jax.Array  # the local loss of orthogonality |q_{j+1}ᵀ q_j| after one step
    threshold: jax.Array  # √omega_eps, where partial reorthogonalisation steps in
    index: jax.Array  # 0, 1, …, num_iters − 1
    k: int
    tol: float | None
    min_iters: int


def _step(state, *, mv, key, s: _Settings):
    """One Lanczos step: the new vector, its coefficients α_j, β_j, the ω estimates, and (with
    a tolerance) whether the top k Ritz pairs have converged."""
    j, basis, alpha, beta, q, q_prev, omega, omega_prev, force, count, _ = state
    basis = basis.at[j].set(q)
    w = mv(q)
    a = jnp.vdot(q, w)
    b_prev = jnp.where(j > 0, beta[jnp.maximum(j - 1, 0)], 0)
    w = w - a * q - b_prev * q_prev
    b0 = jnp.linalg.norm(w)
    alpha = alpha.at[j].set(a)
    omega_next = _omega_step(omega, omega_prev, alpha, beta, a, b_prev, b0, j, s.omega_eps)
    lost = (jnp.max(jnp.abs(omega_next)) > s.threshold) | (b0 <= 0)
    reorth = s.full | force | lost
    w = jax.lax.cond(reorth, lambda w: _orthogonalise(w, basis, j + 1), lambda w: w, w)
    b = jnp.linalg.norm(w)
    scale = jnp.maximum(jnp.max(jnp.abs(alpha)), jnp.abs(a)) + jnp.max(beta)
    broke = b <= jnp.sqrt(s.eps) * jnp.maximum(scale, jnp.finfo(s.dtype).tiny)

    def restart():
        normal = jax.random.normal(jax.random.fold_in(key, j), (s.size,), s.dtype)
        fresh = _orthogonalise(normal, basis, j + 1)
        return fresh / jnp.linalg.norm(fresh)

    q_next = jax.lax.cond(broke, restart, lambda: w / jnp.where(broke, 1, b))
    beta = beta.at[j].set(jnp.where(broke, 0, b))
    # After an orthogonalisation against all previous vectors only rounding is left.
    omega_next = jnp.where(reorth | broke, jnp.where(s.index <= j, s.psi, 0), omega_next)
    omega_next = jnp.where(s.index == j, s.psi, omega_next)
    omega_next = jnp.where(s.index == j + 1, 1, omega_next)
    converged = jnp.bool_(False)
    if s.tol is not None:
        vals, _, res = _ritz(alpha, beta, j + 1)
        top = jnp.abs(vals[: s.k])
        converged = (j + 1 >= max(s.k, s.min_iters)) & ~broke & jnp.all(res[: s.k] <= s.tol * top)
    # Simon: a vector orthogonalised because the estimate crossed √ε takes the next
    # vector with it (the recurrence couples three consecutive rows).
    force_next = lost & ~force & ~broke
    count = count + reorth.astype(jnp.int32)
    return (j + 1, basis, alpha, beta, q_next, q, omega_next, omega, force_next, count, converged)


def _initial_state(v0, rows, num_iters):
    """The loop state before the first step: an empty basis of ``rows`` rows, q_0 = v0/‖v0‖."""
    size, dtype = v0.shape[0], v0.dtype
    return (
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


def _lanczos(
    mv,
    v0,
    *,
    num_iters,
    key,
    k,
    tol,
    min_iters=1,
    reorthogonalisation="partial",
    num_vectors=0,
    operator_dtype=None,
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

    ``operator_dtype`` is the dtype of the operator's products when it is narrower than the
    vectors' (a half-precision model with float32 Lanczos vectors): its ε, not the vectors',
    is the rounding error per step that drives the ω recurrence and the √ε threshold.

    Returns ``(alpha, beta, used, num_reorthogonalisations, vectors)`` with the top
    ``num_vectors`` Ritz vectors as rows of ``vectors``.
    """
    size = v0.shape[0]
    dtype = v0.dtype
    eps = jnp.finfo(dtype).eps
    omega_eps = float(max(eps, jnp.finfo(operator_dtype or dtype).eps))
    settings = _Settings(
        size=size,
        dtype=dtype,
        eps=eps,
        omega_eps=omega_eps,
        full=reorthogonalisation == "full",
        psi=jnp.asarray(eps * max(size, 1) ** 0.5, dtype),
        threshold=jnp.sqrt(omega_eps),
        index=jnp.arange(num_iters, dtype=jnp.int32),
        k=k,
        tol=tol,
        min_iters=min_iters,
    )
    step = functools.partial(_step, mv=mv, key=key, s=settings)

    def run(state, stop):
        return jax.lax.while_loop(lambda s: (s[0] < stop) & ~s[-1], step, state)

    def finish(state):
        used, basis, alpha, beta, *_, count, _ = state
        _, vecs, _ = _ritz(alpha, beta, used)
        return alpha, beta, used, count, _combine(vecs[:, :num_vectors], basis, used)

    padded = -(-num_iters // _ORTHO_BLOCK) * _ORTHO_BLOCK
    rows = _first_stage_rows(padded, size, jnp.dtype(dtype).itemsize)
    state = run(_initial_state(v0, rows, num_iters), min(rows, num_iters))
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


@compiled(static=("k", "num_iters", "tol", "min_iters", "reorthogonalisation"))
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
    checks.check_positive_int("k", k)
    checks.check_positive_int("num_iters", num_iters)
    if k > size:
        raise ValueError(f"k={k} exceeds the number of parameters P={size}")
    num_iters = min(num_iters, size)
    if k > num_iters:
        raise ValueError(f"k={k} needs num_iters >= k, got num_iters={num_iters}")
    key = jax.random.PRNGKey(0) if key is None else key
    mv, flat, unravel = flatten_operator(matvec, template)
    start_key, restart_key = jax.random.split(key)
    v0 = _start_vector(template, flat, start_key, init)
    checks.check_positive_int("min_iters", min_iters)
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
        operator_dtype=_template_dtype(template),
    )
    vals, _, residuals = _ritz(alpha, beta, used)
    return Eigen(vals[:k], jax.vmap(unravel)(ritz_vectors), residuals[:k], used)


@compiled(static=("num_iters", "tol"))
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
    checks.check_positive_int("num_iters", num_iters)
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


@compiled(static=("k", "num_iters", "tol"))
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
    checks.check_positive_int("k", k)
    checks.check_positive_int("num_iters", num_iters)
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
