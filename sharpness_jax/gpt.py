r"""A small GPT-style language model: a causal decoder with outputs (T, V) for one sequence.

The decoder-only transformer of Radford et al. (2019, GPT-2) at small sizes, for one sequence of
T token ids (no batch axis; ``jax.vmap`` over a batch, as for every model of the zoo):

* token and learned position embeddings, h⁰_t = E[x_t] + P_t (E: V × d, P: T × d);
* L pre-LN blocks, each h ← h + Attn(LN(h)) and h ← h + MLP(LN(h)), with

  - causal multi-head self-attention with H heads of width d/H: q, k, v = LN(h) W_qkv + b,
    a_t = Σ_{s ≤ t} softmax_s(q_t·k_s / √(d/H)) v_s per head, the heads concatenated and
    projected by W_o (d × d) + b; position t attends to positions s ≤ t only;
  - an MLP d → m → d (m = 4d by default) with the exact (erf) GELU;

* a final layer norm and the head: logits_t = LN(h^L_t) Eᵀ (``tied_head``, GPT-2's choice) or
  LN(h^L_t) W_out with a separate W_out (d × V), no bias.

Layer norm is per position over the d features (``sharpness_jax.models.LayerNorm``, ε = 1e-6).
GPT-2 itself uses ε = 1e-5 and the tanh approximation of GELU; the zoo's layer norm and exact
GELU are used here.
Initialisation as GPT-2: embeddings and kernels ~ N(0, 0.02²), the two residual projections of
every block (W_o and the MLP's second layer) ~ N(0, 0.02²/(2L)), biases 0, layer-norm gains 1.
There is no dropout: the model is deterministic, and the output at position t depends on the
tokens x_1 … x_t of its own sequence alone (causal, per example).

Its outputs (T, V) take :func:`sharpness_jax.objective.token_cross_entropy`, which averages
(or sums) the next-token cross-entropy over positions with an optional padding mask, and applies
the GGN and Fisher per position without forming a (T·V)² matrix::

    model = sj.models.build_model("gpt", input_shape=(64,), num_outputs=256)
    objective = sj.Objective(model.predict, sj.token_cross_entropy("mean"))
    batch = sj.Batch(tokens, (next_tokens, mask))   # (n, T) int, ((n, T) int, (n, T) bool)
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sharpness_jax.activations import ACTIVATIONS
from sharpness_jax.models import LayerNorm, Model

__all__ = ["INIT_STD", "build_gpt"]

#: Standard deviation of GPT-2's initial embeddings and kernels.
INIT_STD = 0.02


def _dense(features: int, std: float, dtype: Any, name: str, bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=bias,
        param_dtype=dtype,
        kernel_init=nn.initializers.normal(std),
        name=name,
    )


class _Block(nn.Module):
    """One pre-LN block: h + Attn(LN h), then + MLP(LN h), on a (T, d) sequence."""

    num_heads: int
    mlp_width: int
    residual_std: float
    dtype: Any

    @nn.compact
    def __call__(self, h):
        length, width = h.shape
        head = width // self.num_heads
        qkv = _dense(3 * width, INIT_STD, self.dtype, "qkv")(
            LayerNorm(self.dtype, name="ln_attn")(h)
        )
        q, k, v = (a.reshape(length, self.num_heads, head) for a in jnp.split(qkv, 3, axis=-1))
        scores = jnp.einsum("thd,shd->hts", q, k) / math.sqrt(head)
        causal = jnp.tril(jnp.ones((length, length), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        attended = jnp.einsum("hts,shd->thd", jax.nn.softmax(scores, axis=-1), v)
        out = _dense(width, self.residual_std, self.dtype, "attn_out")
        h = h + out(attended.reshape(length, width))
        gelu = ACTIVATIONS["gelu"].fn
        m = LayerNorm(self.dtype, name="ln_mlp")(h)
        m = gelu(_dense(self.mlp_width, INIT_STD, self.dtype, "mlp_in")(m))
        return h + _dense(width, self.residual_std, self.dtype, "mlp_out")(m)


class _GPT(nn.Module):
    context_length: int
    vocab_size: int
    num_layers: int
    width: int
    num_heads: int
    mlp_width: int
    tied_head: bool
    dtype: Any

    @nn.compact
    def __call__(self, tokens):
        """``tokens``: (T,) integer ids -> logits (T, V)."""
        init = nn.initializers.normal(INIT_STD)
        embed = nn.Embed(
            self.vocab_size, self.width, embedding_init=init, param_dtype=self.dtype, name="wte"
        )
        positions = self.param("wpe", init, (self.context_length, self.width), self.dtype)
        h = embed(tokens) + positions
        residual_std = INIT_STD / math.sqrt(2 * self.num_layers)
        for layer in range(self.num_layers):
            block = _Block(
                self.num_heads, self.mlp_width, residual_std, self.dtype, name=f"block_{layer}"
            )
            h = block(h)
        h = LayerNorm(self.dtype, name="ln_f")(h)
        if self.tied_head:
            return embed.attend(h)
        return _dense(self.vocab_size, INIT_STD, self.dtype, "head", bias=False)(h)


def build_gpt(
    *,
    context_length: int,
    vocab_size: int,
    num_layers: int = 2,
    width: int = 128,
    num_heads: int = 4,
    mlp_width: int | None = None,
    tied_head: bool = True,
    param_dtype: Any = "float32",
) -> Model:
    """The GPT-style LM of the module docstring as a per-example :class:`Model`.

    ``predict(params, tokens)`` takes ONE sequence of ``context_length`` integer token ids in
    [0, V) (ids outside that range are not checked here: the embedding lookup fills them with
    NaN, which makes the whole sequence's logits NaN) and returns its logits (T, V);
    ``Model.num_outputs`` is V. Parameters are in the flax layout ``{"params": {"wte":
    {"embedding"}, "wpe", "block_i": {"ln_attn", "qkv", "attn_out", "ln_mlp", "mlp_in",
    "mlp_out"}, "ln_f", "head" (untied only)}}``, i = 0 … L − 1.

    Args:
      context_length: T, the sequence length.
      vocab_size: V.
      num_layers: L ≥ 1 blocks.
      width: d, divisible by ``num_heads``.
      num_heads: H.
      mlp_width: m, the MLP's hidden width (default 4d).
      tied_head: logits by the transposed token embedding (True) or a separate head (False).
      param_dtype: "float32", "float64", "bfloat16" or "float16"; the model computes in it.

    Raises:
      ValueError: for a non-positive size, d not divisible by H, or another dtype.
    """
    sizes = {
        "context_length": context_length,
        "vocab_size": vocab_size,
        "num_layers": num_layers,
        "width": width,
        "num_heads": num_heads,
        "mlp_width": 4 * width if mlp_width is None else mlp_width,
    }
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"gpt: {name} must be a positive int, got {value!r}")
    if width % num_heads:
        raise ValueError(f"gpt: width {width} is not divisible by num_heads {num_heads}")
    if not isinstance(tied_head, bool):
        raise ValueError(f"gpt: tied_head must be a bool, got {tied_head!r}")
    dtype = jnp.dtype(param_dtype)
    if dtype.name not in ("float32", "float64", "bfloat16", "float16"):
        raise ValueError(f"gpt: param_dtype must be a float dtype, got {param_dtype!r}")
    module = _GPT(**sizes, tied_head=tied_head, dtype=dtype)
    input_shape = (context_length,)

    @jax.jit
    def init(key):
        return module.init(key, jnp.zeros(input_shape, jnp.int32))

    def predict(params, tokens):
        tokens = jnp.asarray(tokens)
        if tokens.shape != input_shape or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"gpt.predict takes ONE sequence of {context_length} integer token ids (no "
                f"batch axis), got shape {tokens.shape} and dtype {tokens.dtype}; use jax.vmap "
                "over a batch"
            )
        return module.apply(params, tokens)

    return Model("gpt", init, predict, input_shape, vocab_size)
