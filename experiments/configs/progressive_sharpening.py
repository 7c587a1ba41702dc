r"""Config of the progressive-sharpening study (MacDonald, Valmadre & Lucey 2023): λ_max and the
input–output Jacobian norm over training, under regularisers, against the generalisation gap.

Every variant is the base training run with a few fields overridden (``variants``: name →
nested overrides of the base config). Each run trains for ``epochs`` passes over the training
set (so ``max_steps = round(epochs · n / B)`` depends on the variant's batch size B) and is
measured ``num_measurements`` times at equally spaced steps (plus step 0 and the last step).

Presets: ``smoke`` (seconds, the tests), ``quick`` (about three minutes on a 2-core CPU: the
offline MNIST subset, an MLP 784-128-128-10 with ReLU, cross-entropy, SGD), ``paper`` (the
published setup: CIFAR-10 with the CIFAR-style ResNet-18 with batch norm (``resnet18``:
trained in train mode, measured in eval mode at its running statistics), SGD with momentum;
needs CIFAR-10 prepared for TFDS and a GPU/TPU).

Run::

  python -m experiments.progressive_sharpening --workdir=runs/progressive_sharpening \
      --config=experiments/configs/progressive_sharpening.py:quick
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import lambda_max_options, new_study


def _variants(
    *,
    weight_decay: float | None = None,
    large_batch: int | None = None,
    small_lr: float | None = None,
    large_lr: float | None = None,
    sam_rho: float = 0.05,
) -> ml_collections.ConfigDict:
    """The variants, name -> overrides of the base config (nested like the config):
    "baseline", "label_smoothing" (ε = 0.1) and "sam" (SAM with ρ = ``sam_rho``; 0.05 is the
    standard value of Foret et al. 2021), then one for each value given: weight decay, a
    larger batch size, a smaller and a larger learning rate."""
    variants = {
        "baseline": {},
        "label_smoothing": {"loss": {"label_smoothing": 0.1}},
        "sam": {"optimizer": {"sam_rho": sam_rho}},
    }
    if weight_decay is not None:
        variants["weight_decay"] = {"optimizer": {"weight_decay": weight_decay}}
    if large_batch is not None:
        variants["large_batch"] = {"batch_size": large_batch}
    if small_lr is not None:
        variants["small_lr"] = {"optimizer": {"learning_rate": small_lr}}
    if large_lr is not None:
        variants["large_lr"] = {"optimizer": {"learning_rate": large_lr}}
    return ml_collections.ConfigDict(variants)


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    c, base = new_study(
        preset,
        loss={"name": "cross_entropy"},
        optimizer={"name": "sgd", "learning_rate": 0.1},
        batch_size=32,
        model={"name": "mlp", "activation": "relu", "init": "torch"},
        measure={
            "names": (
                "loss",
                "accuracy",
                "lambda_max",
                "jacobian_norms",
                "progressive_sharpening_curvature",
                "progressive_sharpening_unsmoothed_loss",
            ),
            "options": {
                "lambda_max": lambda_max_options(k=1, num_iters=30),
                "jacobian_norms": {"output": "logits", "spectral": "svd"},
            },
        },
        log_every=0,
        progress_bar=False,
    )
    # The study's knobs.
    c.epochs = 20
    c.num_measurements = 20
    # Extra log-spaced measurements between step 1 and the first equally spaced one, to
    # resolve the fast early rise of λ_max (the sharpening phase).
    c.num_log_measurements = 6
    c.seeds = (0, 1)
    # Variants: name -> overrides of the base config (nested like the config). "baseline"
    # must be present.
    c.variants = _variants(weight_decay=5e-3, large_batch=256, small_lr=0.02)
    # The variants that regularise (MacDonald et al. 2023, Fig. 5: label smoothing, weight
    # decay, SAM, data augmentation, a larger learning rate): each must lower the final
    # Jacobian norm. A larger batch or a smaller learning rate regularise less than the
    # baseline, so they are not listed.
    c.regularisers = ("label_smoothing", "weight_decay", "sam")
    # The Jacobian norm of the checks: the paper's theory uses the sample maximum of the
    # spectral norm, max_p ‖∂f(x_p)/∂x‖₂ (a column of the jacobian_norms measurement).
    c.jacobian_column = "jacobian_spectral_max"
    # Final values: mean over the last `final_window` measurements (SGD makes λ_max noisy).
    c.final_window = 3
    # Progressive sharpening in the baseline: peak λ_max / initial λ_max and final / initial
    # Jacobian norm at least this, and Spearman(λ_max, Jacobian norm) at least
    # `time_correlation_min` over all measurement steps up to the peak of λ_max (the
    # sharpening phase, Fig. 1), and Spearman(λ_max, max_p κ_p) at least that over the
    # equally spaced measurement steps of the whole run (the ansatz).
    c.growth_factor = 1.5
    c.time_correlation_min = 0.5
    # d in the rate (log n / n)^{1/d} of the Jacobian generalisation bound; None: the input
    # dimension D (the worst case; an intrinsic dimension of the data gives a faster rate).
    c.bound_dimension = config_dict.placeholder(int)

    if preset == "smoke":
        base.dataset.update(name="mnist5k", num_train=64, num_test=64, standardize="channel")
        base.model.widths = (16,)
        base.batch_size = 16
        base.measure.options.lambda_max.num_iters = 10
        c.epochs = 2
        c.num_measurements = 3
        c.num_log_measurements = 2
        c.final_window = 1
        # Two seeds of two variants: runs of one variant share their compiled programs.
        c.variants = _variants()
        c.regularisers = ("label_smoothing", "sam")
        base.checkpoint_every = 0
    elif preset == "quick":
        base.dataset.update(name="mnist5k", standardize="channel")
        base.model.widths = (128, 128)
        base.measure_subset = 2048
        base.checkpoint_every = 1000
    elif preset == "paper":
        base.dataset.update(name="cifar10", standardize="channel")
        base.model = ml_collections.ConfigDict({"name": "resnet18", "width_multiplier": 1.0})
        base.optimizer.update(name="momentum", momentum=0.9, learning_rate=0.05)
        base.batch_size = 128
        base.measure_subset = 4096
        base.measure.options.lambda_max.num_iters = 40
        base.chunk_size = 256
        base.checkpoint_every = 2000
        c.epochs = 50
        c.num_measurements = 50
        c.final_window = 5
        c.seeds = (0, 1)
        c.bound_dimension = 25  # an intrinsic-dimension estimate of CIFAR-10 images
        c.variants = _variants(weight_decay=5e-4, large_batch=512, small_lr=0.01, large_lr=0.2)
        c.regularisers = ("label_smoothing", "weight_decay", "sam", "large_lr")
    return c
