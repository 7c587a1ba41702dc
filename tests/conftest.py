"""Test configuration, set once for the whole suite: float64, strict dtype promotion,
rank-promotion errors, four simulated CPU devices for the mesh tests, one BLAS thread."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("MPLBACKEND", "Agg")
# One BLAS/LAPACK thread per process (read when numpy loads OpenBLAS): the suite runs two
# workers on two cores beside XLA's own thread pool, and OpenBLAS threads spinning against
# them make a 1,000 × 1,000 QR thirty times slower on a loaded machine (9 s against 0.3 s).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
