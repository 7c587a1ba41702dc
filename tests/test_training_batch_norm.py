"""The training loop on the batch-norm ResNet-18 (tiny widths, 4×4×3 synthetic images,
float64): the carried running statistics against a hand-rolled flax + optax loop, λ_max of
a row against the dense Hessian of the eval-mode model at that step's statistics, and an
interrupted run resumed from its checkpoint against an uninterrupted one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from training_configs import CACHE

import sharpness_jax as sj
from sharpness_jax import minibatch, records, training
from sharpness_jax.config import resolve_config
from sharpness_jax.problem import problem_from_config
from sharpness_jax.resnet18 import with_state

# ResNet-18's 20 convolutions take tens of seconds to compile even at widths (1, 1, 2, 4).
pytestmark = pytest.mark.slow

CONFIG = {
    "dataset": {
        "name": "gaussian_mixture",
        "num_train": 16,
        "num_test": 8,
        "input_dim": 48,
        "example_shape": (4, 4, 3),
        "separation": 3.0,
    },
    "model": {"name": "resnet18", "width_multiplier": 1 / 128},
    "optimizer": {"name": "sgd", "learning_rate": 0.1},
    "batch_size": 8,
    "max_steps": 4,
    "measure": {"every": 2, "names": ("loss",)},
    "checkpoint_every": 2,
    "log_every": 0,
    "dtype": "float64",
}


def _tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bn") / "reference"
    return workdir, training.train(CONFIG, workdir, cache=CACHE)


def test_steps_equal_a_hand_rolled_flax_optax_loop(reference):
    """θ_{s+1} = θ_s − η ∇L_B(θ_s) with L_B in train mode, and the running statistics of
    flax's ``mutable=["batch_stats"]`` apply, for the batches the run's sampler draws."""
    _, result = reference
    c = resolve_config(CONFIG)
    problem = problem_from_config(c)
    model = problem.model
    key = jax.random.fold_in(jax.random.PRNGKey(c.seed), training._TAG_INIT)
    params, stats = model.init(key)
    x, y = problem.dataset.train
    sampler = minibatch.Sampler(16, 8, replace=c.replace, seed=c.seed)
    tx = optax.sgd(0.1)
    opt_state = tx.init(params)

    @jax.jit
    def step_fn(params, opt_state, stats, x, y):
        def loss(p):
            variables = {"params": p, "batch_stats": stats}
            logits, new = model.module.apply(variables, x, train=True, mutable=["batch_stats"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return jnp.mean(ce), new["batch_stats"]

        (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, stats

    for step in range(4):
        idx = sampler.indices(step)
        params, opt_state, stats = step_fn(params, opt_state, stats, x[idx], y[idx])
    assert result.status == "completed" and result.step == 4
    for got, want in ((result.params, params), (result.model_state, stats)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), stats, model.init(key)[1])
    assert max(jax.tree.leaves(moved)) > 0.01  # the statistics did move


def test_lambda_max_is_that_of_the_eval_mode_model_at_the_step_state():
    """The row's λ_max (Lanczos in the loop) is the top eigenvalue of the dense Hessian of
    the eval-mode model at the running statistics of that step, not at the initial ones."""
    c = {**CONFIG, "max_steps": 3, "measure": {"every": 0, "names": ("lambda_max",)}}
    result = training.train(c, cache=CACHE)
    (row,) = result.rows
    assert row["step"] == 3
    problem = problem_from_config(resolve_config(c))
    batch = sj.Batch(*problem.dataset.train)
    flat, unravel = ravel_pytree(result.params)

    @jax.jit
    def dense(state):
        obj = sj.Objective(with_state(problem.model, state).predict, problem.objective.loss)
        return jax.hessian(lambda f: jnp.mean(obj.batch_losses(unravel(f), batch)))(flat)

    top = lambda state: np.linalg.eigvalsh(np.asarray(dense(state)))[-1]
    assert row["lambda_max"] == pytest.approx(top(result.model_state), rel=1e-6)
    initial = problem.model.init(jax.random.PRNGKey(0))[1]
    assert abs(top(initial) - row["lambda_max"]) > 1e-3 * row["lambda_max"]


def test_interrupted_run_resumes_with_the_checkpointed_state(reference, tmp_path, monkeypatch):
    ref_dir, ref = reference
    batch_indices = training._batch_indices

    def interrupt_at_3(sampler, step):
        if step == 3:
            raise KeyboardInterrupt
        return batch_indices(sampler, step)

    monkeypatch.setattr(training, "_batch_indices", interrupt_at_3)
    with pytest.raises(training.TrainingInterrupted):
        training.train(CONFIG, tmp_path, cache=CACHE)
    monkeypatch.setattr(training, "_batch_indices", batch_indices)
    resumed = training.train(CONFIG, tmp_path, cache=CACHE)
    assert resumed.resumed_from == 2 and resumed.status == "completed"
    _tree_equal(resumed.model_state, ref.model_state)
    _tree_equal(resumed.params, ref.params)
    metrics = records.METRICS_FILE
    assert (tmp_path / metrics).read_bytes() == (ref_dir / metrics).read_bytes()
    # A checkpoint of a stateful run loads (its template holds the model state too).
    assert training.load_checkpoint(str(tmp_path), step=2)[2] == 2


def test_load_checkpoint_returns_the_model_state(reference):
    ref_dir, ref = reference
    _, params, step, state = training.load_checkpoint(str(ref_dir))
    assert step == 4
    _tree_equal(params, ref.params)
    _tree_equal(state, ref.model_state)
    *_, earlier = training.load_checkpoint(str(ref_dir), step=2)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), earlier, state)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the state of that step, not the last one


def test_measure_binary_measures_in_eval_mode_at_the_checkpoint_state(reference):
    """``experiments.measure --run`` on a finished run: the train and test loss of the
    eval-mode model at the checkpoint's running statistics, computed here in-process."""
    from experiments import measure as measure_bin

    ref_dir, ref = reference
    row = measure_bin.run(
        run_dir=str(ref_dir),
        step=None,
        params_path=None,
        config_json=None,
        measures=["loss"],
        options={},
        dataset=None,
        measure_subset=None,
        chunk_size=None,
        mesh=None,
        cache=CACHE,
    )
    problem = problem_from_config(resolve_config(CONFIG))

    def at(state):
        obj = sj.Objective(with_state(problem.model, state).predict, problem.objective.loss)
        splits = (problem.dataset.train, problem.dataset.test)
        return [float(sj.loss_value(obj, ref.params, sj.Batch(*split))) for split in splits]

    train_loss, test_loss = at(ref.model_state)
    assert row["step"] == 4
    assert row["train_loss"] == pytest.approx(train_loss, rel=1e-12)
    assert row["test_loss"] == pytest.approx(test_loss, rel=1e-12)
    initial = problem.model.init(jax.random.PRNGKey(0))[1]
    assert abs(at(initial)[0] - train_loss) > 1e-3 * train_loss  # the statistics matter


def test_sam_step_of_the_stateful_model_is_the_gradient_at_the_ascent_point():
    """SAM (Foret et al. 2021) in train mode: direction ∇L_B(θ + ρ g/‖g‖), g = ∇L_B(θ), on the
    same batch and statistics; the new statistics are those of the pass at θ."""
    from sharpness_jax.programs import _stateful_update_fn

    problem = problem_from_config(resolve_config(CONFIG))
    model, loss = problem.model, problem.objective.loss
    params, stats = model.init(jax.random.PRNGKey(3))
    x, y = (jnp.asarray(a[:8]) for a in problem.dataset.train)
    tx, rho = optax.sgd(1.0), 0.05
    update = jax.jit(_stateful_update_fn(model, problem.objective, tx, rho))
    _, grads, updates, _, new_stats = update(params, tx.init(params), stats, sj.Batch(x, y), None)

    def mean_loss(p):
        logits, new = model.module.apply(
            {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(jax.vmap(loss)(logits, y)), new["batch_stats"]

    (_, want_stats), g = jax.value_and_grad(mean_loss, has_aux=True)(params)
    norm = jnp.sqrt(sum(jnp.sum(a * a) for a in jax.tree.leaves(g)))
    ascent = jax.tree.map(lambda p, gi: p + rho * gi / norm, params, g)
    direction = jax.grad(lambda p: mean_loss(p)[0])(ascent)
    pairs = ((grads, g), (updates, jax.tree.map(jnp.negative, direction)), (new_stats, want_stats))
    for got, want in pairs:
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    assert max(np.abs(ravel_pytree(direction)[0] - ravel_pytree(g)[0])) > 1e-6


def test_measure_takes_the_model_state_with_the_params(reference):
    _, ref = reference
    row, _ = training.measure(CONFIG, ref.params, step=4, cache=CACHE, model_state=ref.model_state)
    assert row == ref.rows[-1]
    with pytest.raises(ValueError, match="model_state"):
        training.measure(CONFIG, ref.params, step=4, cache=CACHE)
