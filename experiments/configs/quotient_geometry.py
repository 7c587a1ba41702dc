r"""Config of the quotient-geometry study (Dong & Cheng 2026): shallow ReLU and quadratic nets,
ambient against symmetry-reduced curvature, gauge motion, conserved quantities.

Two setups per model (``models``: name → the setups' overrides of the base config, nested like
the config), both teacher–student regression with ½‖f − y‖² (mean over examples) and fewer
equations than parameters, n·K < P:

* ``underdetermined``: n·K < P − m. Gradient descent interpolates, and the interpolating
  minima form a manifold of dimension P − n·K that contains the m-dimensional symmetry orbits.
  Runs: full-batch GD at η₀·f for f in ``lr_factors``, each for the same gradient-flow time
  η·steps (``max_steps`` and ``measure.every`` at f = 1 are divided by f), and one SGD run with
  weight decay (``sgd``) whose steps are split into horizontal and vertical parts.
* ``regular``: P − m ≤ n·K < P. The realisation map's Jacobian J (n·K × P) can then have rank
  P − m, the paper's regular set, on which ker J is exactly the vertical space and the
  realisation metric G = JᵀJ/n is non-degenerate on the horizontal space; the quotient
  curvature, the generalised spectrum of (BᵀHB, BᵀGB), is defined only there. (With
  n·K < P − m, BᵀGB is singular.) One GD run; the orbit analysis is made at its last regular
  measurement. Quadratic nets need K ≥ 2 outputs here: with K = 1 they have a continuous
  symmetry group larger than the rescalings (see ``sharpness_jax.quotient``).

Presets: ``smoke`` (seconds, the tests), ``quick`` (about a minute on a 2-core CPU: d = 5–7,
m = 6–10, n = 10–54), ``paper`` (the paper's kind of synthetic setup at larger m and n; dense
spectra of P ≤ 600 parameters, for a GPU/TPU).

Run::

  python -m experiments.quotient_geometry --workdir=runs/quotient_geometry \
      --config=experiments/configs/quotient_geometry.py:quick
"""

import ml_collections

from experiments.configs import new_study

# The study's measurement, a built-in one (``sharpness_jax.measurements``).
MEASUREMENT = "quotient_geometry"


# The setups of each preset, one row each: (input_dim d, width m, num_outputs K, num_train n,
# teacher width, teacher activation, learning rate η₀, max_steps). P counts the parameters.
_SETUPS = {
    "smoke": {
        "relu": {
            "underdetermined": (3, 4, 1, 6, 2, "relu", 0.2, 60),
            "regular": (3, 3, 1, 13, 2, "tanh", 0.2, 30),
        },
        "quadratic": {
            "underdetermined": (3, 4, 1, 4, 2, "relu", 0.02, 60),
            "regular": (3, 2, 2, 4, 2, "relu", 0.05, 30),
        },
    },
    "quick": {
        "relu": {
            # P = m(d + 2) = 70, n·K = 16 < P − m = 60.
            "underdetermined": (5, 10, 1, 16, 4, "tanh", 0.2, 5000),
            # P = 56, P − m = 48 ≤ n·K = 54 < P.
            "regular": (5, 8, 1, 54, 4, "tanh", 0.2, 3000),
        },
        "quadratic": {
            # P = m(d + K) = 60, n·K = 10 < dim Sym(5) = 15: underdetermined even in Q.
            "underdetermined": (5, 10, 1, 10, 4, "relu", 0.02, 10000),
            # P = 54, P − m = 48 ≤ n·K = 52 < P, and P − m ≤ K·dim Sym(7) = 56.
            "regular": (7, 6, 2, 26, 4, "relu", 0.05, 3000),
        },
    },
    "paper": {
        "relu": {
            # P = 600, n·K = 100 < P − m = 550.
            "underdetermined": (10, 50, 1, 100, 5, "relu", 0.1, 50000),
            # P = 240, P − m = 220 ≤ n·K = 230 < P.
            "regular": (10, 20, 1, 230, 5, "tanh", 0.1, 20000),
        },
        "quadratic": {
            # P = 550, n·K = 40 < dim Sym(10) = 55.
            "underdetermined": (10, 50, 1, 40, 5, "relu", 0.005, 100000),
            # P = 120, P − m = 110 = K·dim Sym(10) ≤ n·K = 116 < P.
            "regular": (10, 10, 2, 58, 5, "relu", 0.02, 20000),
        },
    },
}

_MODELS = {
    "relu": {"name": "shallow", "activation": "relu", "bias": True},
    "quadratic": {"name": "quadratic"},
}


def _setup(model: dict, row: tuple) -> dict:
    """The overrides of one setup (a row of ``_SETUPS``), nested like the config."""
    input_dim, width, num_outputs, num_train, teacher_width, activation, lr, steps = row
    return {
        "model": {**model, "width": width},
        "dataset": {
            "input_dim": input_dim,
            "num_outputs": num_outputs,
            "num_train": num_train,
            "teacher_width": teacher_width,
            "teacher_activation": activation,
        },
        "optimizer": {"learning_rate": lr},
        "max_steps": steps,
    }


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    c, base = new_study(
        preset,
        dataset={"name": "teacher_student", "num_test": 256, "noise_std": 0.0, "seed": 0},
        loss={"name": "squared_error_half"},
        optimizer={"name": "gd"},
        dtype="float64",
        measure={"names": ("loss", MEASUREMENT)},
        measure_subset=None,
        checkpoint_every=0,  # runs take seconds: the final checkpoint only
        log_every=0,
        progress_bar=False,
    )

    # The study's knobs.
    c.model_names = ("relu", "quadratic")  # the keys of `models`, in the order of the report
    # GD runs of the underdetermined setup at η₀·f, each for the same time η·steps.
    c.lr_factors = (1.0, 0.5, 0.25)
    c.measurements_per_run = 40
    # SGD with weight decay: its (Euclidean) vertical part −ηλ P_V θ is non-zero.
    c.sgd = ml_collections.ConfigDict(
        {"batch_size": 5, "weight_decay": 1e-2, "lr_factor": 0.5, "max_steps": 2000}
    )
    c.num_log_measurements = 16
    # The orbit: every unit rescaled by c on a log grid over [c_min, c_max], and
    # `orbit_random` draws of per-unit factors log-uniform on the same range.
    c.orbit_range = (0.1, 10.0)
    c.orbit_points = 9
    c.orbit_random = 4
    c.orbit_seed = 0
    # Checks.
    c.zero_rtol = 1e-6  # near-zero: |λ| ≤ zero_rtol · λ_max(H)
    c.ambient_change_min = 10.0  # ambient λ_max: max/min along the orbit at least this
    c.invariance_tol = 1e-6  # quotient spectrum: max relative change along the orbit
    c.vertical_ratio_max = 1e-8  # (‖Jδ_v‖/‖δ_v‖)/(‖Jδ_h‖/‖δ_h‖) at most this
    c.vertical_fraction_min = 1e-3  # median ‖δ_v‖/‖δ‖ at least this (the split is not vacuous)
    c.interpolation_loss = 1e-12  # the final GD loss counts as interpolating below this
    c.drift_max = 1e-2  # relative drift of k‖a_i‖² − ‖w_i‖² − b_i² at the smallest η
    c.drift_slope = (0.5, 1.5)  # log-log slope of the drift against η (theory: 1)
    # The measurement's options of the underdetermined runs (the regular-setup run sets
    # generalised=True, split=False).
    base.measure.options = ml_collections.ConfigDict(
        {MEASUREMENT: {"generalised": False, "split": True, "zero_rtol": c.zero_rtol}}
    )

    c.models = ml_collections.ConfigDict(
        {
            name: {kind: _setup(_MODELS[name], row) for kind, row in setups.items()}
            for name, setups in _SETUPS[preset].items()
        }
    )
    if preset == "smoke":
        c.lr_factors = (1.0, 0.5)
        c.measurements_per_run = 4
        c.sgd.update(batch_size=2, max_steps=20)
        c.num_log_measurements = 4
        c.orbit_points = 3
        c.orbit_random = 1
    elif preset == "paper":
        c.measurements_per_run = 100
        c.sgd.update(batch_size=10, max_steps=20000)
        c.num_log_measurements = 30
        c.orbit_points = 21
        c.orbit_random = 10
    return c
