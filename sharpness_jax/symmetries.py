"""Function-preserving reparametrisations: rescalings, permutations, sign flips and gauges.

Every map here changes the parameters θ and leaves the network function f_θ unchanged. Each is
linear in θ, θ' = T θ, so applied to a tangent vector u at θ it returns its push-forward T u
at the new point. They are the symmetries that Riemannian sharpness
(:mod:`sharpness_jax.riemannian`) is invariant under and that the quotient geometry
(:mod:`sharpness_jax.quotient`) divides out.

=================================  ==================================================  ======
map                                action                                              layout
=================================  ==================================================  ======
:func:`rescale_layers`             kernel_l × α_l, bias_l × Π_{m≤l} α_m, Π α_l = 1      MLP
:func:`rescale_units`              unit j of a hidden layer: in-weights × c, out × c⁻ᵏ   both
:func:`permute_units`              reorders the hidden units                           both
:func:`flip_units`                 sign flips of the units of an odd or even σ         shallow
:func:`linear_gauge`               W1 → W1 A, W2 → A⁻¹ W2 of a linear two-layer net    MLP
=================================  ==================================================  ======

Each has a ``random_*`` version (except the flips). Rescalings need σ positively homogeneous,
σ(cz) = c^k σ(z) for c > 0; the degrees and parities come from the one activation table
(:mod:`sharpness_jax.activations`).

Parameter layouts:

* MLP: ``{"params": {"Dense_0": {"kernel": (d_in, d_out), "bias": (d_out,)}, "Dense_1": …}}``
  (the outer ``"params"`` level is optional, biases are optional), layers applied in order,
  f(x) = s_{L−1}, s_l = h_l W_l + b_l, h_{l+1} = σ(s_l), h_0 = x (flattened);
* shallow (:mod:`sharpness_jax.shallow`): ``{"w": (m, d), "b": (m,), "a": (m, K)}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sharpness_jax import checks, shallow
from sharpness_jax.activations import ACTIVATIONS

PyTree = Any

__all__ = [
    "flip_units",
    "linear_gauge",
    "permute_units",
    "random_linear_gauge",
    "random_permute_units",
    "random_rescale",
    "random_rescale_layers",
    "random_rescale_units",
    "rescale_layers",
    "rescale_units",
]

# The activations an MLP's rescalings preserve: positively homogeneous of degree 1.
_HOMOGENEOUS = tuple(name for name, act in ACTIVATIONS.items() if act.degree == 1)


# ------------------------------------------------------------------------------ layouts


def _mlp_layers(params: PyTree) -> tuple[dict, list[str], Callable[[dict], PyTree]]:
    """``(layers, names, rewrap)`` of the MLP layout, validated.

    ``layers`` maps ``Dense_i`` to ``{"kernel", ["bias"]}``; ``rewrap`` puts a new layer
    dict back under ``"params"`` when the input had that level.

    Raises:
      TypeError / ValueError: when ``params`` is not the MLP layout.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"MLP params must be a dict, got {type(params).__name__}")
    wrapped = "params" in params
    if wrapped:
        if set(params) != {"params"}:
            raise ValueError(
                f"MLP params hold only the 'params' collection, got collections {sorted(params)}"
            )
        inner = params["params"]
    else:
        inner = params
    if not isinstance(inner, Mapping) or not inner:
        raise ValueError("MLP params need at least one layer named Dense_0")
    names = [f"Dense_{i}" for i in range(len(inner))]
    if set(inner) != set(names):
        raise ValueError(
            f"the MLP layout has layers Dense_0 … Dense_{{L-1}} and nothing else; got layers "
            f"{sorted(inner)}"
        )
    width = None
    for name in names:
        layer = inner[name]
        if (
            not isinstance(layer, Mapping)
            or "kernel" not in layer
            or set(layer) - {"kernel", "bias"}
        ):
            keys = sorted(layer) if isinstance(layer, Mapping) else type(layer).__name__
            raise ValueError(f"layer {name} must hold 'kernel' and optionally 'bias', got {keys}")
        kernel = layer["kernel"]
        if jnp.ndim(kernel) != 2:
            raise ValueError(f"{name}/kernel must be (d_in, d_out), got shape {jnp.shape(kernel)}")
        if "bias" in layer and jnp.shape(layer["bias"]) != (jnp.shape(kernel)[1],):
            raise ValueError(
                f"{name}/bias must have shape ({jnp.shape(kernel)[1]},), got "
                f"{jnp.shape(layer['bias'])}"
            )
        if width is not None and jnp.shape(kernel)[0] != width:
            raise ValueError(
                f"{name}/kernel takes {jnp.shape(kernel)[0]} inputs but the previous layer has "
                f"{width} outputs"
            )
        width = jnp.shape(kernel)[1]

    def rewrap(new_layers: dict) -> PyTree:
        return {"params": new_layers} if wrapped else new_layers

    return dict(inner), names, rewrap


def _is_shallow(params: PyTree) -> bool:
    return (
        isinstance(params, Mapping) and {"w", "a"} <= set(params) and set(params) <= {"w", "b", "a"}
    )


def _check_homogeneous(activation: str) -> None:
    if not isinstance(activation, str) or activation not in _HOMOGENEOUS:
        raise ValueError(
            f"rescaling preserves the function only for positively homogeneous activations "
            f"{_HOMOGENEOUS}; got {activation!r}"
        )


def _flat_dtype(tree: PyTree):
    return ravel_pytree(tree)[0].dtype


# ---------------------------------------------------------------------------- rescalings


def _check_alphas(alphas: jax.Array, num_layers: int) -> None:
    val = checks.concrete_value(alphas)
    if val is None:
        return
    if not np.all(np.isfinite(val)) or np.any(val <= 0):
        raise ValueError(f"layer scales must be finite and > 0, got {val}")
    tol = 100 * num_layers * float(np.finfo(val.dtype).eps)
    if abs(float(np.sum(np.log(val)))) > tol:
        raise ValueError(
            f"the layer scales must multiply to 1 for the function to be preserved; their "
            f"product is {float(np.prod(val))!r}"
        )


def rescale_layers(
    params: PyTree, alphas: Sequence[float] | jax.Array, *, activation: str
) -> PyTree:
    """Per-layer rescaling of a positively homogeneous MLP; the function is unchanged.

    kernel_l → α_l kernel_l and bias_l → (Π_{m ≤ l} α_m) bias_l, with α_l > 0 and
    Π_l α_l = 1. Then s_l → (Π_{m≤l} α_m) s_l for every layer and the outputs are unchanged
    for σ(cz) = c σ(z). The familiar pair form "layer l's kernel and bias × α, the next
    layer's kernel × 1/α" is ``alphas = (1, …, α, 1/α, …, 1)``. Linear in θ: θ' = T θ with T
    diagonal.

    Args:
      params: MLP layout.
      alphas: one positive scale per Dense layer, product 1 (checked when concrete).
      activation: the hidden activation, one of relu, leaky_relu, linear, identity.

    Returns:
      New params of the same layout.

    Raises:
      ValueError: wrong number of scales, non-positive scales, product ≠ 1, a
        non-homogeneous activation or a bad layout.
    """
    _check_homogeneous(activation)
    layers, names, rewrap = _mlp_layers(params)
    dtype = layers[names[0]]["kernel"].dtype
    alphas = jnp.asarray(alphas, dtype)
    if alphas.shape != (len(names),):
        raise ValueError(f"need one scale per layer ({len(names)}), got shape {alphas.shape}")
    _check_alphas(alphas, len(names))
    cumulative = jnp.cumprod(alphas)
    out = {}
    for i, name in enumerate(names):
        layer = layers[name]
        new = {"kernel": layer["kernel"] * alphas[i]}
        if "bias" in layer:
            new["bias"] = layer["bias"] * cumulative[i]
        out[name] = {key: new[key] for key in layer}
    return rewrap(out)


def random_rescale_layers(
    key: jax.Array, params: PyTree, *, activation: str, log_std: float = 1.0
) -> PyTree:
    """:func:`rescale_layers` with α_l = exp(log_std · (z_l − z̄)), z ∼ N(0, I) (product 1)."""
    checks.check_positive_scalar("log_std", log_std)
    _, names, _ = _mlp_layers(params)
    dtype = _flat_dtype(params)
    z = jax.random.normal(key, (len(names),), dtype)
    return rescale_layers(params, jnp.exp(log_std * (z - jnp.mean(z))), activation=activation)


def _hidden_names(names: list[str], given: Mapping, what: str) -> None:
    hidden = names[:-1]
    bad = [name for name in given if name not in hidden]
    if bad:
        raise ValueError(
            f"{what} apply to hidden layers {hidden} (the output layer has no symmetry), got {bad}"
        )


def _check_unit_scales(c: jax.Array, shape: tuple[int, ...], name: str) -> None:
    if c.shape != shape:
        raise ValueError(f"unit scales of {name} must have shape {shape}, got {c.shape}")
    val = checks.concrete_value(c)
    if val is not None and (not np.all(np.isfinite(val)) or np.any(val <= 0)):
        raise ValueError(f"unit scales of {name} must be finite and positive (> 0)")


def rescale_units(
    params: PyTree, scales: Mapping[str, jax.Array] | jax.Array, *, activation: str
) -> PyTree:
    """Per-unit rescaling of hidden units; the function is unchanged.

    MLP layout: for each hidden layer l named in ``scales`` with c = scales[l] (shape
    ``(d_out,)``, c_j > 0): column j of kernel_l and bias_l[j] × c_j, row j of kernel_{l+1}
    × 1/c_j. Needs σ homogeneous of degree 1 (relu, leaky_relu, linear, identity).

    Shallow layout (:mod:`sharpness_jax.shallow`): ``scales`` is ``(m,)``, and
    (w_i, b_i, a_i) → (c_i w_i, c_i b_i, c_i^{-k} a_i) with k the activation's degree of
    homogeneity (``shallow.HOMOGENEITY``: relu / leaky_relu 1, quadratic 2).

    The map is linear, so applied to a tangent vector u at θ (same layout) it returns its
    push-forward D_c u at the rescaled point (e.g. v_i(θ') = D_c v_i(θ) for the quotient
    geometry's generators).

    Args:
      params: MLP or shallow-net params (or a tangent vector of the same layout).
      scales: ``{hidden layer name: (d_out,)}`` (MLP) or ``(m,)`` (shallow), positive.
      activation: a positively homogeneous activation.

    Raises:
      ValueError: non-positive scales (checked when concrete), wrong shapes, the output
        layer, a non-homogeneous activation (e.g. ``tanh``) or a bad layout.
    """
    if _is_shallow(params):
        return _rescale_shallow_units(params, scales, activation)
    _check_homogeneous(activation)
    layers, names, rewrap = _mlp_layers(params)
    if not isinstance(scales, Mapping):
        raise TypeError("for the MLP layout, scales maps hidden layer names to (d_out,) arrays")
    _hidden_names(names, scales, "unit scales")
    cols = {}
    for name, c in scales.items():
        c = jnp.asarray(c, layers[name]["kernel"].dtype)
        _check_unit_scales(c, (layers[name]["kernel"].shape[1],), name)
        cols[name] = c
    out = {}
    for i, name in enumerate(names):
        layer = layers[name]
        kernel = layer["kernel"]
        new = {}
        if i > 0 and names[i - 1] in cols:
            kernel = kernel / cols[names[i - 1]][:, None]
        if name in cols:
            kernel = kernel * cols[name][None, :]
        new["kernel"] = kernel
        if "bias" in layer:
            new["bias"] = layer["bias"] * cols[name] if name in cols else layer["bias"]
        out[name] = {key: new[key] for key in layer}
    return rewrap(out)


def _rescale_shallow_units(params: PyTree, scales: jax.Array, activation: str) -> PyTree:
    """(w_i, b_i, a_i) → (c_i w_i, c_i b_i, c_i^{-k} a_i) of a validated shallow net."""
    m, degree = shallow.check_shallow(params, activation=activation)
    if degree is None:
        raise ValueError(
            f"activation {activation!r} has no rescaling symmetry: shallow nets have one only "
            f"for the positively homogeneous activations "
            f"{[a for a, k in shallow.HOMOGENEITY.items() if k]}"
        )
    c = jnp.asarray(scales, params["w"].dtype)
    _check_unit_scales(c, (m,), "the shallow net")
    new = {"w": params["w"] * c[:, None], "a": params["a"] * jnp.power(c, -degree)[:, None]}
    if "b" in params:
        new["b"] = params["b"] * c
    return {key: new[key] for key in params}


def random_rescale_units(
    key: jax.Array, params: PyTree, *, activation: str, log_std: float = 1.0
) -> PyTree:
    """:func:`rescale_units` of every hidden unit with c_j = exp(log_std · z_j), z ∼ N(0, 1)."""
    checks.check_positive_scalar("log_std", log_std)
    dtype = _flat_dtype(params)
    if _is_shallow(params):
        z = jax.random.normal(key, (params["w"].shape[0],), dtype)
        return rescale_units(params, jnp.exp(log_std * z), activation=activation)
    layers, names, _ = _mlp_layers(params)
    keys = jax.random.split(key, max(len(names) - 1, 1))
    scales = {
        name: jnp.exp(log_std * jax.random.normal(k, (layers[name]["kernel"].shape[1],), dtype))
        for name, k in zip(names[:-1], keys, strict=False)
    }
    return rescale_units(params, scales, activation=activation)


def random_rescale(
    key: jax.Array,
    params: PyTree,
    *,
    layer_log_std: float,
    unit_log_std: float,
    activation: str = "relu",
) -> PyTree:
    """A random function-preserving rescaling of a ReLU MLP: layer scales, then unit scales."""
    k_layers, k_units = jax.random.split(key)
    params = random_rescale_layers(k_layers, params, activation=activation, log_std=layer_log_std)
    return random_rescale_units(k_units, params, activation=activation, log_std=unit_log_std)


def _check_permutation(perm: jax.Array, size: int, name: str) -> jax.Array:
    perm = jnp.asarray(perm)
    if perm.shape != (size,) or not jnp.issubdtype(perm.dtype, jnp.integer):
        raise ValueError(
            f"the permutation of {name} must be ({size},) integers, got {perm.shape} {perm.dtype}"
        )
    val = checks.concrete_value(perm)
    if val is not None and not np.array_equal(np.sort(val), np.arange(size)):
        raise ValueError(f"the permutation of {name} is not a permutation of 0 … {size - 1}")
    return perm


def permute_units(params: PyTree, permutations: Mapping[str, jax.Array] | jax.Array) -> PyTree:
    """Permutes hidden units; the function is unchanged for any elementwise activation.

    MLP layout: for each hidden layer l named in ``permutations`` with π = permutations[l]:
    new unit j is old unit π_j, kernel_l → kernel_l[:, π], bias_l → bias_l[π],
    kernel_{l+1} → kernel_{l+1}[π, :]. Shallow layout: ``permutations`` is ``(m,)`` and the
    rows of w, b, a are permuted.

    Raises:
      ValueError: not a permutation, the output layer, or a bad layout.
    """
    if _is_shallow(params):
        perm = _check_permutation(permutations, params["w"].shape[0], "the shallow net")
        return {key: value[perm] for key, value in params.items()}
    layers, names, rewrap = _mlp_layers(params)
    if not isinstance(permutations, Mapping):
        raise TypeError("for the MLP layout, permutations maps hidden layer names to (d_out,) ints")
    _hidden_names(names, permutations, "permutations")
    perms = {
        name: _check_permutation(p, layers[name]["kernel"].shape[1], name)
        for name, p in permutations.items()
    }
    out = {}
    for i, name in enumerate(names):
        layer = layers[name]
        kernel = layer["kernel"]
        if i > 0 and names[i - 1] in perms:
            kernel = kernel[perms[names[i - 1]], :]
        new = {"kernel": kernel[:, perms[name]] if name in perms else kernel}
        if "bias" in layer:
            new["bias"] = layer["bias"][perms[name]] if name in perms else layer["bias"]
        out[name] = {key: new[key] for key in layer}
    return rewrap(out)


def random_permute_units(key: jax.Array, params: PyTree) -> PyTree:
    """:func:`permute_units` with a uniformly random permutation of every hidden layer."""
    if _is_shallow(params):
        return permute_units(params, jax.random.permutation(key, params["w"].shape[0]))
    layers, names, _ = _mlp_layers(params)
    keys = jax.random.split(key, max(len(names) - 1, 1))
    perms = {
        name: jax.random.permutation(k, layers[name]["kernel"].shape[1])
        for name, k in zip(names[:-1], keys, strict=False)
    }
    return permute_units(params, perms)


def flip_units(params: PyTree, flips: jax.Array, *, activation: str) -> PyTree:
    """Discrete sign symmetries of a shallow net on the units where ``flips`` is True.

    Odd σ (``tanh``): (a_i, w_i, b_i) → (−a_i, −w_i, −b_i); even σ (``quadratic``):
    (a_i, w_i, b_i) → (a_i, −w_i, −b_i) (the parities of :mod:`sharpness_jax.activations`).

    Raises:
      ValueError: for an activation with no parity (ReLU / leaky ReLU: no sign symmetry) or
        a wrong shape.
    """
    m, _ = shallow.check_shallow(params, activation=activation)
    parity = shallow.get_activation(activation).parity
    if parity is None:
        raise ValueError(f"activation {activation!r} has no sign-flip symmetry")
    flips = jnp.asarray(flips)
    if flips.shape != (m,) or flips.dtype != bool:
        raise ValueError(f"flips must be a bool array of shape (m={m},)")
    sign = jnp.where(flips, -1.0, 1.0).astype(params["w"].dtype)
    return {
        key: leaf
        if (key == "a" and parity == "even")
        else leaf * sign.reshape((-1,) + (1,) * (leaf.ndim - 1))
        for key, leaf in params.items()
    }


def linear_gauge(params: PyTree, matrix: jax.Array) -> PyTree:
    """Dense gauge of a two-layer LINEAR network; the function is unchanged.

    For f(x) = (x W1 + b1) W2 + b2 (kernel convention, W1: (d, h), W2: (h, K)) and an
    invertible A (h × h): W1 → W1 A, b1 → b1 A, W2 → A⁻¹ W2, b2 unchanged. (In the (out, in)
    weight convention this is W1 → Aᵀ W1, W2 → W2 A⁻ᵀ.) Only for networks without an
    activation between the two layers.

    Args:
      params: MLP layout with exactly the layers Dense_0 and Dense_1.
      matrix: A, ``(h, h)``, invertible (checked when concrete).

    Raises:
      ValueError: a layout with other than two layers, a wrong shape or a singular A.
    """
    layers, names, rewrap = _mlp_layers(params)
    if len(names) != 2:
        raise ValueError(f"the linear gauge needs a two-layer network, got layers {names}")
    first, second = layers["Dense_0"], layers["Dense_1"]
    h = first["kernel"].shape[1]
    a = jnp.asarray(matrix, first["kernel"].dtype)
    if a.shape != (h, h):
        raise ValueError(f"the gauge matrix must be ({h}, {h}), got {a.shape}")
    val = checks.concrete_value(a)
    if val is not None:
        cond = np.linalg.cond(val) if np.all(np.isfinite(val)) else np.inf
        if not cond < 1 / (h * np.finfo(val.dtype).eps):
            raise ValueError(f"the gauge matrix must be invertible; its condition number is {cond}")
    new0 = {"kernel": first["kernel"] @ a}
    if "bias" in first:
        new0["bias"] = first["bias"] @ a
    new1 = {"kernel": jnp.linalg.solve(a, second["kernel"])}
    if "bias" in second:
        new1["bias"] = second["bias"]
    return rewrap(
        {
            "Dense_0": {key: new0[key] for key in first},
            "Dense_1": {key: new1[key] for key in second},
        }
    )


def random_linear_gauge(key: jax.Array, params: PyTree, *, log_std: float = 0.5) -> PyTree:
    """:func:`linear_gauge` with A = Q1 diag(exp(log_std · z)) Q2, Q1, Q2 random orthogonal
    (QR of Gaussian matrices), z ∼ N(0, I): condition number ≈ exp(log_std · range(z))."""
    checks.check_positive_scalar("log_std", log_std)
    layers, names, _ = _mlp_layers(params)
    if len(names) != 2:
        raise ValueError(f"the linear gauge needs a two-layer network, got layers {names}")
    h = layers["Dense_0"]["kernel"].shape[1]
    dtype = layers["Dense_0"]["kernel"].dtype
    k1, k2, k3 = jax.random.split(key, 3)
    q1 = jnp.linalg.qr(jax.random.normal(k1, (h, h), dtype))[0]
    q2 = jnp.linalg.qr(jax.random.normal(k2, (h, h), dtype))[0]
    s = jnp.exp(log_std * jax.random.normal(k3, (h,), dtype))
    return linear_gauge(params, (q1 * s[None, :]) @ q2)
