"""Objectives: a per-example model, a per-example loss, and the batch they average over.

The objective of this library is always the *mean* over examples,

    L(θ) = (1/n) Σ_p ℓ_p(θ),    ℓ_p(θ) = loss(predict(θ, x_p), y_p),

where ``predict(params, x)`` maps ONE example to a vector of outputs (logits or regression
outputs, shape ``(K,)``) and ``loss(outputs, y)`` maps one output vector and one target to a
scalar.

Every loss also knows, in closed form,

* its output-space Hessian Λ(f, y) = ∇²_f loss(f, y) (a ``(K, K)`` matrix), so that
  Gauss–Newton products need no generic second derivative of the loss;
* a factor B(f) of the Fisher information of its predictive distribution in output space,
  F_out(f) = B(f) B(f)ᵀ, so that the true Fisher needs no sampling;
* how to draw a target from its predictive distribution and return the gradient
  ∇_f (−log p(ŷ | f)), for the Monte-Carlo Fisher.

For softmax cross-entropy on logits and for squared error, F_out = Λ, so the true Fisher
equals the Gauss–Newton matrix (a test checks this).

Any other loss works too: a plain callable ``(outputs, y) -> scalar`` (or
:func:`loss_from_function`) gets Λ by autodiff, applied as a Hessian-vector product in
output space, so the Hessian, the GGN, the empirical Fisher and C all work. The true and the
Monte-Carlo Fisher need a predictive distribution p(y | f); asking for them on such a loss is
a ``ValueError`` that says how to give one (a :class:`Loss` with ``output_fisher_factor`` and
``sample_output_grad``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharpness_jax.linear_operator import Static

PyTree = Any

__all__ = [
    "LOSSES",
    "Batch",
    "Loss",
    "Objective",
    "get_loss",
    "loss_from_function",
    "output_inner",
    "softmax_cross_entropy",
    "softmax_squared_error",
    "squared_error",
    "token_cross_entropy",
]


class Batch(NamedTuple):
    """A batch of examples: two pytrees whose leaves share a leading example axis.

    Attributes:
      inputs: model inputs, leading axis n.
      targets: integer class labels of shape ``(n,)`` or real targets of shape ``(n, K)``.
    """

    inputs: PyTree
    targets: PyTree


@dataclasses.dataclass(frozen=True)
class Loss:
    """A per-example loss ``value(f, y) -> scalar`` with its closed-form curvature.

    Only ``name`` and ``value`` are required. Without ``output_hessian``, Λ comes from
    autodiff (as Hessian-vector products in output space) and the outputs may have any
    shape; without ``output_fisher_factor`` / ``sample_output_grad`` the loss has no
    predictive distribution and the true / Monte-Carlo Fisher refuse it.

    Attributes:
      name: a name that says which loss and which normalisation.
      value: ``(outputs (K,), target) -> scalar``.
      output_hessian: ``(outputs, target) -> (K, K)``, Λ = ∇²_f value(f, y), or None.
      output_fisher_factor: ``outputs -> (K, K)`` matrix B with F_out(f) = B Bᵀ, the Fisher
        information of the predictive distribution p(y | f) in output space, or None.
      sample_output_grad: ``(key, outputs) -> (K,)``, the gradient ∇_f(−log p(ŷ | f)) at a
        target ŷ drawn from p(· | f) (its second moment is F_out), or None.
      class_labels: whether integer targets are class indices into the outputs' last axis
        (then they are checked to lie in [0, K) when an operator is built).
      output_hessian_product: ``(outputs, target, t) -> Λ t`` for outputs of any shape (e.g.
        per position of a sequence), used instead of ``output_hessian`` when given.
      output_fisher_product: ``(outputs, target, t) -> F_out t``, used instead of
        ``output_fisher_factor`` when given. It takes the target for its weights (a padding
        mask, the normalisation over positions), never for its labels.
      predictive_takes_target: ``sample_output_grad`` is ``(key, outputs, target)`` (the
        target again for its weights only).
    """

    name: str
    value: Callable[[jax.Array, jax.Array], jax.Array]
    output_hessian: Callable[[jax.Array, jax.Array], jax.Array] | None = None
    output_fisher_factor: Callable[[jax.Array], jax.Array] | None = None
    sample_output_grad: Callable[..., jax.Array] | None = None
    class_labels: bool = True
    output_hessian_product: Callable[[jax.Array, Any, jax.Array], jax.Array] | None = None
    output_fisher_product: Callable[[jax.Array, Any, jax.Array], jax.Array] | None = None
    predictive_takes_target: bool = False

    def __call__(self, outputs: jax.Array, target: jax.Array) -> jax.Array:
        if self.output_hessian is not None:
            _check_outputs(outputs, self.name)
        return self.value(outputs, target)


def loss_from_function(
    fn: Callable[[jax.Array, Any], jax.Array],
    name: str | None = None,
    *,
    class_labels: bool = False,
) -> Loss:
    """A :class:`Loss` from a plain ``(outputs, y) -> scalar``: Λ by autodiff, no Fisher.

    The GGN applies Λ = ∇²_f fn(f, y) as a Hessian-vector product (``jax.jvp`` of
    ``jax.grad(fn)``), never forming it; the outputs may have any shape. The true and the
    Monte-Carlo Fisher raise a ``ValueError`` that says how to supply a predictive
    distribution. An :class:`Objective` accepts ``fn`` itself just as well; this adds a name
    and the label check.

    Args:
      fn: the per-example loss.
      name: its name (default: ``fn.__name__``).
      class_labels: whether integer targets are class indices to check against K.

    Returns:
      The :class:`Loss`.
    """
    return Loss(name or getattr(fn, "__name__", "custom"), fn, class_labels=class_labels)


def _loss_name(loss: Any) -> str:
    return loss.name if isinstance(loss, Loss) else getattr(loss, "__name__", repr(loss))


def _no_predictive(loss: Any, part: str, what: str) -> ValueError:
    kind = "a Loss without it" if isinstance(loss, Loss) else "a plain (f, y) -> scalar callable"
    return ValueError(
        f"{what} needs the predictive distribution p(y | f) of the loss, but loss "
        f"{_loss_name(loss)!r} ({kind}) has no {part}; its Hessian, GGN, empirical Fisher and "
        "C work without one. To supply it, construct the loss as sj.Loss(name, value, "
        "output_fisher_factor=B, sample_output_grad=sample) with B(f) B(f)ᵀ = F_out(f), the "
        "Fisher information of p(y | f) in output space (for the true Fisher), and "
        "sample(key, f) = ∇_f(−log p(ŷ | f)) at a target ŷ drawn from p(· | f) (for the "
        "Monte-Carlo Fisher); sj.softmax_cross_entropy and sj.squared_error carry both."
    )


def _check_outputs(outputs: jax.Array, name: str) -> None:
    if jnp.ndim(outputs) != 1:
        raise ValueError(
            f"loss {name!r} takes the outputs of ONE example, a vector of shape (K,); got shape "
            f"{jnp.shape(outputs)}. Models must return shape (K,) per example (use (1,) for a "
            "scalar output)."
        )


def _as_dense_target(outputs: jax.Array, target: jax.Array) -> jax.Array:
    """Integer class label -> one-hot vector; real target -> itself (shape-checked)."""
    target = jnp.asarray(target)
    if jnp.issubdtype(target.dtype, jnp.integer):
        if target.ndim != 0:
            raise ValueError(f"an integer target must be a scalar label, got shape {target.shape}")
        return jax.nn.one_hot(target, outputs.shape[-1], dtype=outputs.dtype)
    if target.shape != outputs.shape:
        raise ValueError(
            f"a real-valued target must have the outputs' shape {outputs.shape}, got {target.shape}"
        )
    return target.astype(outputs.dtype)


def _shared(factory: Callable[..., Loss]) -> Callable[..., Loss]:
    """``factory`` returning one shared :class:`Loss` per (hashable) arguments: a loss is
    static data of every compiled program, so equal losses must be the same object for two
    objectives built with ``softmax_cross_entropy()`` to share their programs."""
    cached, signature = functools.cache(factory), inspect.signature(factory)

    @functools.wraps(factory)
    def make(*args: Any, **kwargs: Any) -> Loss:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()  # one key however the arguments are spelled
        try:
            return cached(*bound.args)
        except TypeError:  # unhashable arguments: a fresh loss
            return factory(*bound.args)

    return make


@_shared
def softmax_cross_entropy(label_smoothing: float = 0.0) -> Loss:
    """Softmax cross-entropy on logits with integer labels.

    ℓ(f, y) = −Σ_k q_k log softmax(f)_k, with q = (1 − α) onehot(y) + α/K (α = label smoothing).
    Λ = diag(p) − ppᵀ with p = softmax(f) (independent of y and α); F_out = Λ with the factor
    B = diag(√p) − p √pᵀ.

    Args:
      label_smoothing: α in [0, 1).

    Returns:
      The :class:`Loss`.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")

    def value(f, y):
        y = jnp.asarray(y)
        if not jnp.issubdtype(y.dtype, jnp.integer) or y.ndim != 0:
            raise TypeError(
                f"softmax cross-entropy takes a scalar integer label, got dtype {y.dtype} shape "
                f"{y.shape}"
            )
        q = jax.nn.one_hot(y, f.shape[-1], dtype=f.dtype)
        if label_smoothing:
            q = optax.smooth_labels(q, label_smoothing)
        return optax.softmax_cross_entropy(f, q)

    def output_hessian(f, y):
        del y
        p = jax.nn.softmax(f)
        return jnp.diag(p) - jnp.outer(p, p)

    def output_fisher_factor(f):
        p = jax.nn.softmax(f)
        s = jnp.sqrt(p)
        return jnp.diag(s) - jnp.outer(p, s)

    def sample_output_grad(key, f):
        y = jax.random.categorical(key, f)
        return jax.nn.softmax(f) - jax.nn.one_hot(y, f.shape[-1], dtype=f.dtype)

    name = "cross_entropy" if not label_smoothing else f"cross_entropy(smoothing={label_smoothing})"
    return Loss(name, value, output_hessian, output_fisher_factor, sample_output_grad)


@_shared
def squared_error(scale: float = 0.5) -> Loss:
    """Squared error ℓ(f, y) = scale · Σ_k (f_k − y_k)².

    ``scale=0.5`` is the convention of Cohen et al. (½‖f − y‖²); ``scale=1.0`` that of the
    edge-of-stochastic-stability code (‖f − y‖², no ½). The factor matters: it multiplies λ_max.
    Integer targets are one-hot encoded with K = outputs' size.

    The matching likelihood is N(y; f, σ²I) with σ² = 1/(2·scale), so Λ = F_out = 2·scale·I.

    Args:
      scale: the positive factor in front of the sum of squares.

    Returns:
      The :class:`Loss`.
    """
    if not scale > 0:
        raise ValueError(f"squared_error scale must be positive, got {scale}")

    def value(f, y):
        return scale * jnp.sum(jnp.square(f - _as_dense_target(f, y)))

    def output_hessian(f, y):
        del y
        return 2.0 * scale * jnp.eye(f.shape[-1], dtype=f.dtype)

    def output_fisher_factor(f):
        return jnp.sqrt(2.0 * scale) * jnp.eye(f.shape[-1], dtype=f.dtype)

    def sample_output_grad(key, f):
        # ŷ = f + σ ε with σ = (2·scale)^(-1/2); ∇_f scale‖f − ŷ‖² = −2·scale·σ ε.
        eps = jax.random.normal(key, f.shape, f.dtype)
        return -jnp.sqrt(2.0 * scale) * eps

    name = {0.5: "squared_error_half", 1.0: "squared_error_sum"}.get(
        scale, f"squared_error(scale={scale})"
    )
    return Loss(name, value, output_hessian, output_fisher_factor, sample_output_grad)


@_shared
def softmax_squared_error() -> Loss:
    """Squared error on the softmax: ℓ(f, y) = (1/K) Σ_k (softmax(f)_k − y_k)².

    The "mse" of the noise–curvature code (Zhang, Yang & Tu 2026). Integer targets are one-hot
    encoded. With p = softmax(f) and S = ∂p/∂f = diag(p) − ppᵀ, Λ = ∇²_f ℓ is
    (2/K)(S² + Σ_k (p_k − y_k) ∇²p_k): NOT positive semi-definite in general, so the GGN
    Jᵀ Λ J of this loss is not the Fisher. The matching likelihood is N(y; p, (K/2) I), whose
    output Fisher is F_out = (2/K) S² with the factor B = √(2/K) S (positive semi-definite).

    Returns:
      The :class:`Loss`.
    """

    def value(f, y):
        return jnp.mean(jnp.square(jax.nn.softmax(f) - _as_dense_target(f, y)))

    def output_hessian(f, y):
        return jax.hessian(value)(f, y)

    def output_fisher_factor(f):
        p = jax.nn.softmax(f)
        s = jnp.diag(p) - jnp.outer(p, p)
        return jnp.sqrt(2.0 / f.shape[-1]) * s

    def sample_output_grad(key, f):
        # ŷ = p + σ ε with σ² = K/2; ∇_f (1/K)‖p − ŷ‖² = (2/K) S (p − ŷ) = −√(2/K) S ε.
        eps = jax.random.normal(key, f.shape, f.dtype)
        return -output_fisher_factor(f) @ eps

    return Loss(
        "softmax_squared_error", value, output_hessian, output_fisher_factor, sample_output_grad
    )


@_shared
def token_cross_entropy(normalisation: str = "mean") -> Loss:
    """Softmax cross-entropy over the last axis of a sequence of logits ``(T, V)``.

    The target is the tokens ``(T,)`` (integers in [0, V)), or a pair ``(tokens, mask)`` with
    a padding mask ``(T,)`` (bool or float weights; padded positions count zero). With
    w_t = mask_t / Σ_s mask_s (``"mean"``: the mean over the unpadded tokens) or w_t = mask_t
    (``"sum"``), ℓ(f, y) = Σ_t w_t (−log softmax(f_t)[y_t]). Per position Λ_t = w_t (diag p_t −
    p_t p_tᵀ) = F_out,t: the GGN equals the Fisher, both applied per position without forming
    a (T·V)² matrix. The Monte-Carlo Fisher draws ŷ_t ∼ p_t independently at every position
    (r̂_t = √w_t (p_t − e_ŷ_t), so E r̂ r̂ᵀ = F_out).

    Raises:
      ValueError: for an unknown normalisation.
    """
    if normalisation not in ("mean", "sum"):
        raise ValueError(f"normalisation must be 'mean' or 'sum', got {normalisation!r}")

    def weights(f, y):
        tokens, mask = y if isinstance(y, tuple | list) else (y, None)
        tokens = jnp.asarray(tokens)
        if tokens.shape != f.shape[:-1]:
            raise ValueError(
                f"token targets must have the outputs' leading shape {f.shape[:-1]}, got "
                f"{tokens.shape}"
            )
        w = jnp.ones(f.shape[:-1], f.dtype) if mask is None else jnp.asarray(mask).astype(f.dtype)
        if normalisation == "mean":
            w = w / jnp.maximum(jnp.sum(w), 1)
        return tokens, w

    def value(f, y):
        tokens, w = weights(f, y)
        logp = jax.nn.log_softmax(f, axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
        return jnp.sum(w * nll)

    def curvature_product(f, y, t):
        _, w = weights(f, y)
        p = jax.nn.softmax(f, axis=-1)
        return w[..., None] * (p * t - p * jnp.sum(p * t, axis=-1, keepdims=True))

    def sample_output_grad(key, f, y):
        _, w = weights(f, y)
        p = jax.nn.softmax(f, axis=-1)
        draw = jax.random.categorical(key, f, axis=-1)
        return jnp.sqrt(w)[..., None] * (p - jax.nn.one_hot(draw, f.shape[-1], dtype=f.dtype))

    return Loss(
        f"token_cross_entropy({normalisation})",
        value,
        sample_output_grad=sample_output_grad,
        output_hessian_product=curvature_product,
        output_fisher_product=curvature_product,
        predictive_takes_target=True,
    )


LOSSES: dict[str, Callable[[], Loss]] = {
    "cross_entropy": softmax_cross_entropy,
    "squared_error_half": lambda: squared_error(0.5),
    "squared_error_sum": lambda: squared_error(1.0),
    "softmax_squared_error": softmax_squared_error,
}


def get_loss(name: str, *, label_smoothing: float = 0.0) -> Loss:
    """Returns the loss registered under ``name`` (see ``LOSSES``).

    Raises:
      ValueError: for an unknown name, or label smoothing with a loss that has none.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    if name == "cross_entropy":
        return softmax_cross_entropy(label_smoothing)
    if label_smoothing:
        raise ValueError(f"label_smoothing applies to cross_entropy only, not to {name!r}")
    return LOSSES[name]()


@dataclasses.dataclass(frozen=True)
class Objective:
    """The mean loss L(θ) = (1/n) Σ_p loss(predict(θ, x_p), y_p).

    An objective is a pytree: a ``predict`` or ``loss`` given as a
    ``jax.tree_util.Partial`` contributes the arrays it binds as leaves (e.g. the running
    statistics of a batch-norm model held fixed, :func:`sharpness_jax.resnet18.with_state`),
    and every plain function is static data. Passed to ``jax.jit`` as an argument (as every
    operator carries it), an objective at new arrays of the same shapes therefore reuses the
    compiled program, and those arrays never become constants of it. Whatever a plain
    function closes over is a constant.

    Attributes:
      predict: per-example model ``(params, x) -> outputs`` of shape ``(K,)``.
      loss: a :class:`Loss`, or any callable ``(outputs, y) -> scalar`` (Λ then comes from
        autodiff; the true and Monte-Carlo Fisher need a :class:`Loss` with a predictive
        distribution).
    """

    predict: Callable[[PyTree, PyTree], jax.Array]
    loss: Loss | Callable[[jax.Array, Any], jax.Array]

    def example_loss(self, params: PyTree, x: PyTree, y: PyTree) -> jax.Array:
        """ℓ(θ; x, y) for one example."""
        return self.loss(self.predict(params, x), y)

    def batch_outputs(self, params: PyTree, inputs: PyTree) -> jax.Array:
        """Outputs of a batch of examples, shape ``(n, K)``."""
        return jax.vmap(self.predict, in_axes=(None, 0))(params, inputs)

    def output_grads(self, outputs: jax.Array, targets: PyTree) -> jax.Array:
        """r_p = ∇_f loss(f_p, y_p) for a batch of outputs ``(n, K)``; shape ``(n, K)``."""
        return jax.vmap(jax.grad(self.loss))(outputs, targets)

    def batch_losses(self, params: PyTree, batch: Batch) -> jax.Array:
        """Per-example losses ℓ_p(θ), shape ``(n,)``."""
        return jax.vmap(self.example_loss, in_axes=(None, 0, 0))(params, *batch)

    def output_hessian_products(
        self, outputs: jax.Array, targets: PyTree, tangents: jax.Array
    ) -> jax.Array:
        """Λ_p t_p for a batch: outputs, tangents ``(n, K)`` -> ``(n, K)``.

        Closed form when the loss has ``output_hessian``; otherwise one forward-over-reverse
        product per example, ``jax.jvp(jax.grad(loss))``, without forming Λ_p.
        """
        product = getattr(self.loss, "output_hessian_product", None)
        if product is not None:
            return jax.vmap(product)(outputs, targets, tangents)
        closed_form = getattr(self.loss, "output_hessian", None)
        if closed_form is not None:
            lam = jax.vmap(closed_form)(outputs, targets)
            return jnp.einsum("pkl,pl->pk", lam, tangents)
        grad = jax.grad(self.loss)

        def one(f, y, t):
            return jax.jvp(lambda g: grad(g, y), (f,), (t,))[1]

        return jax.vmap(one)(outputs, targets, tangents)

    def output_hessian(self, outputs: jax.Array, target: PyTree) -> jax.Array:
        """Λ = ∇²_f loss(f, y) for one example, ``(K, K)``: closed form, else autodiff."""
        closed_form = getattr(self.loss, "output_hessian", None)
        return (closed_form or jax.hessian(self.loss))(outputs, target)

    def predictive(self, part: str, what: str) -> Callable:
        """The loss's ``output_fisher_factor`` or ``sample_output_grad`` (``part``).

        Args:
          part: which part of the predictive distribution.
          what: the quantity that needs it, for the message.

        Raises:
          ValueError: when the loss has none, saying how to supply one.
        """
        found = getattr(self.loss, part, None) if isinstance(self.loss, Loss) else None
        if found is None:
            raise _no_predictive(self.loss, part, what)
        return found

    def label_classes(self, params: PyTree, inputs: PyTree) -> int | None:
        """K when integer targets are class labels: the size of the outputs' last axis.

        Read from ``jax.eval_shape`` of one example (nothing runs). None when the loss does
        not take integer targets as class labels (plain callables, ``class_labels=False``).
        """
        if not getattr(self.loss, "class_labels", False):
            return None

        def spec(a, drop):
            return jax.ShapeDtypeStruct(jnp.shape(a)[drop:], jnp.result_type(a))

        example = jax.tree_util.tree_map(lambda a: spec(a, 1), inputs)
        shapes = jax.tree_util.tree_map(lambda a: spec(a, 0), params)
        out = jax.eval_shape(self.predict, shapes, example)
        shape = getattr(out, "shape", ())
        return int(shape[-1]) if shape else None

    def output_fisher_products(
        self, outputs: jax.Array, tangents: jax.Array, targets: PyTree = None
    ) -> jax.Array:
        """F_out(f_p) t_p = B_p B_pᵀ t_p for a batch: ``(n, K)`` -> ``(n, K)`` (or the loss's
        ``output_fisher_product`` for outputs of any shape, which needs the ``targets``)."""
        product = getattr(self.loss, "output_fisher_product", None)
        if product is not None:
            if targets is None:
                raise ValueError(f"the Fisher of loss {self.loss.name!r} needs the targets")
            return jax.vmap(product)(outputs, targets, tangents)
        factor = self.predictive("output_fisher_factor", "the true Fisher")
        b = jax.vmap(factor)(outputs)
        return jnp.einsum("pkl,pml,pm->pk", b, b, tangents)

    def sampled_output_grads(
        self, keys: jax.Array, outputs: jax.Array, target: PyTree = None
    ) -> jax.Array:
        """r̂_s = ∇_f(−log p(ŷ_s | f)) for ONE example's outputs and S keys: ``(S, *f.shape)``
        (the target is passed on for its weights when the loss's predictive takes it)."""
        sample = self.predictive("sample_output_grad", "the Monte-Carlo Fisher")
        if getattr(self.loss, "predictive_takes_target", False):
            return jax.vmap(sample, in_axes=(0, None, None))(keys, outputs, target)
        return jax.vmap(sample, in_axes=(0, None))(keys, outputs)


def _flatten_objective(objective: Objective):
    parts = (objective.predict, objective.loss)
    children = tuple(p if isinstance(p, jax.tree_util.Partial) else None for p in parts)
    static = tuple(None if isinstance(p, jax.tree_util.Partial) else Static(p) for p in parts)
    return children, static


def _unflatten_objective(static, children) -> Objective:
    return Objective(*(c if s is None else s.value for s, c in zip(static, children, strict=True)))


jax.tree_util.register_pytree_node(Objective, _flatten_objective, _unflatten_objective)


def output_inner(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-example inner products of two batches of outputs: ``(n, ...)`` -> ``(n,)``."""
    return jnp.sum(a * b, axis=tuple(range(1, jnp.ndim(a))))
