"""The per-example Hessian second moment E_p[h_p²] = (1/n) Σ_p h_p h_p, exactly: diagonal,
trace, dense matrix, top eigenpairs and quadratic forms, and a Hutchinson diagonal for large P.

h_p = ∇²ℓ_p, the Hessian of example p's loss, H = (1/n) Σ_p h_p (a MEAN over the n examples
of the batch). Exact routes never store any P × P per-example matrix: per-example Hessian rows
h_p e_i are made ``chunk_size`` examples × ``basis_chunk_size`` basis vectors at a time.

Parameter subsets (one layer). Every function takes ``subset`` and then works with the
objective restricted to that subset (:func:`sharpness_jax.subsets.restrict`). For E_p[h_p²]
the block and the square do not commute: by default (``restricted=True``) the functions
compute E_p[(h_p)_SS²], the second moment of the restricted objective (what
``operators.hessian_second_moment(..., subset=S)`` applies); with ``restricted=False`` they
compute (E_p[h_p²])_SS, the S-block of the full second moment, whose diagonal is
(1/n) Σ_p Σ_j (h_p)_ij² with j over ALL parameters. The difference is
(1/n) Σ_p (h_p)_{S,S̄} (h_p)_{S̄,S} ⪰ 0.

The activity–weight duality of Zhang, Yang & Tu (2026) predicts C ≈ (σ²/2B) E_p[h_p²] for
the SGD-noise covariance C (:mod:`sharpness_jax.noise`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from sharpness_jax import checks, dense_factors, linalg, operators, subsets
from sharpness_jax.objective import Batch, Objective
from sharpness_jax.per_example import sum_over_chunks

PyTree = Any

__all__ = [
    "hessian_second_moment_dense",
    "hessian_second_moment_diagonal",
    "hessian_second_moment_diagonal_hutchinson",
    "hessian_second_moment_quadratic_forms",
    "hessian_second_moment_top_k",
    "hessian_second_moment_trace",
    "second_moment_and_hessian_diagonals",
]


# --------------------------------------------------------------------------------- helpers


def _flat(tree: PyTree) -> jax.Array:
    return ravel_pytree(tree)[0]


def _sq_norm(tree: PyTree) -> jax.Array:
    return sum(jnp.sum(jnp.square(a)) for a in jax.tree_util.tree_leaves(tree))


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


def _factored_layout(objective, params, batch, chunk_size, subset, restricted, method):
    """The objective's :class:`dense_factors.DenseLayout` when ``method`` takes the factored
    route for ‖h_p v‖² (``"auto"``: when it applies), with the restricted objective, its
    params and n: ``(layout, objective, sub, n)``; else None.

    The factored products cover the rows of the free parameters only, so with a subset they
    give E_p[(h_p)_SS²] (``restricted=True``); ``restricted=False`` takes the per-example rows.
    """
    if method not in operators.SECOND_MOMENT_METHODS:
        raise ValueError(
            f"unknown E_p[h_p²] method {method!r}; choose one of {operators.SECOND_MOMENT_METHODS}"
        )
    _check_restricted(restricted)
    if method == "per_example":
        return None
    if method == "factored" and subset is not None and not restricted:
        raise ValueError("the factored route gives E_p[(h_p)_SS²] only: use restricted=True")
    if subset is not None and not restricted:
        return None
    restricted_objective, sub, n = operators.prepare(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    example = jax.tree_util.tree_map(lambda a: a[0], batch[0])
    layout = dense_factors.dense_layout(restricted_objective, sub, example)
    if not layout.applicable:
        if method == "factored":
            raise ValueError(f"the factored E_p[h_p²] route does not apply: {layout.reason}")
        return None
    return layout, restricted_objective, sub, n


def _factored_diagonal(factored, batch, *, chunk_size, basis_chunk_size, max_bytes):
    """diag E_p[h_p²] from ‖h_p e_i‖² in factored form, ``basis_chunk_size`` e_i at a time."""
    checks.check_positive_int("basis_chunk_size", basis_chunk_size, optional=True)
    layout, objective, sub, n = factored
    flat, unravel = ravel_pytree(sub)
    size, dtype = flat.size, flat.dtype
    examples = n if chunk_size is None else min(chunk_size, n)
    basis = min(size, basis_chunk_size or max(1, min(size, 2**24 // size)))
    widths = sum(c.positions * (c.input_shape[-1] + c.output_shape[-1]) for c in layout.calls)
    checks.check_memory(
        6.0 * examples * basis * widths * dtype.itemsize,
        max_bytes=max_bytes,
        what=f"layer signals and tangents of {examples} examples × {basis} basis vectors at once",
        cheaper="lower chunk_size and basis_chunk_size, or use "
        "hessian_second_moment_diagonal_hutchinson",
    )

    def chunk_fn(chunk, mask, index):
        del index

        def coordinate(i):
            e = unravel(jax.nn.one_hot(i, size, dtype=dtype))
            return jnp.sum(
                dense_factors.example_hvp_sq_norms(objective, sub, chunk, mask, layout, e)
            )

        return linalg.basis_map(coordinate, size, basis_chunk_size)

    return unravel(sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size) / n)


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
    checks.check_positive_int("basis_chunk_size", basis_chunk_size, optional=True)
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


# --------------------------------------------------------------- second moment E_p[h_p²]


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
    method: str = "auto",
) -> PyTree:
    """diag(E_p[h_p²])_i = (1/n) Σ_p Σ_j (h_p)_ij² = (1/n) Σ_p ‖h_p e_i‖², exactly.

    Two routes give the same numbers (``method`` as in
    :func:`sharpness_jax.operators.hessian_second_moment`):

    * ``"per_example"`` (any model) streams per-example Hessian rows: for each chunk of
      ``chunk_size`` examples and each chunk of ``basis_chunk_size`` basis vectors e_i, the
      n·P per-example HVPs h_p e_i are evaluated together (vmap over examples × basis
      vectors) and reduced to their squared norms at once; no P × P matrix is formed. Cost:
      n·P per-example HVPs, i.e. O(n·P²); memory ~ chunk_size · basis_chunk_size · P. Chunks
      with chunk_size · basis_chunk_size of a few hundred work well on CPU: a tanh MLP
      784-12-10 (P = 9,550) on n = 1,000 examples in float32 takes about 30 s on 2 CPU cores
      with ``chunk_size=25, basis_chunk_size=8``.
    * ``"factored"`` (every free parameter the kernel or bias of a flax ``nn.Dense`` call;
      with a subset, ``restricted=True`` only): ‖h_p e_i‖² from the rank-2 factors of h_p e_i
      (:func:`sharpness_jax.dense_factors.example_hvp_sq_norms`), one batched
      forward-over-reverse pass per e_i instead of n per-example ones; memory ~ chunk_size ·
      basis_chunk_size · the layers' widths. The 2,500 weights of the hidden layer of a
      784-50-50-10 MLP on 50 examples in float64: about 1 s on a loaded 2-core CPU, against
      86 s per example.

    ``"auto"`` (default) takes the factored route when it applies.

    Args:
      chunk_size: examples per chunk (None: all).
      basis_chunk_size: basis vectors per chunk (None: min(P, 2²⁴/P) at a time).
      subset: restrict to these parameters.
      restricted: with a subset, True computes the diagonal of E_p[(h_p)_SS²] (the second
        moment of the restricted objective, j ∈ S); False the diagonal of the S-block of the
        full E_p[h_p²] (j over all parameters). See the module docstring.
      max_bytes: refuse (MemoryError, naming the cheaper routes) when the rows held at once
        would exceed this (default ``checks.MEMORY_LIMIT_BYTES``).
      method: ``"auto"``, ``"factored"`` or ``"per_example"`` (see above).

    Returns:
      A pytree like the (restricted) params.

    Raises:
      ValueError: for an unknown method, or ``"factored"`` where it does not apply.
    """
    factored = _factored_layout(objective, params, batch, chunk_size, subset, restricted, method)
    if factored is not None:
        return _factored_diagonal(
            factored,
            batch,
            chunk_size=chunk_size,
            basis_chunk_size=basis_chunk_size,
            max_bytes=max_bytes,
        )
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


def second_moment_and_hessian_diagonals(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    basis_chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    restricted: bool = True,
    max_bytes: float | None = None,
) -> tuple[PyTree, PyTree]:
    """``(diag E_p[h_p²], diag H)`` exactly, both from one pass over per-example Hessian rows.

    As :func:`hessian_second_moment_diagonal` (same arguments and cost), with e_iᵀ h_p e_i
    summed beside ‖h_p e_i‖²; diag H is that of the restricted objective's Hessian.

    Returns:
      Two pytrees like the (restricted) params.
    """
    return _second_moment_row_stats(
        objective,
        params,
        batch,
        chunk_size=chunk_size,
        basis_chunk_size=basis_chunk_size,
        subset=subset,
        restricted=restricted,
        with_hessian_diagonal=True,
        max_bytes=max_bytes,
    )


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
    method: str = "auto",
) -> jax.Array:
    """v_iᵀ E_p[h_p²] v_i = (1/n) Σ_p ‖h_p v_i‖² for k vectors at once, exactly.

    ‖h_p v_i‖² comes from n per-example HVPs per vector (``"per_example"``, any model) or,
    for networks of flax ``nn.Dense`` layers, from the factors of h_p v_i in one batched
    forward-over-reverse pass per vector (``"factored"``; see
    :func:`hessian_second_moment_diagonal`); ``"auto"`` takes the factored route when it
    applies.

    Args:
      vectors: an :class:`linalg.Eigen` or a pytree like the (restricted) params with a
        leading axis k.
      restricted: as in :func:`hessian_second_moment_diagonal` (False: ‖h_p v‖² over all
        rows, i.e. vᵀ(E_p[h_p²])_SS v).
      method: ``"auto"``, ``"factored"`` or ``"per_example"``.

    Returns:
      ``(k,)`` array.

    Raises:
      ValueError: for an unknown method, or ``"factored"`` where it does not apply.
    """
    factored = _factored_layout(objective, params, batch, chunk_size, subset, restricted, method)
    if factored is None:
        row_fn, sub, n = _row_function(objective, params, batch, chunk_size, subset, restricted)
    else:
        layout, restricted_objective, sub, n = factored
    flat_vectors, _ = linalg.flatten_vectors(vectors, sub)
    _, unravel = ravel_pytree(sub)

    def chunk_fn(chunk, mask, index):
        del index
        x, y = chunk

        def one_vector(v):
            if factored is not None:
                return jnp.sum(
                    dense_factors.example_hvp_sq_norms(
                        restricted_objective, sub, chunk, mask, layout, unravel(v)
                    )
                )

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
    checks.check_positive_int("num_probes", num_probes)
    checks.check_positive_int("probe_chunk", probe_chunk, optional=True)
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
