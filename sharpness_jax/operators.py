"""Exact matrix-free curvature products.

Each constructor takes ``(objective, params, batch)`` and returns ``matvec: v -> A v`` over
pytrees shaped like ``params``. Every matrix is normalised as a MEAN over the n examples of
the batch. No product samples anything except :func:`fisher_monte_carlo`, whose randomness is
fixed by its key (so it is one fixed PSD matrix).

Notation: ℓ_p(θ) = loss(f_p, y_p) with f_p = predict(θ, x_p) ∈ R^K; g_p = ∇ℓ_p;
h_p = ∇²ℓ_p; J_p = ∂f_p/∂θ (K × P); r_p = ∇_f loss(f_p, y_p); Λ_p = ∇²_f loss(f_p, y_p);
ḡ = (1/n) Σ_p g_p.

==========================  ===============================================================
constructor                 matvec
==========================  ===============================================================
hessian                     H v = (1/n) Σ_p h_p v            (forward-over-reverse)
ggn                         G v = (1/n) Σ_p J_pᵀ Λ_p J_p v
fisher                      F v = (1/n) Σ_p J_pᵀ B_p B_pᵀ J_p v, F_out = B Bᵀ   (exact)
fisher_monte_carlo          F̂ v = (1/n) Σ_p (1/S) Σ_s J_pᵀ r̂_ps r̂_psᵀ J_p v, ŷ_ps ∼ p(·|f_p)
empirical_fisher            F_emp v = (1/n) Σ_p g_p g_pᵀ v
gradient_covariance         C v = (1/n) Σ_p (g_p − ḡ)(g_p − ḡ)ᵀ v
hessian_second_moment       E_p[h_p²] v = (1/n) Σ_p h_p (h_p v)
jacobian_vp / jacobian_tvp  v -> (J_p v)_p (shape (n, K));  u -> Σ_p J_pᵀ u_p
==========================  ===============================================================

Every constructor takes ``chunk_size`` (memory is bounded by it, see
:mod:`sharpness_jax.per_example`) and ``subset`` (restrict to some parameter leaves, see
:mod:`sharpness_jax.subsets`; vectors are then ``{path: leaf}`` dicts of the subset and the
result is the diagonal block of the full matrix).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sharpness_jax import checks, dense_factors, subsets
from sharpness_jax.linear_operator import Operator
from sharpness_jax.objective import Batch, Objective, output_inner
from sharpness_jax.per_example import example_hvp, map_examples, sum_over_chunks

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

SECOND_MOMENT_METHODS = ("auto", "factored", "per_example")

__all__ = [
    "empirical_fisher",
    "fisher",
    "fisher_monte_carlo",
    "ggn",
    "gradient",
    "gradient_covariance",
    "hessian",
    "hessian_second_moment",
    "jacobian_tvp",
    "jacobian_vp",
    "loss_value",
    "prepare",
]


def prepare(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None,
    subset: subsets.Selector | None = None,
) -> tuple[Objective, PyTree, int]:
    """Validates the inputs and applies the subset restriction.

    Besides shapes and dtypes, the values are checked (:func:`checks.check_values`: no NaN or
    Inf in params, inputs or targets; class labels in [0, K)) unless they are tracers or the
    call runs inside ``checks.validation(False)``.

    Returns:
      ``(objective, params, n)`` where objective/params are restricted when ``subset`` is set.

    Raises:
      ValueError / TypeError: on a malformed batch, non-float params, a bad chunk size,
        non-finite values or out-of-range labels.
    """
    batch = _as_batch(batch)
    checks.check_params(params)
    checks.check_chunk_size(chunk_size)
    n = checks.num_examples(batch)
    classes = functools.partial(objective.label_classes, params, batch.inputs)
    checks.check_values(params, batch.inputs, batch.targets, num_classes=classes)
    if subset is not None:
        objective, params = subsets.restrict(objective, params, subset)
    return objective, params, n


def _scale(tree: PyTree, s: float) -> PyTree:
    return jax.tree_util.tree_map(lambda a: a * s, tree)


def _masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, values, 0))


def _freeze(subset: subsets.Selector | None):
    """A hashable form of a selector (strings and sequences of them; a predicate as is)."""
    if subset is None or isinstance(subset, str) or callable(subset):
        return subset
    return tuple(subset)


@dataclasses.dataclass(frozen=True)
class _Product:
    """The static half of a curvature operator: which product, how.

    ``product(objective, params, batch, v, *extra, chunk_size=..., **settings)`` is a
    module-level function. The objective is an operand (a pytree: the arrays its ``predict``
    binds, such as batch-norm statistics, are leaves, its functions static), and it is
    restricted to ``subset`` inside the trace, so the full parameters stay an operand rather
    than a constant of a closure.
    """

    product: Callable[..., PyTree]
    subset: Any
    chunk_size: int | None
    settings: tuple = ()

    def __repr__(self) -> str:
        name = self.product.__name__.strip("_").removesuffix("_product")
        options = ", ".join(f"{k}={v!r}" for k, v in self.settings if k != "layout")
        subset = "" if self.subset is None else f", subset={self.subset!r}"
        return f"{name}(chunk_size={self.chunk_size}{subset}{', ' if options else ''}{options})"

    def restricted(self, objective: Objective, params: PyTree) -> tuple[Objective, PyTree]:
        if self.subset is None:
            return objective, params
        return subsets.restrict(objective, params, self.subset)

    def __call__(self, operands, v):
        objective, params, batch, extra = operands
        objective, params = self.restricted(objective, params)
        fix = f"; pass the template sj.subsets.select(params, {self.subset!r}), not params"
        checks.check_vector(v, params, hint="" if self.subset is None else fix)
        return self.product(
            objective, params, batch, v, *extra, chunk_size=self.chunk_size, **dict(self.settings)
        )


def _build(
    product: Callable[..., PyTree],
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None,
    subset: subsets.Selector | None,
    extra: tuple = (),
    **settings: Any,
) -> Operator:
    """Validates the inputs and returns the operator ``v -> product(..., v)`` (a pytree)."""
    batch = _as_batch(batch)
    prepare(objective, params, batch, chunk_size=chunk_size, subset=subset)
    rule = _Product(product, _freeze(subset), chunk_size, tuple(sorted(settings.items())))
    return Operator(rule, (objective, params, batch, tuple(extra)))


def _as_batch(batch) -> Batch:
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, tuple) and len(batch) == 2:
        return Batch(*batch)
    raise TypeError(f"batch must be a Batch(inputs, targets), got {type(batch).__name__}")


@functools.partial(jax.jit, static_argnames=("rule",))
def _reduce(rule: _Product, objective: Objective, params: PyTree, batch: Batch) -> PyTree:
    objective, params = rule.restricted(objective, params)
    return rule.product(objective, params, batch, chunk_size=rule.chunk_size)


def _mean_loss(objective, params, batch, *, chunk_size):
    def chunk_fn(chunk, mask, index):
        del index
        return _masked_sum(objective.batch_losses(params, Batch(*chunk)), mask)

    return sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size) / checks.num_examples(batch)


def _mean_gradient(objective, params, batch, *, chunk_size):
    def chunk_fn(chunk, mask, index):
        del index
        return jax.grad(lambda p: _masked_sum(objective.batch_losses(p, Batch(*chunk)), mask))(
            params
        )

    n = checks.num_examples(batch)
    return _scale(sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size), 1.0 / n)


def _evaluate(product, objective, params, batch, *, chunk_size, subset):
    batch = _as_batch(batch)
    prepare(objective, params, batch, chunk_size=chunk_size, subset=subset)
    rule = _Product(product, _freeze(subset), chunk_size)
    return _reduce(rule, objective, params, batch)


def loss_value(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> jax.Array:
    """L(θ) = (1/n) Σ_p ℓ_p(θ) (compiled once per objective and shapes)."""
    return _evaluate(_mean_loss, objective, params, batch, chunk_size=chunk_size, subset=subset)


def gradient(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> PyTree:
    """ḡ = ∇L(θ) = (1/n) Σ_p g_p (compiled once per objective and shapes)."""
    return _evaluate(_mean_gradient, objective, params, batch, chunk_size=chunk_size, subset=subset)


def _hessian_product(objective, params, batch, v, *, chunk_size, method):
    def chunk_fn(chunk, mask, index):
        del index

        def chunk_loss(p):
            return _masked_sum(objective.batch_losses(p, Batch(*chunk)), mask)

        if method == "fwd_rev":
            return jax.jvp(jax.grad(chunk_loss), (params,), (v,))[1]
        return jax.grad(lambda p: optax.tree.vdot(jax.grad(chunk_loss)(p), v))(params)

    n = checks.num_examples(batch)
    return _scale(sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size), 1.0 / n)


def hessian(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    method: str = "fwd_rev",
) -> Operator:
    """H v = (1/n) Σ_p ∇²ℓ_p(θ) v.

    Args:
      objective, params, batch: the mean loss and where to take its Hessian.
      chunk_size: examples per chunk.
      subset: restrict to these parameter leaves (the diagonal block of H).
      method: ``"fwd_rev"`` (jvp of the gradient, the fast default) or ``"rev_rev"``
        (gradient of ⟨∇L, v⟩, for cross-checks).

    Returns:
      The operator ``v -> H v`` (a pytree, see :mod:`sharpness_jax.linear_operator`).
    """
    if method not in ("fwd_rev", "rev_rev"):
        raise ValueError(f"method must be 'fwd_rev' or 'rev_rev', got {method!r}")
    return _build(
        _hessian_product,
        objective,
        params,
        batch,
        chunk_size=chunk_size,
        subset=subset,
        method=method,
    )


def _sandwich(objective, params, batch, v, chunk_size, middle) -> PyTree:
    """(1/n) Σ_p J_pᵀ u_p with u_p = middle(f_p, y_p, J_p v, p) (vectorised over p).

    One linearisation of the chunk's outputs gives J v and, transposed, Jᵀ u: about the cost
    of one forward and one backward pass per chunk.
    """

    def chunk_fn(chunk, mask, index):
        inputs, targets = chunk
        outputs, f_jvp = jax.linearize(lambda p: objective.batch_outputs(p, inputs), params)
        u = middle(outputs, targets, f_jvp(v), index)
        u = jnp.where(mask.reshape((-1,) + (1,) * (u.ndim - 1)), u, 0)
        return jax.linear_transpose(f_jvp, params)(u)[0]

    n = checks.num_examples(batch)
    return _scale(sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size), 1.0 / n)


def _ggn_product(objective, params, batch, v, *, chunk_size):
    def middle(outputs, targets, jv, index):
        del index
        return objective.output_hessian_products(outputs, targets, jv)

    return _sandwich(objective, params, batch, v, chunk_size, middle)


def _fisher_product(objective, params, batch, v, *, chunk_size):
    def middle(outputs, targets, jv, index):
        del index
        return objective.output_fisher_products(outputs, jv, targets)

    return _sandwich(objective, params, batch, v, chunk_size, middle)


def _fisher_monte_carlo_product(objective, params, batch, v, key, *, chunk_size, num_samples):
    def middle(outputs, targets, jv, index):
        def per_example(f, y, t, i):
            keys = jax.random.split(jax.random.fold_in(key, i), num_samples)
            r = objective.sampled_output_grads(keys, f, y)  # (S, *f.shape)
            return jnp.tensordot(output_inner(r, t[None]), r, axes=1) / num_samples

        return jax.vmap(per_example)(outputs, targets, jv, index)

    return _sandwich(objective, params, batch, v, chunk_size, middle)


def _empirical_fisher_product(objective, params, batch, v, *, chunk_size):
    def middle(outputs, targets, jv, index):
        del index
        r = objective.output_grads(outputs, targets)
        return r * output_inner(r, jv).reshape((-1,) + (1,) * (r.ndim - 1))

    return _sandwich(objective, params, batch, v, chunk_size, middle)


def ggn(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> Operator:
    """Generalised Gauss–Newton G v = (1/n) Σ_p J_pᵀ Λ_p J_p v, Λ_p = ∇²_f loss(f_p, y_p)."""
    return _build(_ggn_product, objective, params, batch, chunk_size=chunk_size, subset=subset)


def fisher(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> Operator:
    """True Fisher F v = (1/n) Σ_p J_pᵀ F_out(f_p) J_p v, exactly.

    F_out(f) = E_{ŷ∼p(·|f)}[∇_f log p(ŷ|f) ∇_f log p(ŷ|f)ᵀ] = B(f) B(f)ᵀ is applied through
    the loss's closed-form factor B; no targets are sampled. Equals the GGN for softmax
    cross-entropy and squared error. A loss without ``output_fisher_factor`` is refused.
    """
    if getattr(objective.loss, "output_fisher_product", None) is None:
        objective.predictive("output_fisher_factor", "the true Fisher (sj.fisher)")
    return _build(_fisher_product, objective, params, batch, chunk_size=chunk_size, subset=subset)


def fisher_monte_carlo(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    key: jax.Array,
    num_samples: int = 1,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> Operator:
    """Monte-Carlo Fisher F̂ v = (1/n) Σ_p (1/S) Σ_s J_pᵀ r̂_ps (r̂_psᵀ J_p v).

    r̂_ps = ∇_f(−log p(ŷ_ps | f_p)) at targets ŷ_ps drawn from the model's predictive
    distribution. The draws depend only on (key, example index, s), so F̂ is the same matrix
    for every matvec and for every ``chunk_size``. E[F̂] = F (the true Fisher).

    Args:
      key: PRNG key fixing the sampled targets (an operand: another key reuses the program).
      num_samples: S, targets drawn per example.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    objective.predictive("sample_output_grad", "the Monte-Carlo Fisher (sj.fisher_monte_carlo)")
    return _build(
        _fisher_monte_carlo_product,
        objective,
        params,
        batch,
        chunk_size=chunk_size,
        subset=subset,
        extra=(key,),
        num_samples=num_samples,
    )


def empirical_fisher(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
) -> Operator:
    """Empirical Fisher F_emp v = (1/n) Σ_p g_p (g_pᵀ v); g_p = J_pᵀ r_p is never stored."""
    return _build(
        _empirical_fisher_product, objective, params, batch, chunk_size=chunk_size, subset=subset
    )


def _covariance_product(objective, params, batch, v, g_bar, *, chunk_size):
    gv = optax.tree.vdot(g_bar, v)

    def chunk_fn(chunk, mask, index):
        del index
        inputs, targets = chunk
        outputs, f_jvp = jax.linearize(lambda p: objective.batch_outputs(p, inputs), params)
        r = objective.output_grads(outputs, targets)
        centred = jnp.where(mask, output_inner(r, f_jvp(v)) - gv, 0)
        scale = centred.reshape((-1,) + (1,) * (r.ndim - 1))
        back = jax.linear_transpose(f_jvp, params)(r * scale)[0]
        return back, jnp.sum(centred)

    n = checks.num_examples(batch)
    back, total = sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size)
    return jax.tree_util.tree_map(lambda b, g: (b - g * total) / n, back, g_bar)


def gradient_covariance(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    mean_gradient: PyTree | None = None,
) -> Operator:
    """SGD-noise covariance C v = (1/n) Σ_p (g_p − ḡ)(g_p − ḡ)ᵀ v, exactly.

    The per-example directional derivatives s_p = g_pᵀ v (a JVP) are centred by ḡᵀv before the
    VJP, C v = (1/n) Σ_p g_p (s_p − ḡᵀv) − ḡ (1/n) Σ_p (s_p − ḡᵀv), so no per-example
    gradient is stored and no F_emp − ḡḡᵀ cancellation occurs. The mini-batch gradient
    covariance is C/B (with replacement) or C (n−B)/(B(n−1)) (without); see
    ``sharpness_jax.noise``.

    Args:
      mean_gradient: ḡ if already at hand (shaped like the, possibly restricted, params);
        otherwise it is computed once, here (one gradient pass).
    """
    _, sub, _ = prepare(objective, params, batch, chunk_size=chunk_size, subset=subset)
    if mean_gradient is None:
        g_bar = gradient(objective, params, batch, chunk_size=chunk_size, subset=subset)
    else:
        checks.check_vector(mean_gradient, sub, name="mean_gradient")
        g_bar = mean_gradient
    return _build(
        _covariance_product,
        objective,
        params,
        batch,
        chunk_size=chunk_size,
        subset=subset,
        extra=(g_bar,),
    )


def _second_moment_product(objective, params, batch, v, *, chunk_size, layout):
    if layout is not None:
        matvec = dense_factors.second_moment_matvec(
            objective, params, batch, layout, chunk_size=chunk_size
        )
        return matvec(v)

    def chunk_fn(chunk, mask, index):
        del index

        def one(x, y, keep):
            hv = example_hvp(objective, params, x, y, v)
            hhv = example_hvp(objective, params, x, y, hv)
            return jax.tree_util.tree_map(lambda a: jnp.where(keep, a, 0), hhv)

        per = jax.vmap(one)(*chunk, mask)
        return jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), per)

    n = checks.num_examples(batch)
    return _scale(sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size), 1.0 / n)


def hessian_second_moment(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    subset: subsets.Selector | None = None,
    method: str = "auto",
) -> Operator:
    """E_p[h_p²] v = (1/n) Σ_p h_p (h_p v), exactly.

    Two routes give the same matrix:

    * ``"factored"``: when every free parameter is the kernel or bias of a flax
      ``nn.Dense`` layer (MLPs, or the dense layers of any flax model under ``subset``),
      h_p v is kept per layer as the factors of a rank-2 matrix and the second product is
      one batched forward-over-reverse pass (:mod:`sharpness_jax.dense_factors`): about two
      Hessian-vector products. Memory per chunk: ``chunk_size`` × the layers' widths.
    * ``"per_example"``: any model; two per-example HVPs per example. Memory per chunk:
      ``chunk_size`` × P (the products h_p v).

    ``"auto"`` (default) takes the factored route when it applies.

    Raises:
      ValueError: for an unknown method, or ``"factored"`` on a model it does not apply to
        (the message says why).
    """
    if method not in SECOND_MOMENT_METHODS:
        raise ValueError(
            f"unknown E_p[h_p²] method {method!r}; choose one of {SECOND_MOMENT_METHODS}"
        )
    batch = _as_batch(batch)
    restricted, sub, _ = prepare(objective, params, batch, chunk_size=chunk_size, subset=subset)
    layout = None
    if method != "per_example":
        example = jax.tree_util.tree_map(lambda a: a[0], batch[0])
        found = dense_factors.dense_layout(restricted, sub, example)
        if found.applicable or method == "factored":
            if not found.applicable:
                raise ValueError(f"the factored E_p[h_p²] route does not apply: {found.reason}")
            layout = found
    return _build(
        _second_moment_product,
        objective,
        params,
        batch,
        chunk_size=chunk_size,
        subset=subset,
        layout=layout,
    )


def jacobian_vp(
    predict: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    inputs: PyTree,
    *,
    chunk_size: int | None = None,
) -> Callable[[PyTree], jax.Array]:
    """v -> (J_p v)_p, the change of every example's outputs along v; shape ``(n, K)``."""
    checks.check_params(params)
    checks.num_examples(inputs)

    def matvec(v):
        checks.check_vector(v, params)

        def one(x):
            return jax.jvp(lambda p: predict(p, x), (params,), (v,))[1]

        return map_examples(one, inputs, chunk_size=chunk_size)

    return matvec


def jacobian_tvp(
    predict: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    inputs: PyTree,
    *,
    chunk_size: int | None = None,
) -> Callable[[jax.Array], PyTree]:
    """u -> Σ_p J_pᵀ u_p for output cotangents u of shape ``(n, K)`` (a SUM over examples)."""
    checks.check_params(params)
    n = checks.num_examples(inputs)

    def rmatvec(u):
        if jnp.shape(u)[:1] != (n,):
            raise ValueError(f"cotangents need a leading axis of n={n}, got shape {jnp.shape(u)}")

        def chunk_fn(chunk, mask, index):
            del index
            x, uc = chunk
            _, vjp = jax.vjp(lambda p: jax.vmap(predict, (None, 0))(p, x), params)
            return vjp(jnp.where(mask.reshape((-1,) + (1,) * (uc.ndim - 1)), uc, 0))[0]

        return sum_over_chunks(chunk_fn, (inputs, u), chunk_size=chunk_size)

    return rmatvec
