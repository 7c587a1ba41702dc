"""Model zoo: per-example models ``predict(params, x) -> (K,)`` built with flax.linen.

Every model is a :class:`Model` bundle of ``init(key) -> params`` and a per-example
``predict(params, x)`` taking ONE example ``x`` of shape ``input_shape`` (no batch axis) and
returning its ``(K,)`` outputs, the form :class:`~sharpness_jax.objective.Objective` takes.
``predict`` computes in the dtype of the parameters (the input is cast to it), so float64
parameters give a float64 model under strict dtype promotion.

==============  ============================================================================
``mlp``         flatten, then Dense → σ for each hidden width, Dense to K. Parameters in the
                flax layout ``{"params": {"Dense_i": {"kernel": (d_in, d_out), "bias":
                (d_out,)}}}``, ``Dense_0`` the first layer.
``cnn``         for each channel count c: Conv 3×3 (c, SAME) → σ → 2×2 pooling (avg or max,
                stride 2); flatten, Dense to K. The edge-of-stability CNN is
                ``channels=(32, 32)``.
``resnet``      Conv 3×3 stem → σ, then stages of residual blocks
                x ← σ(P x + α·Conv(σ(Conv x))) without batch norm (P: identity, or a strided
                1×1 convolution where the shape changes; α = 1/√(number of blocks) by default,
                a fixup-style scaling that keeps the output variance bounded in depth);
                global average pooling, Dense to K.
``shallow``     f(x) = Σ_i a_i σ(w_iᵀ x + b_i) of :mod:`sharpness_jax.shallow`, layout
                ``{"w": (m, d), "b": (m,), "a": (m, K)}``, on the flattened input.
``quadratic``   f(x)_k = xᵀ(Σ_i a_ik w_i w_iᵀ)x: the shallow net with σ(z) = z², no bias.
==============  ============================================================================

Initialisations (``init=``) of kernels and biases, each multiplied by ``init_scale`` (layer-norm
gains and offsets start at 1 and 0); fan_in = d_in for a dense layer and kh·kw·c_in for a
convolution:

* ``"torch"``: PyTorch's default, weights and biases ~ U(−1/√fan_in, 1/√fan_in);
* ``"lecun"``: weights ~ N(0, 1/fan_in), zero biases;
* ``"he"``: weights ~ N(0, 2/fan_in) (PyTorch's ``kaiming_normal_``), zero biases.

``init`` is jitted and cuts all parameters from one normal and one uniform draw, so it
compiles in about the same time for any depth (one PRNG call per leaf would not).

The shallow and quadratic nets use :func:`~sharpness_jax.shallow.init_shallow` (LeCun normal).
Batch norm is refused as a ``normalization`` of these models: in training mode it mixes
examples, and curvature per example needs a model whose output for x depends on x alone. Layer
norm (per example) is available. The CIFAR-style ResNet-18 with batch norm is
:mod:`sharpness_jax.resnet18`: trainable params and running statistics kept apart, measured in
eval mode (statistics frozen, per example). The GPT-style causal LM ``"gpt"``
(:mod:`sharpness_jax.gpt`) takes T token ids and returns logits (T, V), for
:func:`~sharpness_jax.objective.token_cross_entropy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sharpness_jax.activations import ACTIVATIONS as _ACTIVATION_TABLE
from sharpness_jax.shallow import ACTIVATIONS as SHALLOW_ACTIVATIONS
from sharpness_jax.shallow import init_shallow, shallow_predict

PyTree = Any

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "MODELS",
    "SEQUENCE_MODELS",
    "STATEFUL_MODELS",
    "Model",
    "build_model",
    "check_per_example",
]

# The activations of the flax models, by their names in sharpness_jax.activations.
ACTIVATIONS: tuple[str, ...] = ("tanh", "relu", "elu", "gelu", "softplus")
INITS: tuple[str, ...] = ("torch", "lecun", "he")
_NORMALIZATIONS = (None, "layernorm")
_EXAMPLE_MIXING = ("batchnorm", "batch_norm", "batchnorm2d", "bn")
_PARAM_DTYPES = ("float32", "float64")


class Model(NamedTuple):
    """A per-example model.

    Attributes:
      name: the model's name in ``MODELS``.
      init: ``key -> params``.
      predict: ``(params, x) -> (K,)`` for one example ``x`` of shape ``input_shape``.
      input_shape: the shape of one example.
      num_outputs: K.
    """

    name: str
    init: Callable[[jax.Array], PyTree]
    predict: Callable[[PyTree, PyTree], jax.Array]
    input_shape: tuple[int, ...]
    num_outputs: int


# ----------------------------------------------------------------------------- initialisation


def _initializer(shapes: PyTree, *, scheme: str, scale: float) -> Callable[[jax.Array], PyTree]:
    """``key -> params`` for a flax parameter tree with the given leaf shapes.

    Every leaf is cut from ONE standard-normal vector z and ONE uniform vector u on [−1, 1)
    of the total parameter count (two PRNG calls, so compile time does not grow with the
    number of layers). With fan_in = the product of a kernel's dimensions except the last:

    * ``kernel``: torch scale·u/√fan_in; lecun scale·z/√fan_in; he scale·√2·z/√fan_in;
    * ``bias`` next to a kernel: torch scale·u/√fan_in (of that kernel); zero otherwise;
    * layer-norm ``scale`` and ``bias``: 1 and 0.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    fan_in = {
        path[:-1]: math.prod(leaf.shape[:-1])
        for path, leaf in flat
        if path[-1] == jax.tree_util.DictKey("kernel")
    }
    total = sum(leaf.size for _, leaf in flat)
    gain = {"torch": 1.0, "lecun": 1.0, "he": math.sqrt(2.0)}[scheme]

    def init(key: jax.Array) -> PyTree:
        dtype = flat[0][1].dtype
        k_normal, k_uniform = jax.random.split(key)
        z = jax.random.normal(k_normal, (total,), dtype)
        u = jax.random.uniform(k_uniform, (total,), dtype, -1.0, 1.0)
        leaves, offset = [], 0
        for path, leaf in flat:
            name = path[-1].key
            noise = (u if scheme == "torch" else z)[offset : offset + leaf.size]
            noise = noise.reshape(leaf.shape)
            offset += leaf.size
            if path[:-1] in fan_in and (name == "kernel" or scheme == "torch"):
                leaves.append((scale * gain / math.sqrt(fan_in[path[:-1]])) * noise)
            elif name == "scale":
                leaves.append(jnp.ones(leaf.shape, leaf.dtype))
            else:  # biases of lecun/he layers, layer-norm offsets
                leaves.append(jnp.zeros(leaf.shape, leaf.dtype))
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return init


# ----------------------------------------------------------------------------- modules


class LayerNorm(nn.Module):
    """Layer norm of one example: (x − mean)/√(var + ε) · γ + β over all its axes.

    Written out (rather than ``flax.linen.LayerNorm``) so that it runs in float64 under strict
    dtype promotion; γ, β are per feature (last axis).
    """

    param_dtype: Any
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        axes = tuple(range(1, x.ndim)) if x.ndim > 1 else (0,)
        mean = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
        shape = (1,) * (x.ndim - 1) + (x.shape[-1],)
        gamma = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        beta = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        return y * gamma.reshape(shape) + beta.reshape(shape)


class _Layers(nn.Module):
    """Shared settings and layer factories of the flax models."""

    activation: str
    param_dtype: Any
    bias: bool
    normalization: str | None

    def dense(self, features: int) -> nn.Dense:
        return nn.Dense(features, use_bias=self.bias, param_dtype=self.param_dtype)

    def conv(self, features: int, *, size: int = 3, stride: int = 1, bias: bool | None = None):
        return nn.Conv(
            features,
            (size, size),
            strides=(stride, stride),
            padding="SAME",
            use_bias=self.bias if bias is None else bias,
            param_dtype=self.param_dtype,
        )

    def norm(self, x: jax.Array) -> jax.Array:
        """Layer norm over all axes of one example (features, or H, W, C), if chosen."""
        if self.normalization is None:
            return x
        return LayerNorm(self.param_dtype)(x)

    def act(self, x: jax.Array) -> jax.Array:
        return _ACTIVATION_TABLE[self.activation].fn(x)


class _MLP(_Layers):
    widths: tuple[int, ...] = ()
    num_outputs: int = 1

    @nn.compact
    def __call__(self, x):
        x = x.reshape(-1)
        for width in self.widths:
            x = self.act(self.norm(self.dense(width)(x)))
        return self.dense(self.num_outputs)(x)


def _pool(x: jax.Array, kind: str) -> jax.Array:
    """2×2 pooling with stride 2 ("VALID") over H, W of a ``(1, H, W, C)`` array."""
    # Python-scalar identities select the differentiable reduce_window_{max,sum} primitives.
    window = (1, 2, 2, 1)
    if kind == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, window, "VALID")
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, "VALID") / 4.0


class _CNN(_Layers):
    channels: tuple[int, ...] = ()
    pooling: str = "avg"
    num_outputs: int = 1

    @nn.compact
    def __call__(self, x):
        x = x[None]
        for c in self.channels:
            x = self.act(self.norm(self.conv(c)(x)))
            x = _pool(x, self.pooling)
        x = x.reshape(-1)
        return self.dense(self.num_outputs)(x)


class _ResNet(_Layers):
    widths: tuple[int, ...] = ()
    blocks_per_stage: int = 1
    residual_scale: float | None = None
    num_outputs: int = 1

    @nn.compact
    def __call__(self, x):
        alpha = self.residual_scale
        if alpha is None:
            alpha = 1.0 / math.sqrt(len(self.widths) * self.blocks_per_stage)
        x = x[None]
        x = self.act(self.norm(self.conv(self.widths[0])(x)))
        for stage, width in enumerate(self.widths):
            for block in range(self.blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                c_in = x.shape[-1]
                h = self.act(self.norm(self.conv(width, stride=stride)(x)))
                h = self.norm(self.conv(width)(h))
                if stride != 1 or c_in != width:
                    x = self.conv(width, size=1, stride=stride, bias=False)(x)
                x = self.act(x + alpha * h)
        x = jnp.mean(x[0], axis=(0, 1))
        return self.dense(self.num_outputs)(x)


# ----------------------------------------------------------------------------- building

_COMMON = {"init": "torch", "init_scale": 1.0, "param_dtype": "float32"}
_FLAX_COMMON = {**_COMMON, "activation": "relu", "bias": True, "normalization": None}
_OPTIONS: dict[str, dict[str, Any]] = {
    "mlp": {**_FLAX_COMMON, "widths": (512, 512)},
    "cnn": {**_FLAX_COMMON, "channels": (32, 32), "pooling": "avg"},
    "resnet": {
        **_FLAX_COMMON,
        "widths": (16, 32),
        "blocks_per_stage": 1,
        "residual_scale": None,
    },
    "shallow": {**_COMMON, "init": "lecun", "width": 16, "activation": "relu", "bias": True},
    "quadratic": {**_COMMON, "init": "lecun", "width": 16},
}
MODELS: tuple[str, ...] = tuple(_OPTIONS)
#: Models with non-trainable state (batch-norm statistics): ``build_model`` returns a
#: :class:`~sharpness_jax.resnet18.StatefulModel` for them.
STATEFUL_MODELS: tuple[str, ...] = ("resnet18",)
#: Sequence models with outputs (T, V) per example (:mod:`sharpness_jax.gpt`), for
#: :func:`~sharpness_jax.objective.token_cross_entropy`.
SEQUENCE_MODELS: tuple[str, ...] = ("gpt",)


def _positive_ints(name: str, value: Any, *, allow_empty: bool) -> tuple[int, ...]:
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        value = (value,)
    try:
        value = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive ints, got {value!r}") from None
    if (not value and not allow_empty) or not all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) and v > 0 for v in value
    ):
        raise ValueError(f"{name} must be a sequence of positive ints, got {value!r}")
    return tuple(int(v) for v in value)


def _choice(name: str, value: Any, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(choices)}")


def _validate(name: str, options: dict[str, Any]) -> dict[str, Any]:
    norm = options.get("normalization")
    if isinstance(norm, str) and norm.lower() in _EXAMPLE_MIXING:
        raise ValueError(
            f"normalization={norm!r} is refused: batch norm in training mode normalises each "
            "example with statistics of the whole batch, so the output for one example depends "
            "on the others and per-example gradients, Hessians and noise covariances are not "
            "defined. Use normalization=None or 'layernorm' (per example)."
        )
    defaults = _OPTIONS[name]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"model {name!r} takes no option(s) {unknown}; its options: {sorted(defaults)}"
        )
    opts = {**defaults, **options}
    choices = SHALLOW_ACTIVATIONS if name == "shallow" else ACTIVATIONS
    if "activation" in opts:
        _choice("activation", opts["activation"], tuple(choices))
    _choice("init", opts["init"], ("lecun",) if name in ("shallow", "quadratic") else INITS)
    if not (isinstance(opts["init_scale"], int | float) and opts["init_scale"] > 0):
        raise ValueError(f"init_scale must be a positive number, got {opts['init_scale']!r}")
    try:
        dtype_name = np.dtype(opts["param_dtype"]).name
    except TypeError:
        dtype_name = repr(opts["param_dtype"])
    _choice("param_dtype", dtype_name, _PARAM_DTYPES)
    opts["param_dtype"] = jnp.dtype(dtype_name)
    if "normalization" in opts:
        _choice("normalization", opts["normalization"], _NORMALIZATIONS)
    if "pooling" in opts:
        _choice("pooling", opts["pooling"], ("avg", "max"))
    for key in ("widths", "channels"):
        if key in opts:
            opts[key] = _positive_ints(key, opts[key], allow_empty=name == "mlp")
    for key in ("width", "blocks_per_stage"):
        if key in opts:
            (opts[key],) = _positive_ints(key, opts[key], allow_empty=False)
    if opts.get("residual_scale") is not None and not opts["residual_scale"] > 0:
        raise ValueError(f"residual_scale must be positive or None, got {opts['residual_scale']}")
    return opts


def build_model(name: str, *, input_shape: Sequence[int], num_outputs: int, **options: Any):
    """Builds a per-example model from the zoo (or a stateful one of ``STATEFUL_MODELS``).

    Args:
      name: one of ``MODELS``, or ``"resnet18"`` (``STATEFUL_MODELS``): the batch-norm
        ResNet-18 of :func:`sharpness_jax.resnet18.build_resnet18`, options
        ``width_multiplier`` (1.0) and ``param_dtype``; or ``"gpt"`` (``SEQUENCE_MODELS``):
        the causal LM of :func:`sharpness_jax.gpt.build_gpt` with ``input_shape=(T,)``,
        ``num_outputs=V`` and outputs (T, V), options ``num_layers`` (2), ``width`` (128),
        ``num_heads`` (4), ``mlp_width`` (4·width), ``tied_head`` (True), ``param_dtype``.
      input_shape: the shape of ONE example, e.g. ``(28, 28, 1)``; ``cnn`` and ``resnet`` need
        ``(H, W, C)``, the others flatten it.
      num_outputs: K, the number of outputs (classes).
      **options: common to all: ``init`` ("torch"; "lecun" for shallow/quadratic, their only
        choice), ``init_scale`` (1.0), ``param_dtype`` ("float32" or "float64").
        mlp/cnn/resnet: ``activation`` ("relu"; tanh, relu, elu, gelu, softplus), ``bias``
        (True), ``normalization`` (None or "layernorm"). mlp: ``widths`` (hidden sizes,
        (512, 512)). cnn: ``channels`` ((32, 32)), ``pooling`` ("avg" or "max"). resnet:
        ``widths`` (channels per stage, (16, 32)), ``blocks_per_stage`` (1),
        ``residual_scale`` (None: 1/√(number of blocks)). shallow: ``width`` (16),
        ``activation`` (relu, leaky_relu, quadratic, tanh), ``bias`` (True). quadratic:
        ``width`` (16).

    Returns:
      The :class:`Model` (a :class:`~sharpness_jax.resnet18.StatefulModel` for resnet18).

    Raises:
      ValueError: for an unknown model or option, an invalid value, or batch norm.
    """
    if name in STATEFUL_MODELS:
        return _build_stateful(name, input_shape, num_outputs, options)
    if name in SEQUENCE_MODELS:
        return _build_sequence(input_shape, num_outputs, options)
    _choice("model", name, MODELS + STATEFUL_MODELS + SEQUENCE_MODELS)
    input_shape = _positive_ints("input_shape", input_shape, allow_empty=False)
    (num_outputs,) = _positive_ints("num_outputs", num_outputs, allow_empty=False)
    opts = _validate(name, options)
    if name in ("cnn", "resnet") and len(input_shape) != 3:
        raise ValueError(f"{name} takes images of shape (H, W, C), got input_shape={input_shape}")
    dtype = opts["param_dtype"]

    if name in ("shallow", "quadratic"):
        activation = opts.get("activation", "quadratic")
        bias = opts.get("bias", False)
        dim = math.prod(input_shape)

        def init(key):
            return init_shallow(
                key,
                input_dim=dim,
                width=opts["width"],
                num_outputs=num_outputs,
                bias=bias,
                scale=opts["init_scale"],
                dtype=dtype,
            )

        def apply(params, x):
            x = x.reshape(-1).astype(params["w"].dtype)
            return shallow_predict(params, x, activation=activation)

    else:
        module_cls = {"mlp": _MLP, "cnn": _CNN, "resnet": _ResNet}[name]
        fields = {k: v for k, v in opts.items() if k not in ("init", "init_scale")}
        module = module_cls(**fields, num_outputs=num_outputs)
        key_shape = jax.ShapeDtypeStruct((2,), jnp.uint32)
        shapes = jax.eval_shape(module.init, key_shape, jax.ShapeDtypeStruct(input_shape, dtype))
        init = jax.jit(_initializer(shapes, scheme=opts["init"], scale=opts["init_scale"]))

        def apply(params, x):
            x = x.astype(jax.tree.leaves(params)[0].dtype)
            return module.apply(params, x)

    def predict(params, x):
        if jnp.shape(x) != input_shape:
            raise ValueError(
                f"{name}.predict takes ONE example of shape {input_shape} (no batch axis), got "
                f"shape {jnp.shape(x)}; use jax.vmap over a batch"
            )
        return apply(params, jnp.asarray(x))

    return Model(name, init, predict, input_shape, num_outputs)


def _build_stateful(name: str, input_shape, num_outputs, options: dict[str, Any]):
    from sharpness_jax.resnet18 import build_resnet18

    unknown = sorted(set(options) - {"width_multiplier", "param_dtype"})
    if unknown:
        raise ValueError(
            f"model {name!r} takes no option(s) {unknown}; its options: "
            "['param_dtype', 'width_multiplier']"
        )
    dtype = np.dtype(options.get("param_dtype", "float32")).name
    return build_resnet18(
        input_shape=input_shape,
        num_outputs=int(num_outputs),
        width_multiplier=options.get("width_multiplier", 1.0),
        param_dtype=dtype,
    )


def _build_sequence(input_shape, num_outputs, options: dict[str, Any]) -> Model:
    from sharpness_jax.gpt import build_gpt

    (context_length,) = _positive_ints("input_shape", input_shape, allow_empty=False)
    (vocab_size,) = _positive_ints("num_outputs", num_outputs, allow_empty=False)
    allowed = {"num_layers", "width", "num_heads", "mlp_width", "tied_head", "param_dtype"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"model 'gpt' takes no option(s) {unknown}; its options: {sorted(allowed)}"
        )
    if "param_dtype" in options:
        options = {**options, "param_dtype": np.dtype(options["param_dtype"]).name}
    return build_gpt(context_length=context_length, vocab_size=vocab_size, **options)


def check_per_example(
    predict: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    inputs: PyTree,
    *,
    rtol: float | None = None,
) -> None:
    """Checks that ``predict`` treats examples independently.

    Compares ``vmap(predict)`` over the batch with ``predict`` applied to one example at a time
    (``lax.map``): max_p ‖f_vmap(x_p) − f(x_p)‖_∞ ≤ rtol · max_p ‖f(x_p)‖_∞. A model whose output
    for one example depends on the others (batch statistics, a callback that sees the batch)
    fails.

    Args:
      predict: ``(params, x) -> (K,)``.
      params: the parameters.
      inputs: a batch (leaves with a leading example axis).
      rtol: tolerance; default 1e-10 for float64 outputs, 1e-5 otherwise.

    Raises:
      ValueError: if an output is not a vector per example, or the two evaluations differ.
    """
    batched = jax.jit(jax.vmap(predict, in_axes=(None, 0)))(params, inputs)
    alone = jax.jit(lambda p, xs: jax.lax.map(lambda x: predict(p, x), xs))(params, inputs)
    if jnp.ndim(alone) != 2:
        raise ValueError(
            f"predict must return a vector (K,) per example; got {jnp.shape(alone)[1:]}"
        )
    batched, alone = np.asarray(batched), np.asarray(alone)
    if rtol is None:
        rtol = 1e-10 if alone.dtype == np.float64 else 1e-5
    err = np.max(np.abs(batched - alone), axis=1)
    scale = max(float(np.max(np.abs(alone))), np.finfo(alone.dtype).tiny)
    worst = int(np.argmax(err))
    if not err[worst] <= rtol * scale:
        raise ValueError(
            "predict is not per-example: evaluated in a batch (vmap) and alone, example "
            f"{worst} differs by {err[worst]:.3g} (outputs of size {scale:.3g}, rtol {rtol}); "
            "the output for one example must not depend on the others (no batch norm)"
        )
