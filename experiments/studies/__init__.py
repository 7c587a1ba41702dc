"""The study runners: one module per study, each with ``NAME`` and
``run(config, workdir, *, mesh, cache)``."""

STUDIES = (
    "edge_of_stability",
    "edge_of_stochastic_stability",
    "noise_curvature",
    "fisher_sharpness",
    "quotient_geometry",
    "progressive_sharpening",
)
