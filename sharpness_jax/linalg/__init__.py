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

Half precision
--------------
A template in bfloat16 or float16 (a half-precision model) is handled by
:func:`~sharpness_jax.linalg.exact.widen_operator`: each matvec runs in the model's dtype
(its vector is cast down, the products stay in half precision), and everything else — the
Lanczos vectors and their reorthogonalisation inner products, the tridiagonal and Ritz
solves, probe sums, exact diagonals and traces — is float32; values and estimates come back in
float32, eigenvectors in the model's dtype. Partial reorthogonalisation takes the half
precision ε for its ω recurrence (the matvec's rounding error), so ghost copies of converged
Ritz values do not appear. The operators' sums over chunks of examples
(:func:`~sharpness_jax.per_example.sum_over_chunks`) and the Gram matrices of
:mod:`~sharpness_jax.gradient_gram` accumulate in float32 too.

Accuracy to expect, relative error against float64 on the same (float32-initialised)
parameters and inputs, which the half-precision run rounds to its dtype; softmax
cross-entropy, n = 64 inputs of shape 8 × 8 × 1, K = 10; MLP tanh 64-32-32-10 (P = 3466),
CNN tanh conv 4, conv 8, dense (P = 1010); λ_max by 40 Lanczos steps, Hutchinson with 100
Rademacher probes (same probes in every dtype), SLQ 8 probes × 30 steps (L1 distance of the
densities relative to the float64 one), products ‖Av − A₆₄v‖/‖A₆₄v‖ for one Gaussian v:

=====================  ==========  ==========  ==========  ==========  ==========  ==========
quantity               MLP f32     MLP bf16    MLP f16     CNN f32     CNN bf16    CNN f16
=====================  ==========  ==========  ==========  ==========  ==========  ==========
λ_max (Lanczos)        5e-8        9e-5        5e-5        2e-7        1.2e-2      3e-4
tr H (Hutchinson)      3e-8        1.9e-3      3e-4        1e-8        4.9e-3      1e-4
tr H (exact)           1e-7        1.3e-3      4e-4        4e-8        4.8e-3      3e-5
tr C (exact, P HVPs)   7e-8        8e-5        6e-5        2e-7        1.8e-3      4e-4
tr C (Gram matrix)     8e-9        1.2e-4      6e-5        1e-7        1.1e-3      8e-5
SLQ density (L1)       6e-7        3.2e-3      3e-4        4e-7        2.8e-2      2.8e-3
H v                    2e-7        7e-3        9e-4        2e-7        3.5e-2      1.3e-3
GGN v                  1e-7        4.5e-3      8e-4        8e-8        3.0e-2      1.3e-3
Fisher v               2e-7        5.0e-3      7e-4        8e-8        3.0e-2      1.3e-3
C v                    2e-7        7.8e-3      1e-3        1e-7        1.7e-2      9e-4
=====================  ==========  ==========  ==========  ==========  ==========  ==========

So a single bfloat16 product is good to about 10 u (u = 2⁻⁸ ≈ 3.9e-3) on the CNN, and
scalar summaries (λ_max, traces) to a few u or better, since rounding errors average out
over the parameters; float16 (u = 2⁻¹¹) is about eight times more accurate. Expect eigenvalue
gaps and small eigenvalues below ~u·λ_max to be unresolved in half precision.
"""

from sharpness_jax.linalg import estimators, exact, lanczos
from sharpness_jax.linalg.estimators import (
    TRACE_METHODS,
    Estimate,
    SpectralDensity,
    frobenius_squared,
    hutchinson_diagonal,
    hutchinson_trace,
    quadratic_form_trace,
    rademacher_sampler,
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
    "quadratic_form_trace",
    "rademacher_sampler",
    "spectral_density",
    "trace",
    "trace_exact",
    "xtrace",
]
