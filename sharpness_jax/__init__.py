"""sharpness_jax: exact loss curvature, Fisher geometry and SGD noise for neural networks.

Pure functions on ``jax.jvp`` / ``jax.vjp`` / ``jax.vmap``: build an :class:`Objective`
(a per-example model and loss), then curvature operators (``hessian``, ``ggn``, ``fisher``,
``empirical_fisher``, ``gradient_covariance``, ``hessian_second_moment``) that return matvec
functions over parameter pytrees, and feed them to the algorithms in :mod:`linalg`.
"""

from sharpness_jax import checks, linalg, objective, operators, per_example, subsets
from sharpness_jax.checks import check_finite
from sharpness_jax.linalg import (
    Eigen,
    Estimate,
    SpectralDensity,
    dense,
    diagonal_exact,
    frobenius_squared,
    frobenius_squared_exact,
    hutchinson_diagonal,
    hutchinson_trace,
    lanczos_top_k,
    lobpcg_top_k,
    power_iteration,
    spectral_density,
    trace_exact,
    xtrace,
)
from sharpness_jax.objective import (
    Batch,
    Loss,
    Objective,
    get_loss,
    softmax_cross_entropy,
    squared_error,
)
from sharpness_jax.operators import (
    empirical_fisher,
    fisher,
    fisher_monte_carlo,
    ggn,
    gradient,
    gradient_covariance,
    hessian,
    hessian_second_moment,
    jacobian_tvp,
    jacobian_vp,
    loss_value,
)
from sharpness_jax.per_example import (
    map_examples,
    per_example_grads,
    per_example_hvps,
    per_example_jacobians,
    per_example_losses,
    sum_examples,
    sum_over_chunks,
)
from sharpness_jax.subsets import embed, leaf_paths, num_params, restrict, select

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Eigen",
    "Estimate",
    "Loss",
    "Objective",
    "SpectralDensity",
    "check_finite",
    "checks",
    "dense",
    "diagonal_exact",
    "embed",
    "empirical_fisher",
    "fisher",
    "fisher_monte_carlo",
    "frobenius_squared",
    "frobenius_squared_exact",
    "get_loss",
    "ggn",
    "gradient",
    "gradient_covariance",
    "hessian",
    "hessian_second_moment",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "jacobian_tvp",
    "jacobian_vp",
    "lanczos_top_k",
    "leaf_paths",
    "linalg",
    "lobpcg_top_k",
    "loss_value",
    "map_examples",
    "num_params",
    "objective",
    "operators",
    "per_example",
    "per_example_grads",
    "per_example_hvps",
    "per_example_jacobians",
    "per_example_losses",
    "power_iteration",
    "restrict",
    "select",
    "softmax_cross_entropy",
    "spectral_density",
    "squared_error",
    "subsets",
    "sum_examples",
    "sum_over_chunks",
    "trace_exact",
    "xtrace",
]
