"""``model.factory``: a model from the user's code trains, resumes and is measured from its
run's workdir exactly like a zoo model; every bad factory is refused before training with a
one-line error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from training_configs import CACHE, config, train

from experiments import measure as measure_bin
from sharpness_jax import operators, training
from sharpness_jax.config import validate_config
from sharpness_jax.model_factory import build_from_factory
from sharpness_jax.objective import Batch
from sharpness_jax.problem import problem_from_config

FACTORY = "factory_models:linen_mlp"


def _config(factory=FACTORY, max_steps=4, **model_options):
    model = {"factory": factory, **model_options}
    return config(model=model, max_steps=max_steps, checkpoint_every=2)


def _dense_lambda_max(problem, params, batch):
    flat, unravel = ravel_pytree(params)

    def loss(v):
        return operators.loss_value(problem.objective, unravel(v), batch)

    return float(np.linalg.eigvalsh(np.asarray(jax.hessian(loss)(flat)))[-1])


def test_a_factory_model_trains_resumes_and_is_measured_from_its_run(tmp_path):
    c = _config(width=7)
    assert c.model.name == "mlp"  # a label only: the factory builds the model
    problem = problem_from_config(c)
    params = problem.model.init(jax.random.PRNGKey(0))
    assert params["Dense_0"]["kernel"].shape == (4, 7)  # the option reached the factory
    assert params["Dense_0"]["kernel"].dtype == jnp.float64
    whole = train(c)
    workdir = tmp_path / "run"
    first = train(_config(width=7, max_steps=2), workdir)
    assert first.step == 2
    resumed = train(c, workdir)
    assert resumed.resumed_from == 2 and resumed.step == 4
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)

    stored, ckpt_params, step = training.load_checkpoint(str(workdir))
    assert stored.model.factory == FACTORY and step == 4
    row = measure_bin.run(
        run_dir=str(workdir),
        step=None,
        params_path=None,
        config_json=None,
        measures=["loss", "lambda_max"],
        options={"lambda_max": {"k": 1, "num_iters": 59, "tol": 1e-12}},
        dataset=None,
        measure_subset=None,
        chunk_size=None,
        mesh=None,
        cache=CACHE,
    )
    batch = Batch(*problem.dataset.train)
    np.testing.assert_allclose(row["train_loss"], whole.rows[-1]["train_loss"], rtol=1e-12)
    np.testing.assert_allclose(
        row["lambda_max"], _dense_lambda_max(problem, ckpt_params, batch), rtol=1e-6
    )


def test_a_factory_may_return_a_model_of_the_zoo_form():
    c = _config("factory_models:zoo_mlp")
    problem = problem_from_config(c)
    params = problem.model.init(jax.random.PRNGKey(0))
    assert sorted(p.shape for p in jax.tree.leaves(params)) == [(3,), (4, 5), (5,), (5, 3)]
    assert train(c).step == 4


def test_study_configs_take_a_factory():
    from experiments.configs import edge_of_stability

    study = edge_of_stability.get_config("smoke")
    study.base.model.factory = FACTORY  # what --config.base.model.factory=... sets
    c = validate_config(study.base)
    assert c.model.factory == FACTORY and c.model.widths == (16,)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("factory_models.linen_mlp", "must look like 'pkg.module:fn'"),
        ("factory_models:linen mlp", "must look like 'pkg.module:fn'"),
        ("no_such_module_anywhere:fn", "cannot import module 'no_such_module_anywhere'"),
        ("factory_models:no_such_fn", "'factory_models' has no attribute 'no_such_fn'"),
        ("factory_models:NOT_CALLABLE", "is a int, not a callable"),
    ],
)
def test_a_bad_factory_string_fails_validation(factory, message):
    with pytest.raises(ValueError, match=message) as caught:
        validate_config(_config(factory))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("wrong_type", "returned a dict; return a batch-first flax.linen Module"),
        ("too_many_outputs", r"outputs have shape \(4,\), but the dataset has 3 outputs"),
        ("float32_params", r"parameters of dtype \['float32'\], the run's dtype is 'float64'"),
        ("mixes_examples", "the model mixes examples"),
        ("batch_norm", r"variable collections \['batch_stats'\] besides 'params'"),
        ("strict", "failed when called with .* unexpected keyword argument"),
    ],
)
def test_a_bad_factory_model_is_refused_when_the_problem_is_built(factory, message):
    c = _config(f"factory_models:{factory}", width=3)
    validate_config(c)  # the string itself is fine
    with pytest.raises(ValueError, match=message) as caught:
        problem_from_config(c)
    assert "\n" not in str(caught.value)


def test_integer_inputs_reach_a_linen_factory_model_as_integers():
    tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 5), 0, 7)
    model = build_from_factory(
        "factory_models:bag_of_tokens",
        input_shape=(5,),
        num_outputs=3,
        param_dtype="float64",
        example_inputs=tokens,
    )
    params = model.init(jax.random.PRNGKey(1))
    table = params["Embed_0"]["embedding"]
    expected = jnp.mean(table[tokens[1]], axis=0) @ params["Dense_0"]["kernel"]
    np.testing.assert_allclose(
        model.predict(params, tokens[1]), expected + params["Dense_0"]["bias"], rtol=1e-12
    )
