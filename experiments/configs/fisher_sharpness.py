r"""Config of the Fisher-geometric sharpness study (Ahmed, Sarmah, Dutta 2026).

A grid of learning rates η and batch sizes B for SGD (plus Adam runs) trains ReLU MLPs to a
common training loss; every trained net is then measured (Riemannian sharpness in the Fisher
metric, λ_max(H), tr(H), the generalisation gap, PAC-Bayes terms) before and after a random
function-preserving rescaling.

Presets: ``smoke`` (seconds, the tests), ``quick`` (a few minutes on a 2-core CPU, the offline
MNIST subset), ``paper`` (MNIST and CIFAR-10 from TFDS with ReLU MLPs 2×512 and the grids of
optimisers, batch sizes and learning rates; needs the datasets prepared for TFDS and a
GPU/TPU).

Run::

  python -m experiments.fisher_sharpness --workdir=runs/fisher \
      --config=experiments/configs/fisher_sharpness.py:quick
"""

import ml_collections

from experiments.configs import new_study


def _setup(dataset: dict, widths: tuple[int, ...]) -> ml_collections.ConfigDict:
    """One dataset with its model: the ``dataset`` and ``model`` nodes of the run configs."""
    return ml_collections.ConfigDict(
        {
            "dataset": dict(dataset),
            "model": {"name": "mlp", "activation": "relu", "init": "he", "widths": widths},
        }
    )


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    c, base = new_study(
        preset,
        loss={"name": "cross_entropy"},
        optimizer={"name": "sgd"},
        # Stop rule: every net is trained to the same training loss (cross-entropy 0.01, as
        # in Jiang et al. 2020), so that the sharpness measures compare nets at the same fit;
        # the step cap stops runs that do not get there.
        train_loss_goal=0.01,
        goal_every=50,
        # Loss and accuracy of both splits at the final step only.
        measure={"names": ("loss", "accuracy"), "every": 0},
        checkpoint_every=0,
        log_every=1000,
    )
    # The grid: SGD at every (η, B); Adam at every (η_adam, B_adam).
    c.learning_rates = (0.03, 0.1, 0.3)
    c.batch_sizes = (8, 32, 128)
    c.adam_learning_rates = (1e-3,)
    c.adam_batch_sizes = (16, 128)
    # Analysis (in float64): the nets are measured on the first `analysis_examples` training
    # examples (None: all).
    c.analysis_dtype = "float64"
    c.analysis_examples = None
    c.chunk_size = None  # examples per chunk in every sum over examples of the analysis
    # Traces of the whitened operator D^{-1/2} H D^{-1/2} (Ŝ_R) and of H: "exact" (P
    # Hessian-vector products, small P only), "xtrace" or "hutchinson" (with standard errors).
    c.estimator = "xtrace"
    c.num_probes = 100
    c.probe_chunk = 20
    c.lanczos_iters = 64
    c.lanczos_tol = 1e-6
    c.analysis_seed = 0
    # Ŝ_R = Σ_i H_ii / (F_ii + ε): ε = 0 (exactly invariant) and the damped variant ε below.
    c.damping = 1e-8
    # The full true-Fisher S_R = tr(F⁺H) (pseudo-inverse: F is singular) with dense H and F on
    # this parameter subset: "output_layer" (the last Dense layer) or "all" (small P only).
    c.full_fisher_scope = "output_layer"
    # Random function-preserving rescaling of every trained net: layer scales
    # α_l = exp(s_l (z_l − z̄)), then unit scales c_j = exp(s_u z_j), z ∼ N(0, 1).
    c.rescale_seed = 1
    c.layer_log_std = 1.0
    c.unit_log_std = 1.0
    # PAC-Bayes terms (standard form, posterior N(θ, ρ (F_diag + εI)⁻¹), prior N(0, σ_p² I)):
    # ρ and σ_p² minimise the bound over these grids, δ split over the grid (union bound).
    c.pac_bayes_delta = 0.05
    c.pac_bayes_rhos = tuple(10.0**k for k in range(-14, 1))
    c.pac_bayes_prior_variances = tuple(10.0**k for k in range(-3, 3))
    # Adaptive sharpness (Kwon et al. 2021) with ξ = 0, the exactly invariant form: radius ρ
    # of the |θ|-scaled ball and projected ascent steps.
    c.adaptive_rho = 0.05
    c.adaptive_steps = 10
    # Checks.
    c.num_resamples = 1000  # bootstrap resamples of the η/B rank correlation
    c.invariance_tol = 1e-6  # max relative change of the Riemannian measures
    c.euclidean_change_factor = 2.0  # min over nets of max(after/before, before/after)

    if preset == "smoke":
        c.setups = ml_collections.ConfigDict(
            {"mnist5k": _setup({"name": "mnist5k", "num_train": 64, "flatten": True}, (8,))}
        )
        base.max_steps = 40
        base.goal_every = 10
        base.log_every = 0
        c.learning_rates = (0.1, 0.2, 0.4)
        c.batch_sizes = (16,)
        c.adam_learning_rates = (1e-3,)
        c.adam_batch_sizes = (16,)
        c.num_probes = 20
        c.probe_chunk = 10
        c.lanczos_iters = 20
        c.adaptive_steps = 2
        c.num_resamples = 50
    elif preset == "quick":
        c.setups = ml_collections.ConfigDict(
            {
                "mnist5k": _setup(
                    {"name": "mnist5k", "num_train": 1000, "test_per_class": 200, "flatten": True},
                    (32,),
                )
            }
        )
        base.max_steps = 20000
        # The paper's kind of grid, every net trained to the same train loss (the stop rule).
        c.learning_rates = (0.01, 0.03, 0.1)
        c.batch_sizes = (32, 128, 512)
        c.num_probes = 64  # XTrace costs O(m³ P): the largest share of the analysis
    elif preset == "paper":
        c.setups = ml_collections.ConfigDict(
            {
                "mnist": _setup({"name": "mnist", "flatten": True}, (512, 512)),
                "cifar10": _setup(
                    {"name": "cifar10", "flatten": True, "standardize": "feature"}, (512, 512)
                ),
            }
        )
        base.max_steps = 200_000
        base.goal_every = 500
        base.checkpoint_every = 10_000
        base.chunk_size = 10_000
        c.learning_rates = (0.01, 0.03, 0.1, 0.3)
        c.batch_sizes = (32, 128, 512)
        c.adam_learning_rates = (1e-4, 1e-3)
        c.adam_batch_sizes = (32, 128, 512)
        c.analysis_examples = 10_000
        c.chunk_size = 1000
        c.num_probes = 200
        c.probe_chunk = 10
    return c
