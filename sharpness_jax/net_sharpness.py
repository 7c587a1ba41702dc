"""Every Riemannian and Euclidean sharpness of one net at once (the Fisher-sharpness study).

:func:`measure_net` measures, on one batch, the diagonal Riemannian sharpness
Ŝ_R = Σ_i H_ii / D_ii with and without damping, λ_max(D⁻¹H), the dense full-Fisher tr(F⁺H)
(:func:`sharpness_jax.riemannian.riemannian_sharpness_dense`), λ_max(H) and tr(H), with one
trace estimator (:func:`sharpness_jax.riemannian.trace_estimate`) and one Lanczos
(:func:`sharpness_jax.riemannian.riemannian_top_k`) mapped over the diagonal scalings of the
whitened operators. :func:`output_layer` names the dense version's default parameter block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sharpness_jax import fisher_metrics, operators, riemannian, subsets
from sharpness_jax.objective import Batch, Objective

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

__all__ = ["measure_net", "output_layer"]


def output_layer(params: PyTree) -> str:
    """The '/'-path of the last Dense layer of an MLP layout (the output layer)."""
    paths = subsets.leaf_paths(params)
    layers = sorted({p.rsplit("/", 1)[0] for p in paths}, key=lambda p: int(p.rsplit("_", 1)[1]))
    return layers[-1]


def _scaling(s: PyTree) -> MatVec:
    return lambda v: jax.tree.map(jnp.multiply, s, v)


def _scaled_traces(hvp, scales, keys, template, *, estimator, num_probes, probe_chunk):
    """tr(s ⊙ H(s ⊙ ·)) for each stacked scaling s (one estimator mapped, compiled once)."""

    def trace(args):
        s, k = args
        est = riemannian.trace_estimate(
            riemannian.whitened_hessian(hvp, _scaling(s)),
            template,
            estimator=estimator,
            key=k,
            num_probes=num_probes,
            probe_chunk=probe_chunk,
        )
        return est.value, est.stderr

    return jax.lax.map(trace, (scales, keys))


def _scaled_tops(hvp, scales, template, *, key, num_iters, tol):
    """λ_max(s ⊙ H(s ⊙ ·)) for each stacked scaling s, by one Lanczos mapped over them."""

    def top(s):
        eig = riemannian.riemannian_top_k(
            hvp, _scaling(s), template, k=1, num_iters=num_iters, key=key, tol=tol
        )
        return eig.values[0]

    return jax.lax.map(top, scales)


def _scalings(f_diag: PyTree, params: PyTree, damping: float) -> PyTree:
    """The stacked scalings s of the whitened operators v -> s ⊙ H(s ⊙ v): W_0, W_ε and H
    itself (s = 1)."""
    ones = jax.tree.map(jnp.ones_like, params)
    return jax.tree.map(
        lambda *leaves: jnp.stack(leaves),
        fisher_metrics.diagonal_inverse_sqrt(f_diag)(ones),
        fisher_metrics.diagonal_inverse_sqrt(f_diag, damping=damping)(ones),
        ones,
    )


def _full_fisher(objective, params, batch, subset, chunk_size, probe_chunk):
    """tr(F⁺H), λ_max(F⁺H) and rank F, dense, with the true Fisher on ``subset``."""
    return riemannian.riemannian_sharpness_dense(
        objective,
        params,
        batch,
        fisher="true",
        pinv=True,
        subset=subset,
        chunk_size=chunk_size,
        probe_chunk=probe_chunk,
    )


def _record(values, stderrs, tops, full, loss, flat_f) -> dict[str, jax.Array]:
    """:func:`measure_net`'s dict from the mapped traces and tops (W_0, W_ε, H)."""
    return {
        "riemannian_sharpness": values[0],
        "riemannian_sharpness_stderr": stderrs[0],
        "riemannian_sharpness_damped": values[1],
        "riemannian_sharpness_damped_stderr": stderrs[1],
        "riemannian_lambda_max": tops[0],
        "full_fisher_sharpness": full.trace,
        "full_fisher_lambda_max": full.lambda_max,
        "full_fisher_rank": full.rank,
        "lambda_max": tops[1],
        "trace_hessian": values[2],
        "trace_hessian_stderr": stderrs[2],
        "analysis_loss": loss,
        "num_excluded": jnp.sum(flat_f <= 0, dtype=jnp.int32),
        "fisher_diagonal": flat_f,
    }


def measure_net(
    objective: Objective,
    params: PyTree,
    batch: Batch,
    key: jax.Array,
    *,
    damping: float,
    estimator: str = "xtrace",
    num_probes: int = 100,
    probe_chunk: int | None = None,
    lanczos_iters: int = 64,
    lanczos_tol: float | None = 1e-6,
    full_fisher_subset: subsets.Selector | None = None,
    chunk_size: int | None = None,
) -> dict[str, jax.Array]:
    """Riemannian and Euclidean sharpness of one net on ``batch`` (all means over examples).

    With D = diag F_emp = (1/n) Σ_p g_p ⊙ g_p and W_ε = (D + εI)^{-1/2} H (D + εI)^{-1/2}
    (coordinates with D_ii + ε = 0 excluded):

    * ``riemannian_sharpness`` = tr W_0 = Σ_i H_ii / D_ii (± ``_stderr``);
    * ``riemannian_sharpness_damped`` = tr W_ε = Σ_i H_ii / (D_ii + ε), same probes;
    * ``riemannian_lambda_max`` = λ_max(W_0), the top generalised eigenvalue of H v = λ D v;
    * ``full_fisher_sharpness`` / ``full_fisher_lambda_max`` / ``full_fisher_rank``:
      tr(F⁺H), λ_max(F⁺H) and rank F with dense H and the true Fisher F (pseudo-inverse) on
      ``full_fisher_subset`` (None: all parameters);
    * ``lambda_max`` = λ_max(H) (Lanczos), ``trace_hessian`` = tr H (± ``_stderr``);
    * ``analysis_loss`` = L(θ) on ``batch``, ``num_excluded`` = #{i : D_ii = 0},
      ``fisher_diagonal`` = D (flat, for the PAC-Bayes KL).

    The traces are exact (``estimator="exact"``: P products of W) or stochastic
    (``"xtrace"``, ``"hutchinson"``, ``num_probes`` probes, with a standard error). Keys: the
    traces of W_0 and W_ε share one probe key, tr H has another, and both Lanczos runs share
    a start key, so that measuring a reparametrised net with the same ``key`` applies the
    same probes to the same whitened matrix. Jit-friendly (``full_fisher_subset`` static).

    Args:
      objective, params, batch: the net and the examples (the analysis batch).
      key: PRNG key of the probes and the Lanczos start vectors.
      damping: ε ≥ 0 of the damped Ŝ_R,ε.
      estimator: "exact", "xtrace" or "hutchinson".
      num_probes, probe_chunk: the stochastic budget and the probes per batched product.
      lanczos_iters, lanczos_tol: Lanczos budget and relative residual tolerance.
      full_fisher_subset: parameter subset of the dense full-Fisher version.
      chunk_size: examples per chunk.

    Returns:
      A dict of scalars (and the flat ``fisher_diagonal``).
    """
    f_diag = fisher_metrics.empirical_fisher_diagonal(
        objective, params, batch, chunk_size=chunk_size
    )
    hvp = operators.hessian(objective, params, batch, chunk_size=chunk_size)
    scales = _scalings(f_diag, params, damping)
    key_sr, key_tr, key_lz = jax.random.split(key, 3)
    values, stderrs = _scaled_traces(
        hvp,
        scales,
        jnp.stack([key_sr, key_sr, key_tr]),
        params,
        estimator=estimator,
        num_probes=num_probes,
        probe_chunk=probe_chunk,
    )
    # λ_max(W_0) = λ_max(D⁻¹H) and λ_max(H).
    tops = _scaled_tops(
        hvp,
        jax.tree.map(lambda a: a[::2], scales),
        params,
        key=key_lz,
        num_iters=lanczos_iters,
        tol=lanczos_tol,
    )
    full = _full_fisher(objective, params, batch, full_fisher_subset, chunk_size, probe_chunk)
    loss = operators.loss_value(objective, params, batch, chunk_size=chunk_size)
    return _record(values, stderrs, tops, full, loss, ravel_pytree(f_diag)[0])
