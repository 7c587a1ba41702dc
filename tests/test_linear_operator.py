"""Operators are pytrees: they compile once per rule and shapes and hold no data constants."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharpness_jax as sj
from sharpness_jax import linear_operator, operators
from tests import problems


def _batch(seed, n=24, d=4, k=3):
    rng = np.random.default_rng(seed)
    return sj.Batch(jnp.asarray(rng.normal(size=(n, d))), jnp.asarray(rng.integers(0, k, n)))


@pytest.fixture(scope="module")
def mlp():
    p = problems.mlp_problem()
    return p.objective, p.params, p.batch


def _largest_constant_bytes(text: str) -> int:
    """The longest literal payload of a constant in a lowered StableHLO module (bytes)."""
    sizes = [len(m) // 2 for m in re.findall(r'dense<"0x([0-9A-Fa-f]*)"', text)]
    sizes += [len(m) for m in re.findall(r"dense<\[([^>]*)\]>", text)]
    return max(sizes, default=0)


def test_operator_is_a_pytree_with_data_as_leaves(mlp):
    objective, params, batch = mlp
    h = operators.hessian(objective, params, batch, chunk_size=7)
    leaves = jax.tree_util.tree_leaves(h)
    assert any(leaf is batch.inputs for leaf in leaves)
    assert len(leaves) == len(jax.tree_util.tree_leaves((params, batch)))
    rebuilt = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(h), leaves)
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    np.testing.assert_allclose(
        jax.flatten_util.ravel_pytree(rebuilt(v))[0], jax.flatten_util.ravel_pytree(h(v))[0]
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda o, p, b: operators.hessian(o, p, b, chunk_size=10),
        lambda o, p, b: operators.ggn(o, p, b),
        lambda o, p, b: operators.gradient_covariance(o, p, b, chunk_size=10),
        lambda o, p, b: operators.fisher_monte_carlo(o, p, b, key=jax.random.PRNGKey(1)),
        lambda o, p, b: operators.hessian_second_moment(o, p, b, method="per_example"),
    ],
    ids=["hessian", "ggn", "covariance", "fisher_mc", "second_moment"],
)
def test_lanczos_compiles_once_for_new_arrays_of_the_same_shapes(mlp, build):
    objective, params, _ = mlp
    jitted = sj.linalg.lanczos_top_k.jitted
    before = jitted._cache_size()
    values = []
    for seed in (0, 1):
        op = build(objective, params, _batch(seed))
        values.append(sj.linalg.lanczos_top_k(op, params, k=2, num_iters=12).values)
    assert jitted._cache_size() == before + 1
    assert not np.allclose(values[0], values[1])  # the new data were used, not constants


def test_lowered_programs_hold_no_data_constants(mlp):
    objective, params, _ = mlp
    batch = _batch(0, n=400)
    h = operators.hessian(objective, params, batch, chunk_size=100)
    text = sj.linalg.lanczos_top_k.jitted.lower(h, params, k=2, num_iters=8).as_text()
    assert _largest_constant_bytes(text) < 4096
    text = linear_operator._apply.lower(h, params).as_text()
    assert _largest_constant_bytes(text) < 4096


def test_eager_products_compile_once(mlp):
    objective, params, _ = mlp
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    operators.ggn(objective, params, _batch(0))(v)
    before = linear_operator._apply._cache_size()
    operators.ggn(objective, params, _batch(1))(v)
    operators.ggn(objective, params, _batch(2))(v)
    assert linear_operator._apply._cache_size() == before


def test_restricted_operators_keep_full_params_as_operands(mlp):
    objective, params, batch = mlp
    path = sj.subsets.leaf_paths(params)[0]
    h = operators.hessian(objective, params, batch, subset=path)
    template = sj.subsets.select(params, path)
    dense = sj.linalg.dense(h, template)
    full = sj.linalg.dense(operators.hessian(objective, params, batch), params)
    size = template[path].size
    offset = 0  # the first leaf in tree order is first in the flat basis
    np.testing.assert_allclose(dense, full[offset : offset + size, offset : offset + size])


def test_composition_is_an_operator(mlp):
    objective, params, batch = mlp
    h = operators.hessian(objective, params, batch)
    f = operators.fisher(objective, params, batch)
    dh = sj.linalg.dense(h, params)
    df = sj.linalg.dense(f, params)
    eye = np.eye(dh.shape[0])
    cases = [
        (linear_operator.add(h, f, alpha=0.5), dh + 0.5 * df),
        (linear_operator.scale(h, -2.0), -2.0 * dh),
        (linear_operator.shift(h, 1e-2), dh + 1e-2 * eye),
        (linear_operator.compose(h, f), dh @ df),
        (
            linear_operator.add(h, lambda v: jax.tree_util.tree_map(lambda a: 3 * a, v)),
            dh + 3 * eye,
        ),
    ]
    for op, expected in cases:
        assert isinstance(op, linear_operator.Operator)
        np.testing.assert_allclose(sj.linalg.dense(op, params), expected, atol=1e-10)
        np.testing.assert_allclose(
            jax.jit(lambda o: sj.linalg.dense(o, params))(op), expected, atol=1e-10
        )


def test_plain_functions_still_work(mlp):
    objective, params, batch = mlp
    h = operators.hessian(objective, params, batch)
    eig = sj.linalg.lanczos_top_k(lambda v: h(v), params, k=1, num_iters=20)
    ref = sj.linalg.lanczos_top_k(h, params, k=1, num_iters=20)
    np.testing.assert_allclose(eig.values, ref.values, rtol=1e-8)
    with pytest.raises(TypeError, match="callable"):
        linear_operator.as_operator(3)


def test_static_compares_by_value_or_identity():
    assert linear_operator.Static((1, "a")) == linear_operator.Static((1, "a"))
    a, b = [1], [1]
    assert linear_operator.Static(a) == linear_operator.Static(a)
    assert linear_operator.Static(a) != linear_operator.Static(b)
    assert hash(linear_operator.Static(a)) == hash(linear_operator.Static(a))


def test_operators_serve_as_switch_branches(mlp):
    objective, params, batch = mlp
    ops = [operators.hessian(objective, params, batch), operators.ggn(objective, params, batch)]
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    for i, op in enumerate(ops):
        got = jax.jit(lambda i, v: jax.lax.switch(i, ops, v))(i, v)
        np.testing.assert_allclose(
            jax.flatten_util.ravel_pytree(got)[0], jax.flatten_util.ravel_pytree(op(v))[0]
        )
    assert len({ops[0], ops[1]}) == 2


def _bound_model(table, params, x):
    """A per-example model with fixed arrays ``table`` (like batch-norm statistics)."""
    return jnp.tanh(x @ params["w"] * table["scale"]) + jnp.mean(table["offset"])


_LOSS = sj.softmax_cross_entropy()  # one loss: its functions are the objective's static part


def _bound_objective(seed):
    rng = np.random.default_rng(seed)
    table = {
        "scale": jnp.asarray(rng.uniform(0.5, 2.0, 3)),
        "offset": jnp.asarray(rng.normal(size=1024)),
    }
    predict = jax.tree_util.Partial(_bound_model, table)
    return sj.Objective(predict, _LOSS), table


def test_objective_arrays_bound_by_a_partial_are_operands():
    """The arrays a ``Partial`` predict binds are leaves of the objective and of its
    operators: objectives at other arrays of the same shapes reuse the compiled program, and
    the arrays are no constants of it."""
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)))}
    batch = _batch(0)
    objective, table = _bound_objective(0)
    assert len(jax.tree_util.tree_leaves(objective)) == 2
    h = operators.hessian(objective, params, batch)
    assert any(leaf is table["offset"] for leaf in jax.tree_util.tree_leaves(h))
    jitted = sj.linalg.lanczos_top_k.jitted
    before = jitted._cache_size()
    values = []
    for seed in (0, 1):
        op = operators.hessian(_bound_objective(seed)[0], params, batch)
        values.append(sj.linalg.lanczos_top_k(op, params, k=2, num_iters=12).values)
        dense = sj.linalg.dense(op, params)
        np.testing.assert_allclose(values[-1], np.linalg.eigvalsh(dense)[::-1][:2], rtol=1e-6)
    assert jitted._cache_size() == before + 1
    assert not np.allclose(values[0], values[1])
    text = jitted.lower(h, params, k=2, num_iters=8).as_text()
    assert _largest_constant_bytes(text) < 4096
    # jax.jit takes an objective as an argument; a plain predict is static, a Partial's
    # arrays traced.
    loss = jax.jit(lambda o, p: sj.loss_value(o, p, batch))
    assert float(loss(objective, params)) == pytest.approx(
        float(sj.loss_value(objective, params, batch)), rel=1e-12
    )
