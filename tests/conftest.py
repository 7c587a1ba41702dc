"""Test configuration, set once for the whole suite: float64, strict dtype promotion,
rank-promotion errors, four simulated CPU devices for the mesh tests, one BLAS thread."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("MPLBACKEND", "Agg")
# One LAPACK thread per process, read when scipy loads its OpenBLAS (jax's CPU QR, eigh and
# SVD call scipy's LAPACK; numpy's own OpenBLAS is loaded before this file): the suite runs
# two workers on two cores beside XLA's thread pool, and OpenBLAS threads spinning against
# them made a 2,500 × 2,500 float64 QR in jax take 82 s instead of 5 s on a loaded machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
