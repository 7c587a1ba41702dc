"""Per-example quantities and THE chunked reduction over examples.

Every sum over examples in this library goes through :func:`sum_over_chunks`. It splits the
batch into ``ceil(n / chunk_size)`` chunks, evaluates a chunk function on one chunk at a time
inside ``lax.fori_loop`` and accumulates the result, so peak memory is set by
``chunk_size``, not by n. When ``chunk_size`` does not divide n, the last chunk is filled
with repeats of a real example and a boolean ``mask`` marks the real ones.

Chunk ``i`` holds the examples ``p = j · num_chunks + i`` (j = 0 … chunk_size − 1): a strided
rather than contiguous slice. When the batch is sharded over a 1-D device mesh along the
example axis in contiguous blocks, every chunk therefore draws equally from every device, and
the same code runs data-parallel under ``jax.jit`` with no change.

On XLA's CPU backend the chunk function is traced once more with every convolution written in
the one dimension order (batch, spatial..., feature for images; spatial..., in, out for
kernels) that the backend hands to its convolution library. XLA rewrites other orders into
that one only in a program's top level (``ConvCanonicalization``), not inside loop bodies, and
the weight- and input-gradient convolutions of reverse-mode autodiff come in other orders; in
a loop body they fell back to a naive loop nest, 5–25× slower than the library call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
from jax.extend.core import primitives as jax_primitives

from sharpness_jax import checks
from sharpness_jax.objective import Batch, Objective

PyTree = Any

__all__ = [
    "map_examples",
    "per_example_grads",
    "per_example_hvps",
    "per_example_jacobians",
    "per_example_losses",
    "sum_examples",
    "sum_over_chunks",
]


def sum_over_chunks(
    chunk_fn: Callable[[PyTree, jax.Array, jax.Array], PyTree],
    batch: PyTree,
    *,
    chunk_size: int | None = None,
) -> PyTree:
    """Σ over chunks of ``chunk_fn(chunk, mask, index)``.

    Args:
      chunk_fn: ``(chunk, mask, index) -> pytree``. ``chunk`` is ``batch`` restricted to at
        most ``chunk_size`` examples, ``mask`` (bool, one per example) is False on padding,
        ``index`` holds each example's position in ``batch``. The function must give masked
        examples zero weight (e.g. ``jnp.where(mask, ...)``).
      batch: a pytree whose leaves share a leading example axis of size n.
      chunk_size: examples per chunk; ``None`` evaluates the whole batch at once.

    Returns:
      The sum of ``chunk_fn`` over all chunks, in the dtypes of ``chunk_fn``'s outputs; the
      running sum of half-precision (bfloat16, float16) outputs is kept in float32.
    """
    n = checks.num_examples(batch)
    checks.check_chunk_size(chunk_size)
    if chunk_size is None or chunk_size >= n:
        return chunk_fn(batch, jnp.ones((n,), bool), jnp.arange(n, dtype=jnp.int32))

    num_chunks = -(-n // chunk_size)
    chunk_fn = _library_convolutions(chunk_fn)
    stride = jnp.arange(chunk_size, dtype=jnp.int32) * num_chunks

    if n % chunk_size == 0:
        # (n, ...) -> (chunk_size, num_chunks, ...) is a free reshape, and a contiguous
        # block sharding of the example axis stays a block sharding of the first axis, so
        # taking column i needs no communication.
        arranged = jax.tree_util.tree_map(
            lambda a: a.reshape(chunk_size, num_chunks, *a.shape[1:]), batch
        )

        def gather(i):
            return jax.tree_util.tree_map(
                lambda a: jax.lax.dynamic_index_in_dim(a, i, axis=1, keepdims=False), arranged
            )

    else:
        # Ragged: gather the same strided examples; indices past the end are clipped to a
        # real example and masked out. No padded copy of the batch is made.
        def gather(i):
            idx = jnp.minimum(stride + i, n - 1)
            return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), batch)

    def take(i):
        idx = stride + i
        return chunk_fn(gather(i), idx < n, idx)

    def body(i, acc):
        return jax.tree_util.tree_map(lambda a, b: a + _widen(b), acc, take(i))

    first = take(0)
    total = jax.lax.fori_loop(1, num_chunks, body, jax.tree_util.tree_map(_widen, first))
    return jax.tree_util.tree_map(lambda t, f: t.astype(f.dtype), total, first)


def _library_convolutions(fn: Callable[..., PyTree]) -> Callable[..., PyTree]:
    """``fn`` with its convolutions in the dimension order of XLA CPU's convolution library.

    The same numbers: each ``conv_general_dilated`` of ``fn`` (also inside nested ``jit``) is
    bound on operands transposed to (batch, spatial..., feature) and (spatial..., in, out),
    and its result transposed back, exactly as XLA's CPU compiler does in a program's top
    level. Other backends choose layouts themselves; there ``fn`` is returned unchanged.
    """
    if jax.default_backend() != "cpu":
        return fn

    def wrapped(*args):
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        out = _evaluate(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), out)

    return wrapped


#: Calls whose bodies are evaluated in place (``jit_p`` was ``pjit_p`` in older JAX).
_INLINED_CALLS = tuple(
    getattr(jax_primitives, name)
    for name in ("jit_p", "pjit_p", "closed_call_p")
    if hasattr(jax_primitives, name)
)


def _evaluate(jaxpr, consts, args) -> list:
    """The jaxpr's outputs, convolutions bound by :func:`_library_convolution`."""
    env = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        ins = [v.val if isinstance(v, jax_core.Literal) else env[v] for v in eqn.invars]
        if eqn.primitive is jax_primitives.conv_general_dilated_p:
            outs = [_library_convolution(*ins, **eqn.params)]
        elif eqn.primitive in _INLINED_CALLS:
            inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            outs = _evaluate(inner.jaxpr, inner.consts, ins)
        else:
            bound = eqn.primitive.get_bind_params(eqn.params)
            subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
            outs = eqn.primitive.bind(*subfuns, *ins, **params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [v.val if isinstance(v, jax_core.Literal) else env[v] for v in jaxpr.outvars]


def _library_convolution(lhs, rhs, *, dimension_numbers, **params) -> jax.Array:
    """One convolution on (batch, spatial..., feature) × (spatial..., in, out) operands."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    d = len(lhs_spec)
    image = (0, d - 1, *range(1, d - 1))
    library = jax.lax.ConvDimensionNumbers(image, (d - 1, d - 2, *range(d - 2)), image)
    if tuple(dimension_numbers) == tuple(library):
        return jax_primitives.conv_general_dilated_p.bind(
            lhs, rhs, dimension_numbers=dimension_numbers, **params
        )
    out = jax_primitives.conv_general_dilated_p.bind(
        jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])),
        jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])),
        dimension_numbers=library,
        **params,
    )
    order = (out_spec[0], *out_spec[2:], out_spec[1])
    return jnp.transpose(out, [order.index(k) for k in range(d)])


def _widen(a: jax.Array) -> jax.Array:
    """Half-precision floats in float32 (the running sum over chunks), others unchanged."""
    a = jnp.asarray(a)
    if jnp.issubdtype(a.dtype, jnp.floating) and jnp.finfo(a.dtype).bits < 32:
        return a.astype(jnp.float32)
    return a


def sum_examples(
    fn: Callable[[PyTree], PyTree], batch: PyTree, *, chunk_size: int | None = None
) -> PyTree:
    """Σ_p fn(example_p), vectorised within a chunk, chunked across.

    Args:
      fn: maps ONE example (a pytree like ``batch`` without the leading axis) to a pytree.
      batch: the examples.
      chunk_size: examples per chunk (``None``: all at once).
    """

    def chunk_fn(chunk, mask, index):
        del index
        out = jax.vmap(fn)(chunk)
        return jax.tree_util.tree_map(
            lambda a: jnp.sum(jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0), 0),
            out,
        )

    return sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size)


def map_examples(
    fn: Callable[[PyTree], PyTree], batch: PyTree, *, chunk_size: int | None = None
) -> PyTree:
    """``fn`` applied to every example, stacked along a leading axis of size n.

    The output is O(n) by nature; ``chunk_size`` bounds the intermediate memory of ``fn``:
    ``floor(n / chunk_size)`` full chunks in a loop (convolutions as in
    :func:`sum_over_chunks`), the remaining examples in one more vectorised call.
    """
    n = checks.num_examples(batch)
    checks.check_chunk_size(chunk_size)
    if chunk_size is None or chunk_size >= n:
        return jax.vmap(fn)(batch)
    full = n - n % chunk_size
    chunks = jax.tree_util.tree_map(lambda a: a[:full].reshape(-1, chunk_size, *a.shape[1:]), batch)
    out = jax.lax.map(_library_convolutions(jax.vmap(fn)), chunks)
    out = jax.tree_util.tree_map(lambda a: a.reshape(full, *a.shape[2:]), out)
    if full == n:
        return out
    rest = jax.vmap(fn)(jax.tree_util.tree_map(lambda a: a[full:], batch))
    return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), out, rest)


def per_example_losses(
    objective: Objective, params: PyTree, batch: Batch, *, chunk_size: int | None = None
) -> jax.Array:
    """ℓ_p(θ) for every example, shape ``(n,)``."""
    return map_examples(
        lambda ex: objective.example_loss(params, *ex), batch, chunk_size=chunk_size
    )


def per_example_grads(
    objective: Objective, params: PyTree, batch: Batch, *, chunk_size: int | None = None
) -> PyTree:
    """g_p = ∇_θ ℓ_p(θ) for every example: params' structure with a leading axis n.

    This stores n × P numbers; prefer the operators (which never store them) when only
    products with C or the empirical Fisher are needed.
    """
    checks.check_params(params)
    grad = jax.grad(objective.example_loss)
    return map_examples(lambda ex: grad(params, *ex), batch, chunk_size=chunk_size)


def example_hvp(objective: Objective, params: PyTree, x, y, v: PyTree) -> PyTree:
    """h_p v for one example, forward-over-reverse: ∂/∂ε ∇ℓ(θ + εv; x, y) at ε = 0."""
    return jax.jvp(lambda p: jax.grad(objective.example_loss)(p, x, y), (params,), (v,))[1]


def per_example_hvps(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    v: PyTree,
    *,
    chunk_size: int | None = None,
) -> PyTree:
    """h_p v for every example (h_p = ∇²ℓ_p): params' structure with a leading axis n."""
    checks.check_params(params)
    checks.check_vector(v, params)
    return map_examples(
        lambda ex: example_hvp(objective, params, *ex, v), batch, chunk_size=chunk_size
    )


def per_example_jacobians(
    predict: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    inputs: PyTree,
    *,
    chunk_size: int | None = None,
) -> PyTree:
    """J_p = ∂ predict(θ, x_p) / ∂θ: params' structure with leading axes ``(n, K)``.

    Dense in P per example; for small models and references.
    """
    checks.check_params(params)
    jac = jax.jacrev(predict)
    return map_examples(lambda x: jac(params, x), inputs, chunk_size=chunk_size)
