r"""Config of the edge-of-stability study (Cohen et al. 2021): full-batch GD at several η, and
an Adam arm (Cohen et al. 2022, adaptive edge of stability): full-batch Adam at several η.

Presets: ``smoke`` (seconds, the tests), ``quick`` (about two minutes on a 2-core CPU, the
offline MNIST subset), ``paper`` (the published setup: the first 5,000 CIFAR-10 training
images standardised with full-train statistics, fc-tanh 3072-200-200-10 with PyTorch's
default initialisation, loss mean ½‖f − onehot‖², GD; needs CIFAR-10 prepared for TFDS and
a GPU/TPU).

Run::

  python -m experiments.edge_of_stability --workdir=runs/eos \
      --config=experiments/configs/edge_of_stability.py:quick
"""

import ml_collections

from experiments.configs import lambda_max_options, new_study


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    c, base = new_study(
        preset,
        loss={"name": "squared_error_half"},
        optimizer={"name": "gd"},
        model={"name": "mlp", "activation": "tanh", "init": "torch"},
        measure={
            "names": ("loss", "accuracy", "lambda_max"),
            "options": {"lambda_max": lambda_max_options(k=2, num_iters=40)},
        },
        log_every=200,
    )
    # The study's knobs.
    c.learning_rates = (0.05, 0.1, 0.2, 0.4)
    # EoS band: in the late phase (the last `late_fraction` of measurements) of every run
    # that reached 0.9·2/η, the median of λ_max/(2/η) lies in `median_band` and every value
    # in `band`.
    c.late_fraction = 0.5
    c.median_band = (0.9, 1.15)
    c.band = (0.8, 1.3)
    # Progressive sharpening: λ_max grows by this factor before reaching 2/η (runs whose
    # 2/η lies above the initial λ_max).
    c.sharpening_factor = 1.2
    # Adam arm (Cohen et al. 2022): full-batch Adam with β₁ = `adam_b1` at each η of
    # `adam_learning_rates`; λ_max(P⁻¹H) against (2 + 2β₁)/((1 − β₁)η). The paper describes
    # the same equilibrium as for GD ("at, or just above" the threshold), so the check uses the
    # GD bands `median_band` and `band` over the same late phase.
    c.adam_learning_rates = (1e-3, 3e-3)
    c.adam_b1 = 0.9

    if preset == "smoke":
        base.dataset.update(
            name="mnist5k", num_train=64, num_test=64, flatten=True, standardize="feature"
        )
        base.model.widths = (16,)
        base.max_steps = 30
        base.measure.every = 10
        base.measure.options.lambda_max.num_iters = 20
        c.learning_rates = (0.1, 1.0)
        c.adam_learning_rates = (0.01,)
        base.checkpoint_every = 20
    elif preset == "quick":
        base.dataset.update(name="mnist5k", num_train=1000, flatten=True, standardize="feature")
        base.model.widths = (100, 100)
        base.max_steps = 2000
        base.measure.every = 50
        base.checkpoint_every = 500
    elif preset == "paper":
        base.dataset.update(
            name="cifar10", num_train=5000, subset="first", flatten=True, standardize="feature"
        )
        base.model.widths = (200, 200)
        base.max_steps = 10000
        base.measure.every = 100
        base.checkpoint_every = 1000
        c.learning_rates = (0.01, 0.02, 0.04)
        c.adam_learning_rates = (1e-4, 2e-4)
    return c
