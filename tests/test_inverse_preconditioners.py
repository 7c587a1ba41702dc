"""K-FAC and diagonal preconditioners of the solves, against dense float64 matrices, and
CG's scaling past lineax's breakdown test (float32)."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from problems import Dense, cnn_problem, flat, mlp_problem, rel_err

import sharpness_jax as sj
from sharpness_jax import inverse, kfac
from sharpness_jax import inverse_preconditioners as ip

PROB = mlp_problem()  # tanh MLP 4-5-3, cross-entropy, n = 7: P = 43
P = 43


@pytest.fixture(scope="module")
def dense():
    return Dense(PROB)


def _args(prob=PROB):
    return prob.objective, prob.params, prob.batch


@pytest.mark.parametrize("style", ip.KFAC_DAMPINGS)
def test_kfac_preconditioner_inverts_the_damped_kronecker_blocks(style):
    damping = 0.05
    pre = ip.kfac_preconditioner(*_args(), damping=damping, kfac_damping=style)
    m_inv = np.asarray(sj.dense(pre, PROB.params))
    # SPD, with the least eigenvalue it reports.
    np.testing.assert_allclose(m_inv, m_inv.T, atol=1e-14)
    eigs = np.linalg.eigvalsh(m_inv)
    assert eigs[0] > 0
    np.testing.assert_allclose(float(pre.lower), eigs[0], rtol=1e-10)
    # M from the K-FAC factors, through kfac.kfac_fisher (tested against the Fisher blocks).
    factors = kfac.kfac_factors(*_args())
    if style == "kronecker":  # A ⊗ G + λI
        m = np.asarray(sj.dense(kfac.kfac_fisher(factors), PROB.params)) + damping * np.eye(P)
    else:  # (A + π√λ I) ⊗ (G + √λ/π I), π² = (tr A / d_A) / (tr G / d_G)
        shifted = {}
        for name, f in factors.items():
            pi = np.sqrt(np.trace(f.A) / f.A.shape[0] / (np.trace(f.G) / f.G.shape[0]))
            root = np.sqrt(damping)
            shifted[name] = kfac.KFACFactor(
                f.A + pi * root * jnp.eye(f.A.shape[0]), f.G + root / pi * jnp.eye(f.G.shape[0])
            )
        m = np.asarray(sj.dense(kfac.kfac_fisher(shifted), PROB.params))
    np.testing.assert_allclose(m_inv @ m, np.eye(P), atol=1e-9)


@pytest.mark.parametrize("name", ip.PRECONDITIONERS)
def test_preconditioned_solves_equal_the_dense_solve(dense, name):
    damping = 0.05
    kw = dict(damping=damping, tol=1e-13, preconditioner=name)
    sol = inverse.natural_gradient(*_args(), **kw)
    assert bool(sol.converged)
    assert rel_err(flat(sol.x), np.linalg.solve(dense.G + damping * np.eye(P), dense.gbar)) < 1e-8
    emp = inverse.natural_gradient(*_args(), fisher="empirical", **kw)
    assert bool(emp.converged)
    expected = np.linalg.solve(dense.Femp + damping * np.eye(P), dense.gbar)
    assert rel_err(flat(emp.x), expected) < 1e-8
    # An indefinite H + λI by GMRES, preconditioned by the Fisher's K-FAC or diagonal.
    infl = inverse.influence(*_args(), 3, restart=P, **kw)
    assert bool(infl.converged)
    expected = np.linalg.solve(dense.H + damping * np.eye(P), dense.g[3])
    assert rel_err(flat(infl.x), expected) < 1e-8


def test_preconditioner_objects_go_into_any_solve(dense):
    damping = 0.05
    pre = ip.kfac_preconditioner(*_args(), damping=damping)
    v, vf = dense.random_vector(5)
    sol = inverse.solve(sj.ggn(*_args()), v, damping=damping, tol=1e-13, preconditioner=pre)
    assert bool(sol.converged)
    assert rel_err(flat(sol.x), np.linalg.solve(dense.G + damping * np.eye(P), vf)) < 1e-8
    # Its arrays are arguments of the compiled solve: other params, the same program.
    before = inverse._solve.jitted._cache_size()
    other = jax.tree_util.tree_map(lambda a: 1.1 * a, PROB.params)
    pre = ip.kfac_preconditioner(PROB.objective, other, PROB.batch, damping=damping)
    ggn = sj.ggn(PROB.objective, other, PROB.batch)
    inverse.solve(ggn, v, damping=damping, tol=1e-13, preconditioner=pre)
    assert inverse._solve.jitted._cache_size() == before
    with pytest.raises(ValueError, match="needs the objective"):
        inverse.solve(sj.ggn(*_args()), v, damping=damping, preconditioner="kfac")


def _scaled_inputs(prob, top):
    """The problem with input feature j scaled by 10^(−1 + j (log10(top) + 1)/(d − 1))."""
    x = prob.batch.inputs
    scales = jnp.logspace(-1, np.log10(top), x.shape[1])
    return prob.objective, prob.params, sj.Batch(x * scales[None, :], prob.batch.targets)


# K-FAC is the Fisher itself for one Dense layer under squared error (G = I, F = A ⊗ I), so
# preconditioned CG stops after the step that lands on x and the step that confirms it; in a
# two-layer tanh MLP the badly scaled inputs make F ill-conditioned through A_1, which K-FAC
# inverts exactly.
ILL_CONDITIONED = {
    "one-layer": (dict(loss="squared_error_half", n=32, d=6, widths=(3,), seed=1), 2),
    "two-layer": (dict(loss="squared_error_half", n=128, d=6, widths=(8, 4), seed=1), None),
}


@pytest.mark.parametrize("case", sorted(ILL_CONDITIONED))
def test_kfac_needs_fewer_cg_iterations_on_an_ill_conditioned_fisher(case):
    spec, most = ILL_CONDITIONED[case]
    args = _scaled_inputs(mlp_problem("tanh", **spec), 100.0)
    damping = 1e-3
    tol = 1e-8
    fisher = np.asarray(sj.dense(sj.fisher(*args), args[1]))
    size = fisher.shape[0]
    cond = np.linalg.cond(fisher + damping * np.eye(size))
    assert cond > 1e4
    expected = np.linalg.solve(fisher + damping * np.eye(size), flat(sj.gradient(*args)))
    counts = {}
    for pre in (None, "kfac"):
        sol = inverse.natural_gradient(*args, damping=damping, tol=tol, preconditioner=pre)
        assert bool(sol.converged)
        # ‖x − x*‖/‖x*‖ ≤ κ ‖r‖/‖b‖ and the stopping rule gives ‖r‖ ≤ 2 tol ‖b‖_∞ √P.
        assert rel_err(flat(sol.x), expected) <= cond * 2 * tol * np.sqrt(size)
        counts[pre] = int(sol.num_iters)
    assert counts["kfac"] < counts[None], counts
    if most is not None:
        assert counts["kfac"] <= most, counts


def test_layers_kfac_does_not_cover_get_the_fisher_diagonal():
    prob = cnn_problem()  # a convolution (not covered) and a Dense head
    damping = 0.05
    pre = ip.kfac_preconditioner(*_args(prob), damping=damping)
    m_inv = np.asarray(sj.dense(pre, prob.params))
    fisher = np.asarray(sj.dense(sj.fisher(*_args(prob)), prob.params))
    leaves = jax.tree_util.tree_leaves(prob.params)  # the order of ravel_pytree
    paths = sj.leaf_paths(prob.params)
    conv = np.concatenate(
        [np.full(a.size, "Conv" in p) for p, a in zip(paths, leaves, strict=True)]
    )
    block = m_inv[np.ix_(conv, conv)]
    np.testing.assert_allclose(block, np.diag(1 / (np.diag(fisher)[conv] + damping)), atol=1e-14)
    assert np.all(m_inv[np.ix_(conv, ~conv)] == 0)
    eigs = np.linalg.eigvalsh((m_inv + m_inv.T) / 2)
    assert eigs[0] > 0
    sol = inverse.natural_gradient(*_args(prob), damping=damping, tol=1e-13, preconditioner="kfac")
    expected = np.linalg.solve(
        fisher + damping * np.eye(fisher.shape[0]), flat(sj.gradient(*_args(prob)))
    )
    assert bool(sol.converged) and rel_err(flat(sol.x), expected) < 1e-8


def test_kfac_preconditioner_refuses_what_it_cannot_do():
    prob = cnn_problem()
    with pytest.raises(ValueError, match="diagonal"):
        ip.kfac_preconditioner(*_args(prob), damping=0.1, subset="params/Conv_0")
    with pytest.raises(ValueError, match="damping"):
        ip.kfac_preconditioner(*_args(), damping=0.0)
    with pytest.raises(ValueError, match="kfac_damping"):
        ip.kfac_preconditioner(*_args(), damping=0.1, kfac_damping="pi")
    with pytest.raises(ValueError, match="preconditioner"):
        inverse.natural_gradient(*_args(), damping=0.1, preconditioner="kfca")
    with pytest.raises(ValueError, match="fisher"):
        inverse.natural_gradient(*_args(), damping=0.1, fisher="monte_carlo")


def _float32(prob):
    cast = lambda t: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), t)
    return prob.objective, cast(prob.params), sj.Batch(cast(prob.batch.inputs), prob.batch.targets)


def test_float32_cg_runs_past_lineaxs_scale_dependent_breakdown_test():
    """lineax's CG returns NaN once a step length α = rᵀz / pᵀ(F + λI)p exceeds
    1/(200 ε P) (= 6.8 here, ε = 1.2·10⁻⁷, P = 6154), which the Fisher's small eigenvalues
    allow (α ≤ 1/λ = 100); the solve with M⁻¹ scaled by ``cg_scale`` takes the same
    iterations in exact arithmetic and converges, to the float64 solution."""
    prob = mlp_problem(n=256, d=20, widths=(64, 64, 10))
    damping, tol = 1e-2, 1e-4
    args = _float32(prob)
    fvp, g = sj.fisher(*args), sj.gradient(*args)
    op = lx.FunctionLinearOperator(
        lambda v: jax.tree_util.tree_map(lambda a, b: a + damping * b, fvp(v), v),
        jax.eval_shape(lambda: g),
        (lx.symmetric_tag, lx.positive_semidefinite_tag),
    )
    b_max = float(np.max(np.abs(flat(g))))
    raw = lx.linear_solve(op, g, lx.CG(rtol=tol, atol=tol * b_max), throw=False)
    assert not np.all(np.isfinite(flat(raw.value)))  # the breakdown this guards against
    sol = inverse.natural_gradient(*args, damping=damping, tol=tol, max_iters=1000)
    assert bool(sol.converged) and np.all(np.isfinite(flat(sol.x)))
    # The stopping rule |r_i| ≤ tol (‖b‖_∞ + |b_i|) bounds ‖r‖₂ by 2 tol ‖b‖_∞ √P; here r is
    # recomputed in float64 for the float32 solution.
    fvp64 = sj.fisher(prob.objective, prob.params, prob.batch)
    x = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), sol.x)
    b = flat(sj.gradient(prob.objective, prob.params, prob.batch))
    r = b - flat(fvp64(x)) - damping * flat(x)
    size = b.size
    assert np.linalg.norm(r) <= 2 * tol * np.max(np.abs(b)) * np.sqrt(size)


def test_a_scaled_preconditioner_leaves_the_cg_iterates_unchanged(dense):
    """lineax's CG with M⁻¹ = cI takes the steps of plain CG (float64: no breakdown), and
    ``solve`` takes them too (here c = 1: λ is far above 2000 ε P)."""
    damping = 1e-3
    fvp, (v, _) = sj.fisher(*_args()), dense.random_vector(2)
    structure = jax.eval_shape(lambda: v)
    psd = (lx.symmetric_tag, lx.positive_semidefinite_tag)
    op = lx.FunctionLinearOperator(
        lambda u: jax.tree_util.tree_map(lambda a, b: a + damping * b, fvp(u), u), structure, psd
    )
    tol = 1e-10
    solver = lx.CG(rtol=tol, atol=tol * float(np.max(np.abs(flat(v)))))
    raw = lx.linear_solve(op, v, solver, throw=False)
    scaled_identity = lx.FunctionLinearOperator(
        lambda u: jax.tree_util.tree_map(lambda a: 1e6 * a, u), structure, psd
    )
    options = {"preconditioner": scaled_identity}
    scaled = lx.linear_solve(op, v, solver, options=options, throw=False)
    assert int(scaled.stats["num_steps"]) == int(raw.stats["num_steps"])
    assert rel_err(flat(scaled.value), flat(raw.value)) < 1e-10
    assert float(ip.cg_scale(None, jnp.asarray(damping), P, jnp.float64)) == 1.0
    sol = inverse.solve(fvp, v, damping=damping, tol=tol)
    assert int(sol.num_iters) == int(raw.stats["num_steps"])
    assert rel_err(flat(sol.x), flat(raw.value)) < 1e-12
