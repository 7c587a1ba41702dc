"""E_p[h_p²] products for networks of dense layers, with h_p v kept in factored form.

For a flax ``nn.Dense`` layer z = a W + b applied to one example (input a ∈ R^{T×d} over T
positions; T = 1 for a vector), the example's gradient is ∇_W ℓ_p = aᵀδ and ∇_b ℓ_p = Σ_t δ_t,
with δ = ∂ℓ_p/∂z ∈ R^{T×m}. Its derivative along a direction v is therefore

    (h_p v)_W = ȧᵀδ + aᵀδ̇ = [ȧ; a]ᵀ [δ; δ̇]   (rank ≤ 2T),      (h_p v)_b = Σ_t δ̇_t,

where ȧ and δ̇ are the tangents of a and δ along v. Two passes give E_p[h_p²] v exactly:

1. One batched forward-over-reverse pass with a zero perturbation e added to every layer's
   output: ∂/∂e of the summed loss is every example's δ, the tangents along v give ȧ and δ̇.
   No per-example parameter-sized vector is formed: the factors hold O(T(d + m)) numbers per
   example and layer.
2. Σ_p h_p u_p with u_p = h_p v equals ∂/∂s ∇_θ Σ_p ℓ_p(θ + s u_p) at s = 0. A per-example
   shift of W by s [ȧ; a]ᵀ[δ; δ̇] enters the forward pass as z += s (a [ȧ; a]ᵀ)[δ; δ̇] (the
   backward pass picks up its transpose by autodiff), and a bias shift as z += s Σ_t δ̇_t; the
   gradient with respect to the shared θ then sums over examples inside the weight-gradient
   matrix products, as for an ordinary Hessian-vector product.

The squared norms ‖h_p v‖² (for v_iᵀE_p[h_p²]v_i and, with v = e_i, the diagonal of
E_p[h_p²]) need only the first pass: ‖[ȧ; a]ᵀ[δ; δ̇]‖_F² = Σ_{st} (G_a)_{st} (G_δ)_{st} with
the 2T × 2T Gram matrices G_a = [ȧ; a][ȧ; a]ᵀ and G_δ = [δ; δ̇][δ; δ̇]ᵀ, plus ‖Σ_t δ̇_t‖²
for the bias (:func:`example_hvp_sq_norms`).

The cost is about two Hessian-vector products instead of n per-example ones. It applies when
every free parameter leaf is the kernel or the bias of exactly one ``flax.linen.Dense`` call in
``objective.predict`` (MLPs; also the dense layers of any flax model when the others are frozen
by a subset restriction); :func:`dense_layout` checks this by tracing ``predict`` once with
``flax.linen.intercept_methods``. Layers run by lifted transforms (``nn.scan``, ``nn.vmap``) or
with boxed parameters are not recognised, and a parameter that ``predict`` also uses outside
its Dense layer is not detected, which would make the result wrong; the zoo's models use
neither.

The same interception gives every Dense call's input a and output-gradient (∂f/∂z)ᵀ u of one
example (:func:`dense_call_vjp`); :mod:`sharpness_jax.kfac` builds its Kronecker factors on it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sharpness_jax import checks
from sharpness_jax.objective import Batch, Objective
from sharpness_jax.per_example import sum_over_chunks

PyTree = Any

__all__ = [
    "DenseLayout",
    "dense_call_vjp",
    "dense_layout",
    "example_hvp_sq_norms",
    "layer_signals",
    "second_moment_matvec",
]


@dataclasses.dataclass(frozen=True)
class _Call:
    """One ``nn.Dense`` call of one example's forward pass."""

    kernel: int | None  # index of its kernel among the free leaves (None: frozen)
    bias: int | None  # index of its bias among the free leaves (None: frozen or absent)
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    @property
    def positions(self) -> int:
        return math.prod(self.input_shape[:-1])


@dataclasses.dataclass(frozen=True)
class DenseLayout:
    """The Dense calls of ``predict`` in call order, or why the factored route does not apply."""

    calls: tuple[_Call, ...]
    reason: str | None = None

    @property
    def applicable(self) -> bool:
        return self.reason is None


def _is_dense_call(context) -> bool:
    return isinstance(context.module, nn.Dense) and context.method_name == "__call__"


def _inputs_of(args, kwargs):
    return args[0] if args else kwargs["inputs"]


def dense_layout(objective: Objective, params: PyTree, example_input: PyTree) -> DenseLayout:
    """Finds the Dense calls of ``objective.predict`` by tracing it once on one example.

    Args:
      objective: the (possibly subset-restricted) objective.
      params: its free parameters.
      example_input: one example (no batch axis); only its shape and dtype are used.

    Returns:
      The :class:`DenseLayout`; ``reason`` says why the factored route does not apply.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    calls: list[_Call] = []
    failure: list[str] = []

    def trace(leaves, x):
        index = {id(leaf): k for k, leaf in enumerate(leaves)}
        tree = jax.tree_util.tree_unflatten(treedef, leaves)

        def interceptor(next_fun, args, kwargs, context):
            if not _is_dense_call(context):
                return next_fun(*args, **kwargs)
            module = context.module
            kernel = module.get_variable("params", "kernel")
            bias = module.get_variable("params", "bias") if module.use_bias else None
            inputs = _inputs_of(args, kwargs)
            out = next_fun(*args, **kwargs)
            if jnp.ndim(inputs) < 1 or jnp.ndim(kernel) != 2 or out.shape[-1] != kernel.shape[1]:
                failure.append(f"a Dense call at {module.path} is not x·W + b on one example")
            calls.append(
                _Call(
                    kernel=index.get(id(kernel)),
                    bias=None if bias is None else index.get(id(bias)),
                    input_shape=tuple(jnp.shape(inputs)),
                    output_shape=tuple(out.shape),
                )
            )
            return out

        with nn.intercept_methods(interceptor):
            return objective.predict(tree, x)

    shapes = [jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in leaves]
    x_shape = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), example_input
    )
    try:
        jax.eval_shape(trace, shapes, x_shape)
    except Exception as err:  # any failure here means: take the generic route
        return DenseLayout((), f"tracing predict with Dense interception failed: {err}")
    if failure:
        return DenseLayout(tuple(calls), failure[0])
    used = [k for c in calls for k in (c.kernel, c.bias) if k is not None]
    if len(used) != len(set(used)):
        return DenseLayout(tuple(calls), "a parameter leaf is used by more than one Dense call")
    missing = sorted(set(range(len(leaves))) - set(used))
    if missing:
        return DenseLayout(
            tuple(calls),
            f"{len(missing)} of {len(leaves)} free parameter leaves are not the kernel or bias "
            "of a flax.linen.Dense call",
        )
    return DenseLayout(tuple(calls))


@contextmanager
def _perturbed(perts: list[dict[str, jax.Array]], record: list | None) -> Iterator[None]:
    """Adds ``perts[i]`` to the output of the i-th Dense call; records its input.

    ``perts[i]`` may hold ``e`` (added as is, output-shaped), ``A`` (r × d) and ``B`` (r × m)
    (the kernel shift AᵀB, added as (a Aᵀ) B), and ``c`` (m; the bias shift).
    """
    counter = [0]

    def interceptor(next_fun, args, kwargs, context):
        if not _is_dense_call(context):
            return next_fun(*args, **kwargs)
        i = counter[0]
        counter[0] += 1
        inputs = _inputs_of(args, kwargs)
        out = next_fun(*args, **kwargs)
        if record is not None:
            record.append(inputs)
        pert = perts[i]
        if "e" in pert:
            out = out + pert["e"].astype(out.dtype)
        if "A" in pert:
            flat = inputs.reshape(-1, inputs.shape[-1]).astype(out.dtype)
            shift = (flat @ pert["A"].T.astype(out.dtype)) @ pert["B"].astype(out.dtype)
            out = out + shift.reshape(out.shape)
        if "c" in pert:
            out = out + jnp.broadcast_to(pert["c"].astype(out.dtype), out.shape)
        return out

    with nn.intercept_methods(interceptor):
        yield


def _outputs(
    objective: Objective, params: PyTree, inputs: PyTree, perts: list[dict], record: bool
) -> tuple[jax.Array, list[jax.Array] | None]:
    """Every example's outputs under per-example perturbations (leading axis on ``perts``)."""

    def one(x, pert):
        inputs_seen: list | None = [] if record else None
        with _perturbed(pert, inputs_seen):
            out = objective.predict(params, x)
        return out, inputs_seen

    return jax.vmap(one, in_axes=(0, 0))(inputs, perts)


def dense_call_vjp(
    objective: Objective, params: PyTree, x: PyTree, layout: DenseLayout
) -> tuple[jax.Array, list[jax.Array], Callable[[jax.Array], list[jax.Array]]]:
    """One example's outputs, the inputs of its Dense calls, and the VJP to their outputs.

    With z_l the output of the l-th Dense call of ``objective.predict(params, x)`` (call order
    of ``layout``) and f the model's outputs, returns ``(f, inputs, vjp)``: ``inputs[l]`` is
    the input a_l of call l as the interception sees it, and ``vjp(u)[l]`` = (∂f/∂z_l)ᵀ u, the
    output-gradient of call l for a direction u in output space (shaped like f).

    Args:
      objective, params: the model (already validated and restricted).
      x: ONE example (no batch axis).
      layout: the :class:`DenseLayout` of ``objective`` and ``params``.
    """
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    zeros = [{"e": jnp.zeros(c.output_shape, dtype)} for c in layout.calls]

    def forward(perts):
        seen: list = []
        with _perturbed(perts, seen):
            out = objective.predict(params, x)
        return out, seen

    f, vjp, inputs = jax.vjp(forward, zeros, has_aux=True)
    return f, inputs, lambda u: [g["e"] for g in vjp(u)[0]]


def _masked_loss_sum(
    objective: Objective, params: PyTree, chunk: Batch, mask: jax.Array, perts: list, record: bool
) -> tuple[jax.Array, list[jax.Array] | None]:
    """Σ_p ℓ_p over the real examples of a chunk under per-example Dense perturbations."""
    inputs, targets = chunk
    outputs, seen = _outputs(objective, params, inputs, perts, record)
    losses = jax.vmap(objective.loss)(outputs, targets)
    return jnp.sum(jnp.where(mask, losses, 0)), seen


def layer_signals(
    objective: Objective, params: PyTree, chunk: Batch, mask: jax.Array, layout: DenseLayout
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Every Dense call's inputs a and output-gradients δ = ∂ℓ_p/∂z for a chunk of examples.

    One batched backward pass with a zero perturbation added to every Dense output: its
    gradient is every example's δ, and the interception records the inputs on the way.

    Args:
      objective, params: the model (already validated and restricted).
      chunk: a :class:`Batch` of c examples.
      mask: ``(c,)`` bool, False on padding (whose δ is then zero; its a is not masked).
      layout: an applicable :class:`DenseLayout` of ``objective`` and ``params``.

    Returns:
      ``(acts, deltas)`` in call order: ``acts[l]`` of shape ``(c, *input_shape)`` and
      ``deltas[l]`` of shape ``(c, *output_shape)``.
    """
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    size = mask.shape[0]
    zeros = [{"e": jnp.zeros((size, *c.output_shape), dtype)} for c in layout.calls]
    grad_e, seen = jax.grad(
        lambda perts: _masked_loss_sum(objective, params, chunk, mask, perts, True), has_aux=True
    )(zeros)
    return seen, [g["e"] for g in grad_e]


def second_moment_matvec(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    layout: DenseLayout,
    *,
    chunk_size: int | None,
) -> Callable[[PyTree], PyTree]:
    """v -> E_p[h_p²] v = (1/n) Σ_p h_p (h_p v) through the factored per-example products.

    Args:
      objective, params, batch: as in :func:`sharpness_jax.operators.hessian_second_moment`
        (already validated and restricted).
      layout: an applicable :class:`DenseLayout` of ``objective`` and ``params``.
      chunk_size: examples per chunk; memory is O(chunk_size · Σ_layers T (d + m)).
    """
    if not layout.applicable:
        raise ValueError(f"the factored E_p[h_p²] route does not apply: {layout.reason}")
    n = checks.num_examples(batch)
    calls = layout.calls
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))

    def loss_sum(theta, chunk, mask, perts, record):
        return _masked_loss_sum(objective, theta, chunk, mask, perts, record)

    def matvec(v):
        def chunk_fn(chunk, mask, index):
            del index
            size = mask.shape[0]

            def signals(theta):
                return layer_signals(objective, theta, chunk, mask, layout)

            (acts, deltas), (acts_dot, deltas_dot) = jax.jvp(signals, (params,), (v,))

            shifts = []
            for c, a, a_dot, d, d_dot in zip(
                calls, acts, acts_dot, deltas, deltas_dot, strict=True
            ):
                shift = {}
                t = c.positions
                if c.kernel is not None:
                    a2 = jnp.concatenate(
                        [a_dot.reshape(size, t, -1), a.reshape(size, t, -1)], axis=1
                    )
                    d2 = jnp.concatenate([d.reshape(size, t, -1), d_dot.reshape(size, t, -1)], 1)
                    shift["A"], shift["B"] = a2, d2
                if c.bias is not None:
                    shift["c"] = jnp.sum(d_dot.reshape(size, t, -1), axis=1)
                shifts.append(shift)

            def grad_at(s):
                scaled = [
                    {k: (x * s.astype(x.dtype) if k in ("A", "c") else x) for k, x in shift.items()}
                    for shift in shifts
                ]
                return jax.grad(lambda theta: loss_sum(theta, chunk, mask, scaled, False)[0])(
                    params
                )

            one = jnp.ones((), dtype)
            return jax.jvp(grad_at, (jnp.zeros((), dtype),), (one,))[1]

        total = sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size)
        return jax.tree_util.tree_map(lambda a: a / n, total)

    return matvec


def example_hvp_sq_norms(
    objective: Objective,
    params: PyTree,
    chunk: Batch,
    mask: jax.Array,
    layout: DenseLayout,
    v: PyTree,
) -> jax.Array:
    """‖h_p v‖² for every example p of a chunk, from the factors of h_p v (see above).

    One batched forward-over-reverse pass (the tangent of :func:`layer_signals` along v); per
    Dense call with a free kernel, ‖ȧᵀδ + aᵀδ̇‖_F² from the 2T × 2T Gram matrices of [ȧ; a]
    and [δ; δ̇] (or from the d × m matrix itself when that is smaller), and ‖Σ_t δ̇_t‖² per
    free bias. Exact: the same h_p v as :func:`second_moment_matvec`.

    Args:
      objective, params: the model (already validated and restricted).
      chunk: a :class:`Batch` of c examples; mask: ``(c,)`` bool, False on padding.
      layout: an applicable :class:`DenseLayout` of ``objective`` and ``params``.
      v: a direction shaped like ``params``.

    Returns:
      ``(c,)`` array, 0 on padding.
    """
    if not layout.applicable:
        raise ValueError(f"the factored E_p[h_p²] route does not apply: {layout.reason}")
    size = mask.shape[0]

    def signals(theta):
        return layer_signals(objective, theta, chunk, mask, layout)

    (acts, deltas), (acts_dot, deltas_dot) = jax.jvp(signals, (params,), (v,))
    hi = jax.lax.Precision.HIGHEST
    total = jnp.zeros((size,), jnp.result_type(*jax.tree_util.tree_leaves(params)))
    for c, a, a_dot, d, d_dot in zip(layout.calls, acts, acts_dot, deltas, deltas_dot, strict=True):
        t = c.positions
        d_dot = d_dot.reshape(size, t, -1).astype(total.dtype)
        if c.kernel is not None:
            a2 = jnp.concatenate([a_dot.reshape(size, t, -1), a.reshape(size, t, -1)], 1)
            d2 = jnp.concatenate([d.reshape(size, t, -1).astype(total.dtype), d_dot], 1)
            a2 = a2.astype(total.dtype)
            if 4 * t * t <= a2.shape[-1] * d2.shape[-1]:
                gram_a = jnp.einsum("psd,ptd->pst", a2, a2, precision=hi)
                gram_d = jnp.einsum("psm,ptm->pst", d2, d2, precision=hi)
                total = total + jnp.sum(gram_a * gram_d, axis=(1, 2))
            else:
                rows = jnp.einsum("psd,psm->pdm", a2, d2, precision=hi)
                total = total + jnp.sum(jnp.square(rows), axis=(1, 2))
        if c.bias is not None:
            total = total + jnp.sum(jnp.square(jnp.sum(d_dot, axis=1)), axis=-1)
    return jnp.where(mask, total, 0)
