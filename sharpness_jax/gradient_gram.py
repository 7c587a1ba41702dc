"""The n × n Gram matrix of per-example gradients, and the exact spectrum of C from it.

Notation as in :mod:`sharpness_jax.noise`: g_p = ∇ℓ_p, ḡ = (1/n) Σ_p g_p, ĝ_p = g_p − ḡ,
C = (1/n) Σ_p ĝ_p ĝ_pᵀ. The (uncentred) Gram matrix is K_pq = g_p·g_q, and the centred one

    K_c = (I − 11ᵀ/n) K (I − 11ᵀ/n) / n,     (K_c)_pq = ĝ_p·ĝ_q / n,

has the nonzero eigenvalues of C: tr(C) = tr(K_c), ‖C‖_F² = ‖K_c‖_F², and K_c u = λu (λ > 0)
gives the unit eigenvector v = Ĝᵀu / √(nλ) of C, with Ĝᵀu = Σ_p u_p g_p (1ᵀu = 0) one
vector-Jacobian product of the weighted summed loss.

Two routes build the Gram matrix, block by block over chunks of rows and columns (memory
n² plus what one pair of chunks needs; about n / chunk_size passes over the batch):

* ``"factored"``, when every free parameter leaf is the kernel or bias of one flax
  ``nn.Dense`` call (:func:`sharpness_jax.dense_factors.dense_layout`). A Dense layer applied
  at T positions has per-example kernel gradient Σ_t a_pt δ_ptᵀ (inputs a, output-gradients
  δ), so its share of K is Σ_{t,s} (a_pt·a_qs)(δ_pt·δ_qs): Hadamard products of the
  activation and back-propagated Grams, and Σ_{t,s} δ_pt·δ_qs for the bias. No per-example
  gradient is formed. Where T²(d + m) > d·m (many positions, narrow layers) the layer's
  gradient Σ_t a_pt δ_ptᵀ (d × m) is formed per example of a chunk instead, which is cheaper.
* ``"per_example"``: flat per-example gradients of a chunk, G_r G_cᵀ per block.

Numerics when tr(C) ≪ ‖ḡ‖². Centring K after the fact leaves float32 errors of order
eps·‖ḡ‖² on a signal of order tr(C)/n. C is invariant under subtracting a fixed r from every
g_p, so the routes work with g_p − r, r close to ḡ: the per-example route takes r = ḡ (one
gradient first), the factored one, per layer, r = Σ_t ā_t δ̄_tᵀ (ā_t, δ̄_t the means over
examples at position t) and g_p − r = Σ_t (a_pt − ā_t) δ_ptᵀ + ā_t (δ_pt − δ̄_t)ᵀ, products
with one small factor each. What is left of the mean, ḡ − r, is of the order of the
fluctuations, so the error is of order eps·‖ḡ‖·‖ĝ‖, as for centred per-example gradients.
The exact tr(C) takes the means of each chunk and pools the chunks (one pass).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sharpness_jax import checks, dense_factors, operators, subsets
from sharpness_jax.linalg.exact import working_dtype
from sharpness_jax.objective import Batch, Objective
from sharpness_jax.per_example import sum_over_chunks

PyTree = Any

__all__ = [
    "METHODS",
    "CovarianceSpectrum",
    "blocked_gram",
    "covariance_spectrum",
    "covariance_trace",
    "exact_covariance_moments",
    "flat_example_grads",
    "gradient_gram",
    "gram_method",
]

METHODS = ("auto", "factored", "per_example")

_HIGHEST = jax.lax.Precision.HIGHEST


class CovarianceSpectrum(NamedTuple):
    """Exact moments and spectrum of C from the centred Gram matrix K_c.

    Attributes:
      trace: tr(C) = tr(K_c).
      frobenius_squared: ‖C‖_F² = ‖K_c‖_F².
      eigenvalues: the n eigenvalues of K_c, descending: every nonzero eigenvalue of C, then
        zeros at rounding level (rank C ≤ n − 1).
      method: the route that built the Gram matrix, ``"factored"`` or ``"per_example"``
        (static: not a leaf of the pytree).
      vectors: the top-k unit eigenvectors of C, params' structure with a leading axis k
        (zero where λ is at rounding level), or None when none were asked for.
    """

    trace: jax.Array
    frobenius_squared: jax.Array
    eigenvalues: jax.Array
    method: str
    vectors: PyTree | None = None


jax.tree_util.register_pytree_node(
    CovarianceSpectrum,
    lambda s: ((s.trace, s.frobenius_squared, s.eigenvalues, s.vectors), s.method),
    lambda method, leaves: CovarianceSpectrum(*leaves[:3], method, leaves[3]),
)


# ------------------------------------------------------------------------- shared pieces


def flat_example_grads(
    objective: Objective,
    params: PyTree,
    chunk: Batch,
    mask: jax.Array,
    reference: jax.Array | None = None,
) -> jax.Array:
    """Rows g_p − reference of a chunk as a ``(c, P)`` array (flat ``ravel_pytree`` basis).

    Args:
      objective, params: the (restricted) objective and its free parameters.
      chunk: c examples; mask: ``(c,)`` bool, False on padding (rows there are zero).
      reference: a flat P-vector subtracted from every row (None: nothing).
    """
    grad = jax.grad(objective.example_loss)
    x, y = chunk
    g = jax.vmap(lambda xp, yp: ravel_pytree(grad(params, xp, yp))[0])(x, y)
    if reference is not None:
        g = g - reference[None, :]
    return jnp.where(mask[:, None], g, 0)


def blocked_gram(
    features: Callable[[Batch, jax.Array], PyTree],
    block: Callable[[PyTree, PyTree], jax.Array],
    batch: Batch,
    *,
    chunk_size: int | None,
    dtype: Any,
) -> jax.Array:
    """The n × n matrix M_pq = ⟨φ_p, φ_q⟩ assembled from chunk-by-chunk blocks.

    For each chunk of rows, the features of every chunk of columns are recomputed, so memory
    is n² plus the features of two chunks; ``chunk_size=None`` makes one block.

    Args:
      features: ``(chunk, mask) -> φ`` for the examples of one chunk.
      block: ``(φ_rows, φ_cols) -> (c_rows, c_cols)`` block of M.
      batch: the examples; chunk_size: examples per chunk; dtype: of M.
    """
    n = checks.num_examples(batch)
    if chunk_size is None or chunk_size >= n:
        f = features(batch, jnp.ones((n,), bool))
        return block(f, f)

    def row_fn(rows, row_mask, row_index):
        f_rows = features(rows, row_mask)

        def col_fn(cols, col_mask, col_index):
            tile = block(f_rows, features(cols, col_mask))
            strip = jnp.zeros((row_mask.shape[0], n), dtype)
            return strip.at[:, col_index].set(tile, mode="drop")

        strip = sum_over_chunks(col_fn, batch, chunk_size=chunk_size)
        return jnp.zeros((n, n), dtype).at[row_index].set(strip, mode="drop")

    return sum_over_chunks(row_fn, batch, chunk_size=chunk_size)


def _resolve(objective, params, batch, method):
    """(method, layout) with ``"auto"`` resolved; the layout is None on the generic route."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "per_example":
        return method, None
    example = jax.tree_util.tree_map(lambda a: a[0], batch.inputs)
    layout = dense_factors.dense_layout(objective, params, example)
    if layout.applicable:
        return "factored", layout
    if method == "factored":
        raise ValueError(f"the factored Gram route does not apply: {layout.reason}")
    return "per_example", None


def gram_method(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    subset: subsets.Selector | None = None,
    method: str = "auto",
) -> str:
    """The route :func:`gradient_gram` takes: ``"factored"`` or ``"per_example"``.

    Raises:
      ValueError: on an unknown method, or ``"factored"`` where it does not apply.
    """
    objective, params, _ = operators.prepare(
        objective, params, batch, chunk_size=None, subset=subset
    )
    return _resolve(objective, params, Batch(*batch), method)[0]


def _dtype(params):
    """The dtype of the Gram matrices: float32 for half-precision parameters."""
    return working_dtype(jnp.result_type(*jax.tree_util.tree_leaves(params)))


def _check_gram_memory(n, dtype):
    checks.check_memory(
        3.0 * n * n * jnp.dtype(dtype).itemsize,
        max_bytes=None,
        what=f"the {n:,} × {n:,} Gram matrix",
        cheaper="use noise.gradient_covariance_top_k(method='lanczos') or a smaller batch",
    )


# ------------------------------------------------------------------------- factored route


def _einsum(spec, *arrays):
    # Gram sums of half-precision factors accumulate in float32.
    wide = working_dtype(jnp.result_type(*arrays))
    return jnp.einsum(spec, *(a.astype(wide) for a in arrays), precision=_HIGHEST)


def _hadamard(call) -> bool:
    """Whether call's kernel Gram is cheaper as Σ_{t,s}(a·a)(δ·δ) than via its gradient."""
    t, d, m = call.positions, call.input_shape[-1], call.output_shape[-1]
    return t * t * (d + m) <= d * m


def _signal_sums(calls, signals, mask):
    """Per call, (Σ_p a_p, Σ_p δ_p) over a chunk's real examples, shapes (T, d), (T, m)."""
    out = []
    for c, a, d in zip(calls, *signals, strict=True):
        a = jnp.where(mask[:, None, None], a.reshape(mask.shape[0], c.positions, -1), 0)
        out.append((jnp.sum(a, 0), jnp.sum(d.reshape(mask.shape[0], c.positions, -1), 0)))
    return out


def _factor_means(objective, params, batch, layout, chunk_size):
    """Per call, (ā, δ̄): the means over examples at each position, shapes (T, d), (T, m)."""
    n = checks.num_examples(batch)

    def chunk_fn(chunk, mask, index):
        del index
        signals = dense_factors.layer_signals(objective, params, chunk, mask, layout)
        return _signal_sums(layout.calls, signals, mask)

    total = sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size)
    return [(a / n, d / n) for a, d in total]


def _layer_factors(objective, params, chunk, mask, layout, means, signals=None):
    """Per call, the factors of g_p − r on a chunk (r = 0 when ``means`` is None)."""
    if signals is None:
        signals = dense_factors.layer_signals(objective, params, chunk, mask, layout)
    acts, deltas = signals
    size = mask.shape[0]
    keep = mask[:, None, None]
    out = []
    for k, (c, a, d) in enumerate(zip(layout.calls, acts, deltas, strict=True)):
        a = a.reshape(size, c.positions, -1)
        d = d.reshape(size, c.positions, -1)
        f = {"D": d}
        if means is None:
            f["E"] = jnp.where(keep, a, 0)
            h = d
        else:
            a_bar, d_bar = means[k]
            f["E"] = jnp.where(keep, a - a_bar[None], 0)
            f["a_bar"] = a_bar
            h = f["H"] = jnp.where(keep, d - d_bar[None], 0)
        if c.bias is not None:
            f["bias"] = jnp.sum(h, axis=1)
        if c.kernel is not None and not _hadamard(c):
            w = _einsum("ptd,ptm->pdm", f["E"], d)
            if "a_bar" in f:
                w = w + _einsum("td,ptm->pdm", f["a_bar"], f["H"])
            f["W"] = w
        out.append(f)
    return out


def _kernel_block(f1, f2):
    """Σ_{t,s} ⟨ε_pt δ_ptᵀ + ā_t η_ptᵀ, ε_qs δ_qsᵀ + ā_s η_qsᵀ⟩ for one Hadamard call."""
    block = jnp.sum(
        _einsum("ptd,qsd->pqts", f1["E"], f2["E"]) * _einsum("ptm,qsm->pqts", f1["D"], f2["D"]),
        axis=(2, 3),
    )
    if "a_bar" not in f1:
        return block
    a_bar = f1["a_bar"]
    ea1 = _einsum("ptd,sd->pts", f1["E"], a_bar)  # ε_pt·ā_s
    ea2 = _einsum("qsd,td->qst", f2["E"], a_bar)  # ε_qs·ā_t
    aa = _einsum("td,sd->ts", a_bar, a_bar)
    block = block + _einsum("pts,pqts->pq", ea1, _einsum("ptm,qsm->pqts", f1["D"], f2["H"]))
    block = block + _einsum("qst,pqts->pq", ea2, _einsum("ptm,qsm->pqts", f1["H"], f2["D"]))
    return block + _einsum("ts,pqts->pq", aa, _einsum("ptm,qsm->pqts", f1["H"], f2["H"]))


def _factored_block(calls):
    def block(rows, cols):
        total = 0
        for c, f1, f2 in zip(calls, rows, cols, strict=True):
            if "bias" in f1:
                total = total + _einsum("pm,qm->pq", f1["bias"], f2["bias"])
            if "W" in f1:
                total = total + _einsum("pdm,qdm->pq", f1["W"], f2["W"])
            elif c.kernel is not None:
                total = total + _kernel_block(f1, f2)
        return total

    return block


def _gram(objective, params, batch, method, layout, chunk_size, centred):
    """The Gram of g_p − r (r = 0, or close to ḡ when ``centred``) on the chosen route."""
    dtype = _dtype(params)
    if method == "per_example":
        reference = None
        if centred:
            g_bar = operators.gradient(objective, params, batch, chunk_size=chunk_size)
            reference = ravel_pytree(g_bar)[0]

        def features(chunk, mask):
            return flat_example_grads(objective, params, chunk, mask, reference)

        def block(g1, g2):
            return jnp.matmul(g1, g2.T, precision=_HIGHEST, preferred_element_type=dtype)

    else:
        means = _factor_means(objective, params, batch, layout, chunk_size) if centred else None

        def features(chunk, mask):
            return _layer_factors(objective, params, chunk, mask, layout, means)

        block = _factored_block(layout.calls)
    return blocked_gram(features, block, batch, chunk_size=chunk_size, dtype=dtype)


# ------------------------------------------------------------------------- public routes


def gradient_gram(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    method: str = "auto",
) -> jax.Array:
    """The n × n Gram matrix K_pq = g_p·g_q of the (uncentred) per-example gradients.

    Args:
      objective, params, batch: the objective (per-example model and loss) and its batch.
      chunk_size: examples per chunk (``None``: one block).
      subset: restrict to a parameter subset (g_p is then the subset's gradient).
      method: ``"factored"``, ``"per_example"`` or ``"auto"`` (factored where it applies;
        :func:`gram_method` says which).

    Returns:
      ``(n, n)`` array, rows in batch order.

    Raises:
      ValueError: on an unknown method, or ``"factored"`` where it does not apply.
      MemoryError: if the n × n matrix exceeds ``checks.MEMORY_LIMIT_BYTES``.
    """
    objective, params, n = operators.prepare(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    batch = Batch(*batch)
    method, layout = _resolve(objective, params, batch, method)
    _check_gram_memory(n, _dtype(params))
    return _gram(objective, params, batch, method, layout, chunk_size, centred=False)


def _centre(gram: jax.Array) -> jax.Array:
    """(I − 11ᵀ/n) M (I − 11ᵀ/n) / n."""
    n = gram.shape[0]
    rows = jnp.mean(gram, axis=1)
    return (gram - rows[:, None] - rows[None, :] + jnp.mean(rows)) / n


def _top_vectors(objective, params, batch, vals, vecs, chunk_size):
    """v_i = Ĝᵀu_i / √(nλ_i) = Σ_p u_ip g_p / √(nλ_i) (u_i centred), one VJP per chunk."""
    n = vecs.shape[0]
    u = vecs - jnp.mean(vecs, axis=0, keepdims=True)  # 1ᵀu = 0, so Ĝᵀu = Gᵀu

    def chunk_fn(chunk, mask, index):
        weights = jnp.where(mask[:, None], jnp.take(u, index, axis=0, mode="clip"), 0)
        _, vjp = jax.vjp(lambda p: objective.batch_losses(p, chunk), params)
        return jax.vmap(lambda w: vjp(w)[0])(weights.T)

    gt_u = sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size)
    lam = jnp.maximum(vals, 0)
    floor = n * jnp.finfo(vals.dtype).eps * jnp.maximum(lam[0], jnp.finfo(vals.dtype).tiny)
    positive = lam > floor
    scale = jnp.where(positive, 1 / jnp.sqrt(n * jnp.where(positive, lam, 1)), 0)
    return jax.tree_util.tree_map(
        lambda a: a * scale.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype), gt_u
    )


def covariance_spectrum(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    k: int = 0,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    method: str = "auto",
) -> CovarianceSpectrum:
    """tr(C), ‖C‖_F², every nonzero eigenvalue of C and optionally its top-k eigenvectors.

    All from the centred Gram matrix K_c (eigh, n × n), built stably when the mean gradient
    dominates (see the module docstring). Eigenvectors v_i = Ĝᵀu_i / √(nλ_i) come from one
    more pass: a vector-Jacobian product of Σ_p u_ip ℓ_p per chunk for all k at once.

    Args:
      objective, params, batch, chunk_size, subset, method: as in :func:`gradient_gram`.
      k: number of eigenvectors (0 ≤ k ≤ n).

    Returns:
      :class:`CovarianceSpectrum`.

    Raises:
      ValueError: on a bad method or k.
    """
    objective, params, n = operators.prepare(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    batch = Batch(*batch)
    if not (isinstance(k, int) and 0 <= k <= n):
        raise ValueError(f"k must be an integer in [0, n={n}], got {k!r}")
    method, layout = _resolve(objective, params, batch, method)
    _check_gram_memory(n, _dtype(params))
    gram = _centre(_gram(objective, params, batch, method, layout, chunk_size, centred=True))
    vals, vecs = jnp.linalg.eigh(gram)
    vals, vecs = vals[::-1], vecs[:, ::-1]
    vectors = None
    if k:
        vectors = _top_vectors(objective, params, batch, vals[:k], vecs[:, :k], chunk_size)
    return CovarianceSpectrum(jnp.trace(gram), jnp.sum(jnp.square(gram)), vals, method, vectors)


def exact_covariance_moments(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    method: str = "auto",
) -> CovarianceSpectrum:
    """tr(C), ‖C‖_F² and the eigenvalues of C, exactly: :func:`covariance_spectrum` with k = 0."""
    return covariance_spectrum(
        objective, params, batch, chunk_size=chunk_size, subset=subset, method=method
    )


# ------------------------------------------------------------------------- exact tr(C)


def _kernel_diagonal(f):
    """‖Σ_t ε_pt δ_ptᵀ + ā_t η_ptᵀ‖² per example: the diagonal of :func:`_kernel_block`."""
    a_bar = f["a_bar"]
    block = jnp.sum(
        _einsum("ptd,psd->pts", f["E"], f["E"]) * _einsum("ptm,psm->pts", f["D"], f["D"]),
        axis=(1, 2),
    )
    ea = _einsum("ptd,sd->pts", f["E"], a_bar)  # ε_pt·ā_s
    dh = _einsum("ptm,psm->pts", f["D"], f["H"])  # δ_pt·η_ps
    hh = _einsum("ptm,psm->pts", f["H"], f["H"])
    cross = 2 * jnp.sum(ea * dh, axis=(1, 2))  # the two cross terms are equal on the diagonal
    return block + cross + _einsum("ts,pts->p", _einsum("td,sd->ts", a_bar, a_bar), hh)


def _kernel_sum(f):
    """Σ_p (g_p − r) of a Hadamard call's kernel on a chunk, (d, m)."""
    total = _einsum("ptd,ptm->dm", f["E"], f["D"])
    return total + _einsum("td,ptm->dm", f["a_bar"], f["H"])


def _squares_and_sums(calls, factors):
    """Σ_p ‖g_p − r‖² and, per free leaf of each call, Σ_p (g_p − r) of a chunk's factors."""
    squares, sums = 0, []
    for c, f in zip(calls, factors, strict=True):
        layer = []
        if "bias" in f:
            squares = squares + jnp.sum(jnp.square(f["bias"]))
            layer.append(jnp.sum(f["bias"], axis=0))
        if "W" in f:
            squares = squares + jnp.sum(jnp.square(f["W"]))
            layer.append(jnp.sum(f["W"], axis=0))
        elif c.kernel is not None:
            squares = squares + jnp.sum(_kernel_diagonal(f))
            layer.append(_kernel_sum(f))
        sums.append(layer)
    return squares, sums


def _chunk_reference(calls, means):
    """r per free leaf (order of :func:`_squares_and_sums`): Σ_t δ̄_t, Σ_t ā_t δ̄_tᵀ."""
    out = []
    for c, (a_bar, d_bar) in zip(calls, means, strict=True):
        layer = [jnp.sum(d_bar, axis=0)] if c.bias is not None else []
        if c.kernel is not None:
            layer.append(_einsum("td,tm->dm", a_bar, d_bar))
        out.append(layer)
    return out


def _factored_trace(objective, params, batch, layout, chunk_size, n):
    """n tr(C) = Σ_c [S_c − ‖s_c‖²/n_c] + Σ_c n_c ‖ḡ_c − m‖² − n ‖ḡ − m‖² over chunks c.

    S_c = Σ_{p∈c} ‖g_p − r_c‖² and s_c = Σ_{p∈c} (g_p − r_c) come from the factors with the
    chunk's own factor means (ḡ_c = r_c + s_c/n_c); m is the mean gradient of the first
    chunk_size examples, so every ḡ_c − m and ḡ − m is of the order of the fluctuations and
    no ‖ḡ‖²-sized terms cancel. One pass over the batch (and m from one chunk's gradient).
    """
    single = chunk_size is None or chunk_size >= n
    head = jax.tree.map(lambda a: a[:chunk_size], batch)
    m = params if single else operators.gradient(objective, params, head, chunk_size=None)
    leaves = [0 * x if single else x for x in jax.tree.leaves(m)]
    m = [[leaves[k] for k in (c.bias, c.kernel) if k is not None] for c in layout.calls]

    def chunk_fn(chunk, mask, index):
        del index
        signals = dense_factors.layer_signals(objective, params, chunk, mask, layout)
        count = jnp.sum(mask).astype(_dtype(params))
        scale = 1 / jnp.maximum(count, 1)
        means = [(a * scale, d * scale) for a, d in _signal_sums(layout.calls, signals, mask)]
        factors = _layer_factors(objective, params, chunk, mask, layout, means, signals)
        squares, sums = _squares_and_sums(layout.calls, factors)
        within = squares - scale * sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(sums))
        # n_c (ḡ_c − m) = n_c (r_c − m) + s_c, leaf by leaf.
        refs = _chunk_reference(layout.calls, means)
        shift = jax.tree.map(lambda r, x, mu: count * (r - mu) + x, refs, sums, m)
        between = scale * sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(shift))
        return within, between, shift

    within, between, shift = sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size)
    if single:
        return within / n
    offset = sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(shift)) / n
    return (within + between - offset) / n


def _check_trace_memory(params, layout, chunk):
    """Refuses an exact tr(C) whose chunk does not fit: its layer factors (or gradients)."""
    if layout is None:
        size, route = ravel_pytree(params)[0].shape[0], "per-example gradients"
    else:
        size, route = 0, "layer factors"
        for c in layout.calls:
            size += 3 * c.positions * (c.input_shape[-1] + c.output_shape[-1])
            if c.kernel is not None and not _hadamard(c):
                size += c.input_shape[-1] * c.output_shape[-1]
    checks.check_memory(
        2.0 * chunk * size * jnp.dtype(_dtype(params)).itemsize,
        max_bytes=None,
        what=f"exact tr(C) from the {route} of a chunk of {chunk:,} examples",
        cheaper="set a smaller chunk_size or use the Hutchinson estimate",
    )


def covariance_trace(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    method: str = "auto",
) -> tuple[jax.Array, str]:
    """tr(C) = (1/n) Σ_p ‖g_p − ḡ‖² exactly; one pass over the batch on the factored route.

    Factored route (every free leaf the kernel or bias of a Dense call): the squared norms
    of g_p − r_c come from the layer factors, r_c close to the chunk's mean gradient (module
    docstring), combined over chunks by :func:`_factored_trace`, without a per-example
    gradient and without subtracting ‖ḡ‖²-sized terms. The per-example route sums
    ‖g_p − ḡ‖² over chunks of per-example gradients (one gradient for ḡ first).

    Args:
      objective, params, batch, chunk_size, subset, method: as in :func:`gradient_gram`.

    Returns:
      ``(trace, route)``: a scalar and ``"factored"`` or ``"per_example"``.

    Raises:
      ValueError: on an unknown method, or ``"factored"`` where it does not apply.
      MemoryError: if one chunk's factors (or per-example gradients) exceed
        ``checks.MEMORY_LIMIT_BYTES``.
    """
    objective, params, n = operators.prepare(
        objective, params, batch, chunk_size=chunk_size, subset=subset
    )
    batch = Batch(*batch)
    method, layout = _resolve(objective, params, batch, method)
    _check_trace_memory(params, layout, min(chunk_size or n, n))
    if method == "factored":
        return _factored_trace(objective, params, batch, layout, chunk_size, n), method
    g_bar = ravel_pytree(operators.gradient(objective, params, batch, chunk_size=chunk_size))[0]

    def chunk_fn(chunk, mask, index):
        del index
        return jnp.sum(jnp.square(flat_example_grads(objective, params, chunk, mask, g_bar)))

    return sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size) / n, method
