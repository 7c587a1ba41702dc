"""Fisher-geometric sharpness (Ahmed, Sarmah, Dutta 2026): the Riemannian sharpness
S_R = tr(F⁻¹H), measured in the Fisher metric, is invariant under function-preserving
reparametrisations where λ_max(H) and tr(H) are not (Dinh et al. 2017); its scaling with the
SGD temperature η/B matches the stationary law of the SGD SDE, and it tracks the
generalisation gap where the Euclidean measures do not.

A grid of SGD runs over learning rates η and batch sizes B (plus Adam runs) trains ReLU MLPs
with softmax cross-entropy to a common training loss. Every trained net θ is measured in
float64 on the training examples of the analysis:

* Ŝ_R = Σ_i H_ii / (F_ii + ε), F the diagonal empirical Fisher (1/n) Σ_p g_p ⊙ g_p, the
  estimator of the paper's experiments, as the trace of the whitened operator
  W = (D + εI)^{-1/2} H (D + εI)^{-1/2}, D = diag F (XTrace or Hutchinson with a standard
  error, or exactly for small P), for ε = 0 (coordinates with F_ii = 0, e.g. weights of
  always-zero pixels or dead units, are excluded and counted) and for the damped ε of the
  config;
* λ_max(D⁻¹H), the top generalised eigenvalue of H v = λ D v (Lanczos on W);
* the full true-Fisher version tr(F⁺H) and λ_max(F⁺H) with dense H and F = GGN on the output
  layer's block (``full_fisher_scope``; "all" for small P). The full Fisher of a ReLU MLP is
  always singular (every hidden unit's rescaling generator lies in ker F, and for
  cross-entropy the softmax shift too), so F⁺ is the pseudo-inverse on the range of F. On
  the output layer ker F is exactly the softmax shift, which H annihilates for every θ, so
  tr(F⁺H) there is exactly invariant. Near a minimum H ≈ F (= GGN) and tr(F⁺H) ≈ rank F;
* λ_max(H) by Lanczos and tr(H) by the same trace estimator;
* the generalisation gap: test − train loss, and test − train error (= train − test
  accuracy), from the run's final full-split evaluations;
* PAC-Bayes terms (standard form, ``pac_bayes.pac_bayes_bound``) with the posterior
  N(θ, ρ (D + εI)⁻¹), the damped Ŝ_R,ε and a prior N(0, σ_p² I), ρ and σ_p² minimising the bound
  over a grid (δ divided by the grid size).

Then every net is rescaled at random without changing its function (layer scales, then
unit scales, ``symmetries.random_rescale_layers`` / ``random_rescale_units``; a diagonal
change of coordinates θ' = Tθ) and measured again with the SAME probes and Lanczos start. The
whitened operator transforms as T D^{-1/2} T⁻¹ H T⁻¹ D^{-1/2} T = W (diagonal matrices
commute), so with ε = 0 every estimate computed from W is the same number before and after,
up to rounding; ε > 0 breaks this. (Hutchinson on D⁻¹H, zᵀD⁻¹Hz, would not be: its expectation
is invariant, its value for fixed probes is not.)

The ε = 0 estimator weighs every coordinate by 1/F_ii, and near an interpolating minimum of
cross-entropy F_ii spans many decades (weights seen only by a few, very confidently fitted
examples have H_ii/F_ii ~ 1/(1 − p_y)); ``top_direction_share`` = λ_max(D⁻¹H)/Ŝ_R reports how
much of Ŝ_R a single direction carries. Rank correlations are taken on values rounded to six
significant digits, so that numbers equal up to rounding tie.

Checks (per dataset), each with its source (Ahmed, Sarmah & Dutta 2026; PAPERS.md §1):

* Ŝ_R (ε = 0), λ_max(D⁻¹H) and tr(F⁺H) change by at most ``invariance_tol`` (relative) under
  rescaling (the paper's invariance of S_R under function-preserving reparametrisations,
  exact for the diagonal estimator under diagonal ones; PAPERS.md §1), and so does the
  adaptive sharpness (ξ = 0), invariant by its definition (Kwon et al. 2021, ASAM §3); the
  rescaled nets compute the same function (to 10³ machine epsilons);
* λ_max(H) and tr(H) change by at least ``euclidean_change_factor`` for every net (Dinh et
  al. 2017, the non-invariance the paper answers; PAPERS.md §1);
* Ŝ_R falls as the temperature η/B rises: Spearman ρ(Ŝ_R, η/B) < 0 over the SGD runs (ε = 0
  and the damped ε), with a bootstrap interval. The direction is our reading of the
  abstract's "scaling with η/B matches the theoretical predictions" (PAPERS.md §1);
* Ŝ_R tracks the loss gap better than λ_max(H) and tr(H): ρ(Ŝ_R, gap) > 0 and larger than
  both Euclidean ρ's, over all runs (ε = 0 and the damped ε). Source: the abstract and
  experiments ("S_R tracks the generalisation gap where λ_max(H) and tr(H) do not", PAPERS.md
  §1); the paper's own statistic could not be retrieved, the rank-correlation comparison is
  ours. The adaptive sharpness's ρ with the gaps is reported in the correlation table.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.flatten_util import ravel_pytree

from experiments.studies import common, fisher_sharpness_figures
from experiments.studies.fisher_sharpness_checks import (  # noqa: F401 (the study's API)
    EUCLIDEAN,
    INVARIANT,
    MEASURES,
    RIEMANNIAN,
    _checks,
    _rescaling_comparison,
    _temperature_check,
    bootstrap_rank_correlation,
    change_factor,
    correlations,
    relative_change,
    significant,
)
from sharpness_jax import (
    net_sharpness,
    pac_bayes,
    problem,
    riemannian,
    subsets,
    symmetries,
    worst_case,
)
from sharpness_jax.objective import Batch

NAME = "fisher_sharpness"

ESTIMATORS = riemannian.TRACE_ESTIMATORS
FULL_FISHER_SCOPES = ("output_layer", "all")

# ------------------------------------------------------------------------ pure helpers


def temperature(learning_rate: float, batch_size: int) -> float:
    """The SGD temperature η/B of the SDE dθ = −∇L dt + √(η/B) F^{1/2} dW."""
    if learning_rate <= 0 or batch_size < 1:
        raise ValueError(f"need η > 0 and B >= 1, got η={learning_rate}, B={batch_size}")
    return float(learning_rate) / int(batch_size)


def gap(row: Mapping[str, float]) -> dict[str, float]:
    """Generalisation gaps of a run: test − train loss, and test − train error."""
    return {
        "gap_loss": float(row["test_loss"]) - float(row["train_loss"]),
        "gap_error": float(row["train_accuracy"]) - float(row["test_accuracy"]),
    }


def grid(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The runs of one dataset: SGD at every (η, B), then Adam at every (η_adam, B_adam)."""
    runs = [
        {"optimizer": "sgd", "learning_rate": float(lr), "batch_size": int(b)}
        for lr in config.learning_rates
        for b in config.batch_sizes
    ]
    runs += [
        {"optimizer": "adam", "learning_rate": float(lr), "batch_size": int(b)}
        for lr in config.adam_learning_rates
        for b in config.adam_batch_sizes
    ]
    return runs


def run_name(setup: str, run: Mapping[str, Any]) -> str:
    return f"{setup}_{run['optimizer']}_lr{run['learning_rate']:g}_b{run['batch_size']}"


# ------------------------------------------------------------------------ the analysis


class _Setup:
    """One dataset of the study: its analysis data, objective and compiled measurements."""

    def __init__(self, config: ml_collections.ConfigDict, name: str):
        setup = config.setups[name]
        self.name = name
        self.run_base = common.run_config(
            config.base, dataset=setup.dataset.to_dict(), model=setup.model.to_dict()
        )
        if self.run_base.model.activation != "relu" or self.run_base.model.name != "mlp":
            raise ValueError("the rescaling symmetry needs a ReLU MLP (model mlp, activation relu)")
        if config.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {config.estimator!r}")
        if config.full_fisher_scope not in FULL_FISHER_SCOPES:
            raise ValueError(
                f"full_fisher_scope must be one of {FULL_FISHER_SCOPES}, got "
                f"{config.full_fisher_scope!r}"
            )
        self.config = config
        self._ready = False

    def run_config(self, run: Mapping[str, Any]) -> ml_collections.ConfigDict:
        """The training config of one run of :func:`grid`."""
        return common.run_config(
            self.run_base,
            **{
                "optimizer.name": run["optimizer"],
                "optimizer.learning_rate": run["learning_rate"],
                "batch_size": run["batch_size"],
            },
        )

    def _prepare(self) -> None:
        """Loads the analysis data and builds the objective in the analysis dtype."""
        if self._ready:
            return
        c, dtype = self.config, self.config.analysis_dtype
        prob = problem.problem_from_config(common.run_config(self.run_base, dtype=dtype))
        train = prob.dataset.train
        if c.analysis_examples is not None:
            train = jax.tree.map(lambda a: a[: c.analysis_examples], train)
        self.objective = prob.objective
        self.batch = Batch(jnp.asarray(train.inputs), jnp.asarray(train.targets))
        self.n = int(np.shape(train.inputs)[0])
        self.dtype = jnp.dtype(dtype)
        self._measure = jax.jit(
            functools.partial(
                net_sharpness.measure_net,
                self.objective,
                damping=float(c.damping),
                estimator=c.estimator,
                num_probes=int(c.num_probes),
                probe_chunk=c.probe_chunk,
                lanczos_iters=int(c.lanczos_iters),
                lanczos_tol=c.lanczos_tol,
                chunk_size=c.chunk_size,
            ),
            static_argnames=("full_fisher_subset",),
        )
        self._outputs = jax.jit(lambda p, x: self.objective.batch_outputs(p, x))
        self._ready = True

    def _adaptive(self, params: Any) -> jax.Array:
        """Adaptive sharpness max_{‖ε/|θ|‖ ≤ ρ} L(θ + ε) − L(θ) (Kwon et al. 2021) with ξ = 0:
        the ball scales with |θ|, so a diagonal rescaling θ' = Tθ maps the problem onto itself
        and the value is invariant (up to rounding)."""
        c = self.config
        return worst_case.worst_case_sharpness(
            self.objective,
            params,
            self.batch,
            rho=float(c.adaptive_rho),
            num_steps=int(c.adaptive_steps),
            adaptive=True,
            xi=0.0,
            chunk_size=c.chunk_size,
        ).sharpness

    def analyse(self, params: Any, index: int) -> dict[str, Any]:
        """Every measure of one trained net, before and after a random rescaling."""
        self._prepare()
        c = self.config
        params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), self.dtype), params)
        subset = (
            net_sharpness.output_layer(params) if c.full_fisher_scope == "output_layer" else None
        )
        key = jax.random.PRNGKey(c.analysis_seed)
        scale_key = jax.random.fold_in(jax.random.PRNGKey(c.rescale_seed), index)
        rescaled = symmetries.random_rescale(
            scale_key, params, layer_log_std=c.layer_log_std, unit_log_std=c.unit_log_std
        )
        before = dict(self._measure(params, self.batch, key, full_fisher_subset=subset))
        after = dict(self._measure(rescaled, self.batch, key, full_fisher_subset=subset))
        before["adaptive_sharpness"] = self._adaptive(params)
        after["adaptive_sharpness"] = self._adaptive(rescaled)
        f0 = self._outputs(params, self.batch.inputs)
        f1 = self._outputs(rescaled, self.batch.inputs)
        out = {k: float(v) for k, v in before.items() if k != "fisher_diagonal"}
        out.update({f"{k}_rescaled": float(v) for k, v in after.items() if k != "fisher_diagonal"})
        # The share of Ŝ_R carried by its top direction: near 1 when a few coordinates with
        # a tiny F_ii dominate the estimator.
        out["top_direction_share"] = out["riemannian_lambda_max"] / out["riemannian_sharpness"]
        out["function_change"] = float(jnp.max(jnp.abs(f1 - f0)) / jnp.max(jnp.abs(f0)))
        out["num_params"] = int(ravel_pytree(params)[0].size)
        out["num_examples"] = self.n
        out["full_fisher_block"] = subset or "all"
        out["full_fisher_block_size"] = int(
            ravel_pytree(params if subset is None else subsets.select(params, subset))[0].size
        )
        out["damping"] = float(c.damping)
        pac = pac_bayes.pac_bayes_terms(
            params,
            before["fisher_diagonal"],
            train_loss=out["analysis_loss"],
            sharpness=out["riemannian_sharpness_damped"],
            damping=float(c.damping),
            n=self.n,
            delta=float(c.pac_bayes_delta),
            rhos=tuple(c.pac_bayes_rhos),
            prior_variances=tuple(c.pac_bayes_prior_variances),
        )
        out.update({f"pac_bayes_{k}": v for k, v in pac.items()})
        return out


def _train_and_analyse(
    config, workdir: Path, setup: _Setup, *, mesh=None, cache=None
) -> list[dict[str, Any]]:
    """Trains every run of one dataset and analyses it (both resumable); one row per run."""
    rows = []
    for index, run in enumerate(grid(config)):
        name = run_name(setup.name, run)
        result = common.train_run(workdir, name, setup.run_config(run), mesh=mesh, cache=cache)
        final = common.columns(workdir, name)
        metrics = {k: float(final[k][-1]) for k in _SPLIT_METRICS}

        def compute(params=result.params, index=index):
            x64 = jax.enable_x64(True) if config.analysis_dtype == "float64" else nullcontext()
            with x64:
                return setup.analyse(params, index)

        analysis = common.cached(workdir, f"{name}_step{result.step}", compute)
        row = {
            "name": name,
            **run,
            "temperature": temperature(run["learning_rate"], run["batch_size"]),
            "status": result.status,
            "step": int(result.step),
            **metrics,
            **gap(metrics),
            **analysis,
        }
        logging.info(
            "%s: %s at step %d, gap %.4g, Ŝ_R %.4g, λ_max %.4g",
            name,
            result.status,
            result.step,
            row["gap_loss"],
            row["riemannian_sharpness"],
            row["lambda_max"],
        )
        rows.append(row)
    return rows


_SPLIT_METRICS = ("train_loss", "test_loss", "train_accuracy", "test_accuracy")


# ------------------------------------------------------------------------ the study


def run(config: ml_collections.ConfigDict, workdir: Path, *, mesh=None, cache=None):
    checks, results, figures = [], {}, []
    multiple = len(config.setups) > 1
    for setup_name in config.setups:
        setup = _Setup(config, setup_name)
        rows = _train_and_analyse(config, workdir, setup, mesh=mesh, cache=cache)
        corr = correlations(rows)
        prefix = f"{setup_name}: " if multiple else ""
        checks += _checks(config, rows, corr, prefix)
        changes = {m: _rescaling_comparison(rows, m, relative_change) for m in MEASURES}
        results[setup_name] = {
            "damping": float(config.damping),
            "estimator": config.estimator,
            "num_probes": int(config.num_probes) if config.estimator != "exact" else 0,
            "full_fisher_block": rows[0]["full_fisher_block"],
            "median_top_direction_share": float(
                np.median([r["top_direction_share"] for r in rows])
            ),
            "rank_correlations": corr,
            "max_relative_change": {m: max(values) for m, values in changes.items()},
            "runs": {
                r["name"]: {k: v for k, v in r.items() if k != "name" and not k.endswith("_block")}
                for r in rows
            },
        }
        figures += fisher_sharpness_figures.figures(
            workdir,
            rows,
            corr,
            [{m: changes[m][i] for m in MEASURES} for i in range(len(rows))],
            labels=MEASURES,
            tol=float(config.invariance_tol),
            tag=f"{setup_name}_" if multiple else "",
        )
    return checks, results, figures
