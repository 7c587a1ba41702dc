"""Quotient geometry of shallow networks (Dong & Cheng 2026): vertical and horizontal spaces,
the realisation metric, the split of an update and the conserved quantities.

The model is f_θ(x) = Σ_i a_i σ(w_iᵀ x + b_i) with a_i ∈ R^K (layout of
:mod:`sharpness_jax.shallow`: params ``{"w": (m, d), "b": (m,) optional, "a": (m, K)}``). The
symmetries themselves (``rescale_units``, ``permute_units``, ``flip_units``) are in
:mod:`sharpness_jax.symmetries`; the loss curvature on the quotient (reduced and generalised
spectra, the regular set) is in :mod:`sharpness_jax.quotient_spectra`.

Symmetries and the vertical space
---------------------------------
For σ positively homogeneous of degree k (``relu``, ``leaky_relu``: k = 1; ``quadratic``:
k = 2), every hidden unit i has the rescaling symmetry

    (a_i, w_i, b_i) → (c^{−k} a_i, c w_i, c b_i),   c > 0,

whose tangent at c = 1 is the generator v_i = (−k a_i, w_i, b_i) in unit i's block and zero
elsewhere (Euler: σ'(z) z = k σ(z), hence J v_i = 0). The vertical space is V = span{v_i}; its
generators have disjoint supports, so they are mutually orthogonal. A unit with
a_i = 0, w_i = 0, b_i = 0 has v_i = 0 and no symmetry: it is dropped from V and flagged
(``valid = False``), so dim V = number of non-degenerate units. ``tanh`` is odd: its only
symmetries are the discrete sign flips (a_i, w_i, b_i) → (−a_i, −w_i, −b_i), so V = {0}. The
permutations of units are discrete for every σ.

For ``quadratic`` with scalar outputs (K = 1) and m ≥ 2 the realisation has a larger continuous
symmetry group: with w̃_i = (w_i, b_i) and x̃ = (x, 1), f = x̃ᵀ W̃ᵀ diag(a) W̃ x̃ is invariant under
W̃ → R W̃ for every R with Rᵀ diag(a) R = diag(a) (an indefinite orthogonal group of dimension
m(m−1)/2). Only the rescalings are in V here, so ``quotient_spectra.regularity`` reports rank
J smaller than P − m for such nets; for K ≥ 2 and generic a_i the extra symmetries disappear.

Horizontal spaces (``metric=``)
-------------------------------
The realisation map is F_X(θ) = (f_θ(x_1), …, f_θ(x_n)) ∈ R^{nK}, J = ∂F_X/∂θ its (nK × P)
Jacobian, and G = JᵀJ / n the realisation metric (a MEAN over examples; it equals the GGN of
the loss ½‖f − y‖², and half the GGN of ‖f − y‖²). G v = 0 for every v ∈ V, and on the regular
set ker G = V exactly. Hence "the G-orthogonal complement of V" is the whole space: for any
metric M = G + N the M-orthogonal complement of V is the N-orthogonal complement, since
vᵀ G u = 0 for v ∈ V. The horizontal space is therefore fixed by the auxiliary metric N on the
vertical directions, and this module offers two:

* ``"euclidean"`` (default): N = I, W = V^⊥ = {u : ⟨u, v_i⟩ = 0 ∀i}. This is also the
  M-orthogonal complement for M = G + P_V (G plus the Euclidean metric on V).
* ``"scale_invariant"``: N = ⊕_i (I_{a_i} / ‖a_i‖² ⊕ I_{w_i, b_i} / (‖w_i‖² + b_i²)), the
  per-unit log-norm metric under which every rescaling is an isometry. W = {u : ⟨N v_i, u⟩ = 0
  ∀i} = {u : −k ⟨a_i, u_{a_i}⟩/‖a_i‖² + (⟨w_i, u_{w_i}⟩ + b_i u_{b_i})/(‖w_i‖² + b_i²) = 0},
  i.e. −k δlog‖a_i‖ + δlog‖(w_i, b_i)‖ = 0: a horizontal step moves each unit's log-norms
  (log‖a_i‖, log‖(w_i, b_i)‖) only orthogonally to the orbit direction (−k, 1). It is the
  M-orthogonal complement for M = G + N. (A part that is zero contributes nothing: for
  a_i = 0 the a-term is dropped.)

An update δ splits uniquely as δ = δ_h + δ_v with δ_v ∈ V and δ_h ∈ W (:func:`split_update`;
orthogonal for ``"euclidean"``, N-orthogonal for ``"scale_invariant"``).
:func:`horizontal_projector` is the Euclidean-orthogonal projector Q onto W (for
``"euclidean"`` it coincides with δ ↦ δ_h); :func:`horizontal_basis` an orthonormal basis B
of W (P × (P − m)).

Dense and matrix-free routes
----------------------------
Matrix-free (memory O(P) per chunk of examples): :func:`horizontal_projector`,
:func:`split_update`, :func:`decompose_update`, :func:`realisation_metric` (and
``quotient_spectra.horizontal_hessian``). Dense (small shallow nets): :func:`horizontal_basis`,
:func:`realisation_jacobian`, :func:`realisation_metric_dense` (and ``quotient_spectra``'s
``reduced_hessian``, ``quotient_spectra``, ``regularity``).

Conserved quantities
--------------------
⟨∇L, v_i⟩ = 0 at every θ (the loss is constant along orbits), i.e.
⟨w_i, ∇_{w_i}L⟩ + b_i ∂_{b_i}L = k ⟨a_i, ∇_{a_i}L⟩. Along gradient flow θ' = −∇L this gives
d/dt(‖w_i‖² + b_i²) = k d/dt ‖a_i‖², so Q_i = k‖a_i‖² − ‖w_i‖² − b_i² is conserved (ReLU:
‖a_i‖² − ‖w_i‖² − b_i²; quadratic: 2‖a_i‖² − ‖w_i‖² − b_i²). One gradient-descent step of size
η changes it by exactly η²(k‖∇_{a_i}L‖² − ‖∇_{w_i}L‖² − (∂_{b_i}L)²), so over a fixed time the
drift is O(η).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sharpness_jax import checks, operators
from sharpness_jax.per_example import map_examples
from sharpness_jax.shallow import check_shallow, shallow_predict

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

__all__ = [
    "METRICS",
    "UpdateSplit",
    "VerticalBasis",
    "conserved_quantities",
    "decompose_update",
    "drop_units",
    "horizontal_basis",
    "horizontal_projector",
    "realisation_jacobian",
    "realisation_map",
    "realisation_metric",
    "realisation_metric_dense",
    "split_update",
    "vertical_basis",
    "vertical_components",
    "vertical_generators",
]

METRICS = ("euclidean", "scale_invariant")


# ---------------------------------------------------------------------------- result types


class VerticalBasis(NamedTuple):
    """Orthonormal basis of the vertical space V = span{v_i}.

    Attributes:
      vectors: params' structure with a leading axis m; row i is e_i = v_i / ‖v_i‖ (zero for a
        dropped, degenerate unit).
      norms: ``(m,)`` the generator norms ‖v_i‖ = (k²‖a_i‖² + ‖w_i‖² + b_i²)^{1/2}.
      valid: ``(m,)`` bool, False where v_i is numerically zero (‖v_i‖ ≤ rtol · max_j ‖v_j‖)
        and always False for ``tanh``.
      dim: dim V, the number of valid units.
    """

    vectors: PyTree
    norms: jax.Array
    valid: jax.Array
    dim: jax.Array


class UpdateSplit(NamedTuple):
    """An update δ = δ_h + δ_v and the change of the predictor each part causes.

    Output arrays have shape ``(n, K)`` (one row per input).

    Attributes:
      horizontal: δ_h ∈ W.
      vertical: δ_v ∈ V.
      first_order_horizontal: J δ_h, the first-order change of the outputs.
      first_order_vertical: J δ_v (zero up to rounding: vertical steps are gauge).
      change_horizontal: f_{θ+δ_h}(x) − f_θ(x), exactly.
      change_vertical: f_{θ+δ_v}(x) − f_θ(x), exactly (second order in δ_v).
      change_total: f_{θ+δ}(x) − f_θ(x).
    """

    horizontal: PyTree
    vertical: PyTree
    first_order_horizontal: jax.Array
    first_order_vertical: jax.Array
    change_horizontal: jax.Array
    change_vertical: jax.Array
    change_total: jax.Array


# ------------------------------------------------------------------------------ validation


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _dtype(params: PyTree):
    return jnp.result_type(params["w"])


def _default_rtol(params: PyTree, rtol: float | None) -> float:
    if rtol is None:
        return 100.0 * float(jnp.finfo(_dtype(params)).eps)
    if not rtol >= 0:
        raise ValueError(f"rtol must be non-negative, got {rtol}")
    return float(rtol)


def _is_concrete(x: jax.Array) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _predict_fn(activation: str):
    return functools.partial(shallow_predict, activation=activation)


# --------------------------------------------------------------------- per-unit arithmetic


def _unit_dot(x: PyTree, y: PyTree) -> jax.Array:
    """(m,) per-unit inner products Σ_{entries of row i} x · y over all leaves."""
    leaves = [
        jnp.sum((a * b).reshape(a.shape[0], -1), axis=1)
        for a, b in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y), strict=True)
    ]
    return functools.reduce(jnp.add, leaves)


def _scale_units(tree: PyTree, s: jax.Array) -> PyTree:
    """Row i of every leaf times s_i."""
    return jax.tree_util.tree_map(
        lambda leaf: leaf * s.astype(leaf.dtype).reshape((-1,) + (1,) * (leaf.ndim - 1)), tree
    )


def _safe_inverse(x: jax.Array, keep: jax.Array) -> jax.Array:
    return jnp.where(keep, 1.0 / jnp.where(keep, x, 1.0), 0.0)


def _stack_units(field: PyTree) -> PyTree:
    """Leading axis m: entry i is ``field`` restricted to unit i's block (zero elsewhere)."""

    def stack(leaf):
        m = leaf.shape[0]
        eye = jnp.eye(m, dtype=leaf.dtype).reshape((m, m) + (1,) * (leaf.ndim - 1))
        return eye * leaf[None]

    return jax.tree_util.tree_map(stack, field)


def _generator_field(params: PyTree, k: int | None) -> PyTree:
    """D = Σ_i v_i: (−k a, w, b); zero for activations without continuous symmetry."""
    if k is None:
        return jax.tree_util.tree_map(jnp.zeros_like, params)
    return {key: (-k * leaf if key == "a" else leaf) for key, leaf in params.items()}


def _valid_units(params: PyTree, k: int | None, rtol: float) -> tuple[jax.Array, jax.Array]:
    """(‖v_i‖, valid_i)."""
    field = _generator_field(params, k)
    norms = jnp.sqrt(_unit_dot(field, field))
    if k is None:
        return norms, jnp.zeros(norms.shape, bool)
    return norms, norms > rtol * jnp.max(norms)


def _normal_field(params: PyTree, k: int | None, metric: str, rtol: float) -> PyTree:
    """Rows n_i with W = {u : ⟨n_i, u⟩ = 0 ∀ valid i}: n_i = v_i (euclidean) or N v_i."""
    field = _generator_field(params, k)
    if metric == "euclidean" or k is None:
        return field
    wb = {key: leaf for key, leaf in params.items() if key != "a"}
    s_wb = _unit_dot(wb, wb)
    s_a = _unit_dot({"a": params["a"]}, {"a": params["a"]})
    norms = jnp.sqrt(_unit_dot(field, field))
    threshold = jnp.square(rtol * jnp.max(norms))
    inv_wb = _safe_inverse(s_wb, s_wb > threshold)
    inv_a = _safe_inverse(s_a, s_a > threshold)
    return {key: _scale_units(leaf, inv_a if key == "a" else inv_wb) for key, leaf in field.items()}


def _unit_normals(params, k, metric, rtol):
    """Normalised normal rows n̂_i (zero for invalid units) and the valid mask."""
    _, valid = _valid_units(params, k, rtol)
    normals = _normal_field(params, k, metric, rtol)
    nn_norms = jnp.sqrt(_unit_dot(normals, normals))
    return _scale_units(normals, _safe_inverse(nn_norms, valid)), valid


# ------------------------------------------------------------------------------ generators


def vertical_generators(params: PyTree, *, activation: str) -> PyTree:
    """The rescaling generators v_i, stacked along a leading axis of size m.

    v_i = (−k a_i, w_i, b_i) in unit i's block and zero elsewhere, the tangent at c = 1 of
    c ↦ (c^{−k} a_i, c w_i, c b_i). All zero for ``tanh`` (no continuous symmetry).

    Args:
      params: shallow-net params ``{"w", "b" (optional), "a"}``.
      activation: name in :data:`sharpness_jax.shallow.ACTIVATIONS`.

    Returns:
      A pytree like ``params`` whose leaves have an extra leading axis m.
    """
    _, k = check_shallow(params, activation=activation)
    return _stack_units(_generator_field(params, k))


def vertical_basis(params: PyTree, *, activation: str, rtol: float | None = None) -> VerticalBasis:
    """Orthonormal basis e_i = v_i / ‖v_i‖ of the vertical space V.

    The v_i have disjoint supports, hence are orthogonal; normalising them gives an
    orthonormal basis. A degenerate unit (v_i ≈ 0, i.e. a_i = 0, w_i = 0, b_i = 0) carries no
    symmetry; it is flagged ``valid = False`` and its row is zero.

    Args:
      params: shallow-net params.
      activation: the activation name.
      rtol: unit i is degenerate when ‖v_i‖ ≤ rtol · max_j ‖v_j‖ (default 100 · eps of the
        params' dtype).

    Returns:
      :class:`VerticalBasis`.
    """
    _, k = check_shallow(params, activation=activation)
    rtol = _default_rtol(params, rtol)
    norms, valid = _valid_units(params, k, rtol)
    field = _scale_units(_generator_field(params, k), _safe_inverse(norms, valid))
    return VerticalBasis(_stack_units(field), norms, valid, jnp.sum(valid.astype(jnp.int32)))


def vertical_components(
    v: PyTree, params: PyTree, *, activation: str, rtol: float | None = None
) -> jax.Array:
    """(m,) coordinates ⟨v, e_i⟩ of ``v`` in the orthonormal vertical basis (0 if invalid).

    For v = ∇L these vanish at every θ (the loss is constant along orbits).
    """
    _, k = check_shallow(params, activation=activation)
    checks.check_vector(v, params)
    rtol = _default_rtol(params, rtol)
    norms, valid = _valid_units(params, k, rtol)
    return _unit_dot(_generator_field(params, k), v) * _safe_inverse(norms, valid)


# ----------------------------------------------------------------- horizontal space, split


def horizontal_projector(
    params: PyTree, *, activation: str, metric: str = "euclidean", rtol: float | None = None
) -> MatVec:
    """Q u = u − Σ_i ⟨n̂_i, u⟩ n̂_i: the Euclidean-orthogonal projector onto W.

    n̂_i is the unit normal of W in unit i's block: v_i/‖v_i‖ for ``"euclidean"`` (then
    Q = I − Σ e_i e_iᵀ = P_h) and N v_i/‖N v_i‖ for ``"scale_invariant"``. Degenerate units
    contribute nothing. Q is symmetric and idempotent with rank P − dim V, so Q A Q has the
    spectrum of A restricted to W (orthonormal basis) plus dim V zeros.

    Returns:
      The matvec ``u -> Q u`` over params-shaped pytrees.
    """
    _, k = check_shallow(params, activation=activation)
    _check_metric(metric)
    rtol = _default_rtol(params, rtol)
    normals, _ = _unit_normals(params, k, metric, rtol)

    def matvec(u):
        checks.check_vector(u, params)
        coeff = _unit_dot(normals, u)
        return jax.tree_util.tree_map(jnp.subtract, u, _scale_units(normals, coeff))

    return matvec


def split_update(
    params: PyTree,
    delta: PyTree,
    *,
    activation: str,
    metric: str = "euclidean",
    rtol: float | None = None,
) -> tuple[PyTree, PyTree]:
    """δ = δ_h + δ_v with δ_v ∈ V and δ_h ∈ W (the horizontal space of ``metric``).

    δ_v = Σ_i v_i ⟨n_i, δ⟩ / ⟨n_i, v_i⟩ with n_i = v_i (``"euclidean"``: the orthogonal
    projection onto V) or n_i = N v_i (``"scale_invariant"``: the N-orthogonal one); the sum
    runs over valid units. For ``tanh``, δ_v = 0.

    Returns:
      ``(horizontal, vertical)``, each shaped like ``params``.
    """
    _, k = check_shallow(params, activation=activation)
    _check_metric(metric)
    checks.check_vector(delta, params, name="delta")
    rtol = _default_rtol(params, rtol)
    _, valid = _valid_units(params, k, rtol)
    generators = _generator_field(params, k)
    normals = _normal_field(params, k, metric, rtol)
    coeff = _unit_dot(normals, delta) * _safe_inverse(_unit_dot(normals, generators), valid)
    vertical = _scale_units(generators, coeff)
    horizontal = jax.tree_util.tree_map(jnp.subtract, delta, vertical)
    return horizontal, vertical


def horizontal_basis(
    params: PyTree, *, activation: str, metric: str = "euclidean", rtol: float | None = None
) -> jax.Array:
    """An orthonormal basis B of the horizontal space W, shape ``(P, P − m_V)``.

    Rows follow the ``ravel_pytree(params)`` order; m_V = m for homogeneous σ and 0 for
    ``tanh`` (then B = I). B completes the unit normals n̂_i to an orthonormal basis of R^P
    (complete QR), so Bᵀ n̂_i = 0 and BᵀB = I.

    The shape is static, so every unit must be non-degenerate. With concrete params a
    degenerate unit raises; under ``jit`` it cannot be detected here and one horizontal
    direction per degenerate unit would be missing: check ``vertical_basis(...).valid`` or
    ``quotient_spectra.regularity`` first, or remove such units with :func:`drop_units`.

    Raises:
      ValueError: on a degenerate unit (concrete params only).
    """
    _, k = check_shallow(params, activation=activation)
    _check_metric(metric)
    rtol = _default_rtol(params, rtol)
    basis, valid = _horizontal_basis(params, k=k, metric=metric, rtol=rtol)
    if _is_concrete(valid) and not bool(np.all(np.asarray(valid))):
        bad = np.flatnonzero(~np.asarray(valid)).tolist()
        raise ValueError(
            f"units {bad} are degenerate (a_i = 0, w_i = 0, b_i = 0): they carry no rescaling "
            "symmetry. Remove them with drop_units (the function is unchanged) or use the "
            "matrix-free horizontal_projector."
        )
    return basis


@functools.partial(jax.jit, static_argnames=("k", "metric", "rtol"))
def _horizontal_basis(params, *, k, metric, rtol):
    flat, _ = ravel_pytree(params)
    m = params["w"].shape[0]
    if k is None:
        return jnp.eye(flat.shape[0], dtype=flat.dtype), jnp.ones((m,), bool)  # nothing to drop
    normals, valid = _unit_normals(params, k, metric, rtol)
    columns = jax.vmap(lambda t: ravel_pytree(t)[0])(_stack_units(normals)).T  # (P, m)
    q, _ = jnp.linalg.qr(columns, mode="complete")
    return q[:, m:], valid


# ---------------------------------------------------------------------- realisation map


def realisation_map(params: PyTree, inputs: jax.Array, *, activation: str) -> jax.Array:
    """F_X(θ) = (f_θ(x_1), …, f_θ(x_n)) ∈ R^{nK}, flattened example-major."""
    check_shallow(params, activation=activation)
    checks.num_examples(inputs)
    return jax.vmap(_predict_fn(activation), in_axes=(None, 0))(params, inputs).reshape(-1)


def realisation_jacobian(
    params: PyTree, inputs: jax.Array, *, activation: str, chunk_size: int | None = None
) -> jax.Array:
    """Dense J = ∂F_X/∂θ, shape ``(nK, P)``; columns in ``ravel_pytree(params)`` order.

    Per example the cheaper of ``jax.jacrev`` (K < P) and ``jax.jacfwd``; ``chunk_size``
    examples at a time. For small models and references; the matrix-free route is
    :func:`realisation_metric` (and ``operators.jacobian_vp`` / ``jacobian_tvp``).
    """
    check_shallow(params, activation=activation)
    checks.num_examples(inputs)
    flat, unravel = ravel_pytree(params)
    num_outputs = jnp.shape(params["a"])[1]
    predict = _predict_fn(activation)
    jac = jax.jacrev if num_outputs < flat.shape[0] else jax.jacfwd

    def one(x):
        return jac(lambda f: predict(unravel(f), x))(flat)

    rows = map_examples(one, inputs, chunk_size=chunk_size)
    return rows.reshape(-1, flat.shape[0])


def realisation_metric(
    params: PyTree, inputs: jax.Array, *, activation: str, chunk_size: int | None = None
) -> MatVec:
    """G v = (1/n) Jᵀ J v = (1/n) Σ_p J_pᵀ J_p v, matrix-free (one JVP and one VJP)."""
    check_shallow(params, activation=activation)
    n = checks.num_examples(inputs)
    predict = _predict_fn(activation)
    jvp = operators.jacobian_vp(predict, params, inputs, chunk_size=chunk_size)
    tvp = operators.jacobian_tvp(predict, params, inputs, chunk_size=chunk_size)

    def matvec(v):
        return jax.tree_util.tree_map(lambda a: a / n, tvp(jvp(v)))

    return matvec


def realisation_metric_dense(
    params: PyTree, inputs: jax.Array, *, activation: str, chunk_size: int | None = None
) -> jax.Array:
    """Dense G = JᵀJ / n, shape ``(P, P)`` in ``ravel_pytree`` order."""
    n = checks.num_examples(inputs)
    jac = realisation_jacobian(params, inputs, activation=activation, chunk_size=chunk_size)
    return jac.T @ jac / n


# ----------------------------------------------------------------- update decomposition


def decompose_update(
    params: PyTree,
    delta: PyTree,
    inputs: jax.Array,
    *,
    activation: str,
    metric: str = "euclidean",
    rtol: float | None = None,
    chunk_size: int | None = None,
) -> UpdateSplit:
    """Splits an update δ (a gradient or SGD step) and measures what each part does to f.

    δ = δ_h + δ_v (:func:`split_update`). To first order only δ_h changes the predictor:
    J δ_v = 0 exactly. The exact changes f_{θ+δ_h} − f_θ and f_{θ+δ_v} − f_θ show the
    second-order effects (a straight step along v_i leaves the orbit at second order).

    With ``metric="euclidean"`` a plain gradient or SGD step is exactly horizontal: every
    mini-batch loss is constant along orbits, so ⟨∇L_B, v_i⟩ = 0. Vertical parts come from
    weight decay (⟨θ, v_i⟩ = ‖w_i‖² + b_i² − k‖a_i‖² = −Q_i), momentum, preconditioning
    (Adam), or from the oblique ``"scale_invariant"`` split.

    Returns:
      :class:`UpdateSplit` with output changes of shape ``(n, K)``.
    """
    horizontal, vertical = split_update(
        params, delta, activation=activation, metric=metric, rtol=rtol
    )
    checks.num_examples(inputs)
    predict = _predict_fn(activation)

    def shifted(t):
        return jax.tree_util.tree_map(jnp.add, params, t)

    p_h, p_v, p_all = shifted(horizontal), shifted(vertical), shifted(delta)

    def one(x):
        f0, jh = jax.jvp(lambda p: predict(p, x), (params,), (horizontal,))
        _, jv = jax.jvp(lambda p: predict(p, x), (params,), (vertical,))
        return (
            jh,
            jv,
            predict(p_h, x) - f0,
            predict(p_v, x) - f0,
            predict(p_all, x) - f0,
        )

    jh, jv, ch, cv, ct = map_examples(one, inputs, chunk_size=chunk_size)
    return UpdateSplit(horizontal, vertical, jh, jv, ch, cv, ct)


# ----------------------------------------------------------- conserved quantities, orbits


def conserved_quantities(params: PyTree, *, activation: str) -> jax.Array:
    """Q_i = k‖a_i‖² − ‖w_i‖² − b_i², shape ``(m,)``, conserved by gradient flow.

    ReLU / leaky ReLU (k = 1): ‖a_i‖² − ‖w_i‖² − b_i²; quadratic (k = 2):
    2‖a_i‖² − ‖w_i‖² − b_i². Follows from ⟨∇L, v_i⟩ = 0 (module docstring); one GD step of
    size η changes Q_i by η²(k‖∇_{a_i}L‖² − ‖∇_{w_i}L‖² − (∂_{b_i}L)²).

    Raises:
      ValueError: for ``tanh`` (no continuous symmetry, no such invariant).
    """
    _, k = check_shallow(params, activation=activation)
    if k is None:
        raise ValueError(f"activation {activation!r} has no rescaling symmetry")
    wb = {key: leaf for key, leaf in params.items() if key != "a"}
    return k * _unit_dot({"a": params["a"]}, {"a": params["a"]}) - _unit_dot(wb, wb)


def drop_units(params: PyTree, keep) -> PyTree:
    """The params without the units where ``keep`` is False (eager; shapes change).

    Dropping a unit with a_i = 0 leaves the function unchanged; use it to remove degenerate
    units before :func:`horizontal_basis`.
    """
    keep = np.asarray(keep)
    m = jnp.shape(params["w"])[0]
    if keep.shape != (m,) or keep.dtype != bool:
        raise ValueError(f"keep must be a concrete bool array of shape (m={m},)")
    if not keep.any():
        raise ValueError("cannot drop every unit")
    index = np.flatnonzero(keep)
    return jax.tree_util.tree_map(lambda leaf: leaf[index], params)
