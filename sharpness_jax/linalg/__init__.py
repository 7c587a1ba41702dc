"""Linear algebra on matrix-free symmetric operators ``matvec: pytree -> pytree``.

Pytrees at the boundary: every function takes a ``template`` pytree (usually the params)
that fixes the vector space; flat vectors exist only inside the algorithms.

* Exact (:mod:`~sharpness_jax.linalg.exact`): :func:`dense`, :func:`diagonal_exact`,
  :func:`trace_exact`, :func:`frobenius_squared_exact` — one matvec per basis vector,
  ``chunk_size`` basis vectors at a time.
* Eigenvalues (:mod:`~sharpness_jax.linalg.lanczos`): :func:`lanczos_top_k` (partial or full
  reorthogonalisation, breakdown-safe, optional convergence stop, warm start),
  :func:`power_iteration`, :func:`lobpcg_top_k`.
* Stochastic (:mod:`~sharpness_jax.linalg.estimators`), each with an explicit key and probe
  count and a standard error: :func:`hutchinson_trace`, :func:`hutchinson_diagonal`,
  :func:`xtrace`, :func:`frobenius_squared` (integrands and samplers from
  ``matfree.stochtrace``), and the spectral density :func:`spectral_density` (stochastic
  Lanczos quadrature).
* One trace dispatch, :func:`trace` (``method`` one of ``TRACE_METHODS``: exact, Hutchinson or
  XTrace), returning an :class:`Estimate` either way (exact: standard error 0).
"""

from sharpness_jax.linalg import estimators, exact, lanczos
from sharpness_jax.linalg.estimators import (
    TRACE_METHODS,
    Estimate,
    SpectralDensity,
    frobenius_squared,
    hutchinson_diagonal,
    hutchinson_trace,
    spectral_density,
    trace,
    xtrace,
)
from sharpness_jax.linalg.exact import (
    basis_map,
    dense,
    diagonal_exact,
    flatten_operator,
    frobenius_squared_exact,
    trace_exact,
)
from sharpness_jax.linalg.lanczos import (
    REORTHOGONALISATION,
    Eigen,
    flatten_vectors,
    lanczos_top_k,
    lobpcg_top_k,
    power_iteration,
)

__all__ = [
    "REORTHOGONALISATION",
    "TRACE_METHODS",
    "Eigen",
    "Estimate",
    "SpectralDensity",
    "basis_map",
    "dense",
    "diagonal_exact",
    "estimators",
    "exact",
    "flatten_operator",
    "flatten_vectors",
    "frobenius_squared",
    "frobenius_squared_exact",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "lanczos",
    "lanczos_top_k",
    "lobpcg_top_k",
    "power_iteration",
    "spectral_density",
    "trace",
    "trace_exact",
    "xtrace",
]
