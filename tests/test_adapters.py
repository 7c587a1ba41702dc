"""Adapters from user models, against dense references built directly from the module.

Each reference calls the module the way its user would (a linen ``apply`` on the whole batch,
an NNX module on the batch, an equinox module under ``vmap``) on flattened params and takes
``jax.hessian`` / ``jax.jacfwd`` / ``jax.jacrev`` of that; it shares no code with the adapters.
"""

import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from problems import rel_err

import sharpness_jax as sj

F64 = jnp.float64


def _to_f64(tree):
    return jax.tree_util.tree_map(lambda a: a.astype(F64), tree)


class _BatchFirstCNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # (n, H, W, C)
        x = jax.nn.relu(nn.Conv(2, (3, 3))(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class _BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(5)(x))
        return nn.Dense(3)(jnp.tanh(x))


class _DropoutNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Dense(3)(nn.Dropout(0.5, deterministic=not train)(x))


class _NNXNet(nnx.Module):
    def __init__(self, *, batch_norm: bool, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(4, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs) if batch_norm else None
        self.l2 = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        h = self.l1(x)
        return self.l2(jnp.tanh(h if self.bn is None else self.bn(h)))


def _nnx_net(*, batch_norm, dtype=F64):
    module = _NNXNet(batch_norm=batch_norm, rngs=nnx.Rngs(0))
    nnx.update(module, jax.tree_util.tree_map(lambda a: a.astype(dtype), nnx.state(module)))
    return module


def _keys(seed):
    return jax.random.split(jax.random.PRNGKey(seed), 4)


def linen_cnn():
    kx, ky, kp, _ = _keys(0)
    x = jax.random.normal(kx, (5, 4, 4, 1), F64)
    module = _BatchFirstCNN()
    variables = _to_f64(module.init(kp, x.astype(jnp.float32)))
    adapted = sj.adapters.from_linen(module, variables, example_inputs=x)
    y = jax.random.randint(ky, (5,), 0, 3)
    return (
        adapted,
        lambda p: module.apply({"params": p}, x),
        sj.Batch(x, y),
        sj.get_loss("cross_entropy"),
    )


def linen_batch_norm_eval():
    kx, ky, kp, ks = _keys(1)
    x = jax.random.normal(kx, (6, 4), F64)
    module = _BatchNormNet()
    variables = _to_f64(module.init(kp, x.astype(jnp.float32), train=False))
    km, kv = jax.random.split(ks)
    stats = {  # running statistics far from (0, 1), so that they matter
        "mean": jax.random.normal(km, (5,), F64),
        "var": jnp.exp(jax.random.normal(kv, (5,), F64)),
    }
    variables = {"params": variables["params"], "batch_stats": {"BatchNorm_0": stats}}
    adapted = sj.adapters.from_linen(module, variables, train=False, example_inputs=x)
    assert adapted.params is variables["params"]  # batch_stats are not differentiated

    def outputs(p):
        return module.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=False)

    y = jax.random.normal(ky, (6, 3), F64)
    return adapted, outputs, sj.Batch(x, y), sj.get_loss("squared_error_half")


def nnx_mlp():
    kx, ky, _, _ = _keys(2)
    x = jax.random.normal(kx, (5, 4), F64)
    module = _nnx_net(batch_norm=False)
    graphdef, _, rest = nnx.split(module, nnx.Param, ...)
    adapted = sj.adapters.from_nnx(module, example_inputs=x)
    y = jax.random.randint(ky, (5,), 0, 3)
    return (
        adapted,
        lambda p: nnx.merge(graphdef, p, rest)(x),
        sj.Batch(x, y),
        sj.get_loss("cross_entropy"),
    )


def equinox_mlp():
    eqx = pytest.importorskip("equinox")
    kx, ky, kp, _ = _keys(3)
    x = jax.random.normal(kx, (5, 4), F64)
    module = eqx.nn.MLP(4, 3, 6, depth=1, activation=jnp.tanh, dtype=F64, key=kp)
    _, static = eqx.partition(module, eqx.is_inexact_array)
    adapted = sj.adapters.from_equinox(module, example_inputs=x)
    y = jax.random.randint(ky, (5,), 0, 3)
    return (
        adapted,
        lambda p: jax.vmap(eqx.combine(p, static))(x),
        sj.Batch(x, y),
        sj.get_loss("cross_entropy"),
    )


CASES = {
    "linen_cnn": linen_cnn,
    "linen_batch_norm_eval": linen_batch_norm_eval,
    "nnx_mlp": nnx_mlp,
    "equinox_mlp": equinox_mlp,
}


def _dense_references(outputs, params, targets, loss):
    """H, GGN and C of L(θ) = (1/n) Σ_p loss(f_p(θ), y_p), with f(θ) = outputs(θ), (n, K)."""
    flat, unravel = ravel_pytree(params)
    n = targets.shape[0]

    def out(f):
        return outputs(unravel(f))

    def losses(f):
        return jax.vmap(loss.value)(out(f), targets)

    jac = jax.jacfwd(out)(flat)  # (n, K, P)
    lam = jax.vmap(jax.hessian(loss.value))(out(flat), targets)  # (n, K, K)
    g = jax.jacrev(losses)(flat)  # (n, P)
    centred = g - g.mean(0, keepdims=True)
    return {
        "hessian": jax.hessian(lambda f: jnp.mean(losses(f)))(flat),
        "ggn": jnp.einsum("pkq,pkl,plr->qr", jac, lam, jac) / n,
        "gradient_covariance": centred.T @ centred / n,
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_reproduces_module_and_its_curvature(case):
    (predict, params), outputs, batch, loss = CASES[case]()
    mine = jax.vmap(predict, in_axes=(None, 0))(params, batch.inputs)
    np.testing.assert_allclose(mine, outputs(params), rtol=1e-12, atol=1e-12)

    objective = sj.Objective(predict, loss)
    constructors = {
        "hessian": sj.operators.hessian,
        "ggn": sj.operators.ggn,
        "gradient_covariance": sj.operators.gradient_covariance,
    }

    @jax.jit
    def all_dense(p, b):
        return {k: sj.dense(c(objective, p, b, chunk_size=2), p) for k, c in constructors.items()}

    mats = all_dense(params, batch)
    refs = jax.jit(_dense_references, static_argnums=(0, 3))(outputs, params, batch.targets, loss)
    for name, ref in refs.items():
        assert float(jnp.max(jnp.abs(ref))) > 1e-6, name  # the reference is not trivially 0
        assert rel_err(mats[name], ref) < 1e-9, (name, rel_err(mats[name], ref))


def _batch_norm_variables(x):
    # Train-mode BatchNorm in flax promotes its statistics with float32, which strict dtype
    # promotion refuses in float64: the train-mode tests run in float32.
    module = _BatchNormNet()
    return module, module.init(jax.random.PRNGKey(0), x, train=False)


def test_linen_train_mode_batch_norm_is_refused_with_eval_mode_message():
    x = jax.random.normal(jax.random.PRNGKey(4), (4, 4), jnp.float32)
    module, variables = _batch_norm_variables(x)
    with pytest.raises(ValueError, match="eval mode"):
        sj.adapters.from_linen(module, variables, train=True, example_inputs=x)
    # Without example inputs the first call refuses it.
    predict, params = sj.adapters.from_linen(module, variables, train=True)
    with pytest.raises(ValueError, match=r"train mode.*eval mode"):
        predict(params, x[0])
    with pytest.raises(ValueError, match="holds them fixed"):
        sj.adapters.from_linen(module, variables, train=True, mutable="batch_stats")
    with pytest.raises(ValueError, match="not among"):
        sj.adapters.from_linen(module, variables, trainable="weights", train=False)


def _largest_constant_bytes(text: str) -> int:
    sizes = [len(m) // 2 for m in re.findall(r'dense<"0x([0-9A-Fa-f]*)"', text)]
    sizes += [len(m) for m in re.findall(r"dense<\[([^>]*)\]>", text)]
    return max(sizes, default=0)


def test_fixed_state_is_an_operand_and_new_statistics_reuse_the_program():
    """Adapters rebuilt at new BatchNorm statistics (linen) or new non-Param state (NNX) share
    one compiled Lanczos; the state is a leaf of the objective, not a constant."""
    x = jax.random.normal(jax.random.PRNGKey(5), (16, 4), jnp.float64)
    y = jax.random.randint(jax.random.PRNGKey(6), (16,), 0, 3)
    module = _BatchNormNet()
    variables = _to_f64(module.init(jax.random.PRNGKey(0), x.astype(jnp.float32), train=False))
    mean_shift = jnp.arange(5.0, dtype=jnp.float64)
    mean = variables["batch_stats"]["BatchNorm_0"]["mean"]
    jitted = sj.linalg.lanczos_top_k.jitted
    ops, values = [], []
    for shift in (0.0, 1.0):
        stats = {"BatchNorm_0": {**variables["batch_stats"]["BatchNorm_0"]}}
        stats["BatchNorm_0"]["mean"] = mean + shift * mean_shift
        predict, params = sj.adapters.from_linen(
            module, {"params": variables["params"], "batch_stats": stats}, train=False
        )
        objective = sj.Objective(predict, sj.softmax_cross_entropy())
        leaves = jax.tree_util.tree_leaves(objective)
        assert any(leaf is stats["BatchNorm_0"]["mean"] for leaf in leaves)
        ops.append(sj.hessian(objective, params, sj.Batch(x, y)))
        before = jitted._cache_size()
        values.append(sj.lanczos_top_k(ops[-1], params, k=2, num_iters=12).values)
        flat, unravel = ravel_pytree(params)
        dense = jax.hessian(lambda f: sj.loss_value(objective, unravel(f), sj.Batch(x, y)))(flat)
        np.testing.assert_allclose(values[-1], np.linalg.eigvalsh(dense)[::-1][:2], rtol=1e-6)
    assert jitted._cache_size() == before  # the second adapter's program was compiled already
    assert not np.allclose(values[0], values[1])
    text = jitted.lower(ops[1], params, k=2, num_iters=8).as_text()
    assert _largest_constant_bytes(text) < 4096

    def nnx_objective(scale):
        net = nnx.Sequential(nnx.Linear(4, 5, rngs=nnx.Rngs(0)), nnx.BatchNorm(5, rngs=nnx.Rngs(1)))
        net.layers[1].mean[...] = scale * mean_shift.astype(jnp.float32)
        net.eval()
        predict, params = sj.adapters.from_nnx(net)
        return sj.Objective(predict, sj.softmax_cross_entropy()), params

    loss = jax.jit(lambda o, p: sj.loss_value(o, p, sj.Batch(x[:, :4].astype(jnp.float32), y)))
    (o0, p0), (o1, p1) = nnx_objective(0.0), nnx_objective(1.0)
    first, second = float(loss(o0, p0)), float(loss(o1, p1))
    assert loss._cache_size() == 1 and first != second


def test_linen_dropout_needs_a_flag_or_an_rng():
    x = jax.random.normal(jax.random.PRNGKey(5), (3, 4), F64)
    module = _DropoutNet()
    variables = _to_f64(module.init(jax.random.PRNGKey(0), x.astype(jnp.float32), train=False))
    with pytest.raises(ValueError, match="rng"):
        sj.adapters.from_linen(module, variables, train=True, example_inputs=x)
    predict, params = sj.adapters.from_linen(module, variables, train=False, example_inputs=x)
    np.testing.assert_allclose(
        predict(params, x[1]), module.apply(variables, x, train=False)[1], rtol=1e-12
    )
    # A fixed rng: one fixed mask, so the outputs are reproducible.
    rngs = {"dropout": jax.random.PRNGKey(1)}
    predict, params = sj.adapters.from_linen(module, variables, rngs=rngs, train=True)
    np.testing.assert_array_equal(predict(params, x[0]), predict(params, x[0]))


def test_nnx_train_mode_is_refused_and_eval_mode_accepted():
    x = jax.random.normal(jax.random.PRNGKey(6), (4, 4), jnp.float32)
    module = _nnx_net(batch_norm=True, dtype=jnp.float32)  # as for linen train mode
    with pytest.raises(ValueError, match=r"module\.eval\(\).*eval mode"):
        sj.adapters.from_nnx(module, example_inputs=x)
    module.eval()
    predict, params = sj.adapters.from_nnx(module, example_inputs=x)
    assert all(path.split("/")[0] in ("l1", "l2", "bn") for path in sj.leaf_paths(params))
    assert not any(path.endswith(("mean", "var")) for path in sj.leaf_paths(params))
    mine = jax.vmap(predict, in_axes=(None, 0))(params, x)
    np.testing.assert_allclose(mine, module(x), rtol=1e-6, atol=1e-6)


def test_example_mixing_check_fires_on_batch_normalisation_and_passes_otherwise():
    x = jax.random.normal(jax.random.PRNGKey(7), (5, 4), F64)
    w = jax.random.normal(jax.random.PRNGKey(8), (4, 3), F64)

    def centred(p, xb):
        return (xb - xb.mean(0, keepdims=True)) @ p

    with pytest.raises(ValueError, match="mixes examples"):
        sj.adapters.check_no_example_mixing(centred, w, x)
    with pytest.raises(ValueError, match="mixes examples"):
        sj.adapters.check_no_example_mixing(centred, w, x[:1])  # one example given
    with pytest.raises(ValueError, match="mixes examples"):
        sj.adapters.from_batched(centred, params=w, example_inputs=x)
    predict = sj.adapters.from_batched(lambda p, xb: jnp.tanh(xb @ p), params=w, example_inputs=x)
    np.testing.assert_allclose(predict(w, x[2]), jnp.tanh(x[2] @ w), rtol=1e-12)

    # Train-mode BatchNorm evaluated with its statistics as a mutable collection mixes
    # examples; eval mode does not.
    x32 = x.astype(jnp.float32)
    module, variables = _batch_norm_variables(x32)

    def batch_norm(train):
        def fn(p, xb):
            out, _ = module.apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                xb,
                train=train,
                mutable=["batch_stats"],
            )
            return out

        return fn

    with pytest.raises(ValueError, match=r"mixes examples.*eval mode"):
        sj.adapters.check_no_example_mixing(batch_norm(True), variables["params"], x32)
    sj.adapters.check_no_example_mixing(batch_norm(False), variables["params"], x32)

    # Integer inputs (token ids) are perturbed within their range.
    table = jax.random.normal(jax.random.PRNGKey(9), (5, 2), F64)
    ids = jax.random.randint(jax.random.PRNGKey(10), (4, 3), 0, 5)
    with pytest.raises(ValueError, match="mixes examples"):
        sj.adapters.check_no_example_mixing(
            lambda t, i: t[i] - t[i].mean(0, keepdims=True), table, ids
        )
    sj.adapters.check_no_example_mixing(lambda t, i: t[i] * 2.0, table, ids)


def test_equinox_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "equinox", None)
    with pytest.raises(ImportError, match=r"pip install sharpness_jax\[equinox\]"):
        sj.adapters.from_equinox(object())
