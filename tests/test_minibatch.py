"""Mini-batch laws (sharpness_jax.minibatch): the training Sampler, the JAX law of the
Monte-Carlo estimators (independent draws and partition groups), the agreement of the two, and
the moment factors κ₂, κ₃ of a batch mean."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from noise_problem import reference

from sharpness_jax import minibatch
from sharpness_jax.minibatch import Sampler
from sharpness_jax.objective import Batch

# ----------------------------------------------------------------------------- sampler


def test_sampler_is_a_function_of_seed_and_step():
    for replace in (False, True):
        a = Sampler(50, 8, replace=replace, seed=3)
        b = Sampler(50, 8, replace=replace, seed=3)  # e.g. after a restart
        for step in (0, 5, 6, 7, 123):
            idx = a.indices(step)
            assert idx.dtype == np.int32 and idx.shape == (8,)
            np.testing.assert_array_equal(idx, b.indices(step))
        assert not np.array_equal(a.indices(0), a.indices(1))
        other = Sampler(50, 8, replace=replace, seed=4)
        assert not np.array_equal(a.indices(0), other.indices(0))


def test_sampler_without_replacement_covers_each_epoch_once():
    s = Sampler(24, 6, replace=False, seed=0)
    assert s.steps_per_epoch == 4
    epochs = [np.concatenate([s.indices(e * 4 + j) for j in range(4)]) for e in range(3)]
    for idx in epochs:
        np.testing.assert_array_equal(np.sort(idx), np.arange(24))
    assert not np.array_equal(epochs[0], epochs[1])
    # B not dividing n: the batches of one epoch are still disjoint.
    s = Sampler(10, 3, replace=False, seed=1)
    idx = np.concatenate([s.indices(j) for j in range(s.steps_per_epoch)])
    assert idx.size == 9 and np.unique(idx).size == 9


def test_sampler_with_replacement_draws_uniform_indices():
    s = Sampler(5, 4, replace=True, seed=0)
    idx = np.concatenate([s.indices(step) for step in range(500)])
    assert idx.min() == 0 and idx.max() == 4
    counts = np.bincount(idx, minlength=5)
    assert np.all(np.abs(counts - 400) < 5 * np.sqrt(400 * 0.8))  # binomial(2000, 1/5)
    assert any(np.unique(s.indices(step)).size < 4 for step in range(50))  # repeats happen


def test_full_batch_is_all_indices_in_order():
    for replace in (False, True):
        s = Sampler(7, 7, replace=replace, seed=5)
        for step in (0, 1, 10):
            np.testing.assert_array_equal(s.indices(step), np.arange(7))


def test_sampler_batch_selects_examples():
    x = np.arange(20, dtype=np.float64).reshape(10, 2)
    y = np.arange(10, dtype=np.int32)
    batch = Batch(x, y)
    s = Sampler(10, 4, replace=False, seed=2)
    b = s.batch(batch, 3)
    idx = s.indices(3)
    np.testing.assert_array_equal(b.inputs, x[idx])
    np.testing.assert_array_equal(b.targets, idx)
    with pytest.raises(ValueError, match="sampler is for 10"):
        s.batch(Batch(x[:9], y[:9]), 0)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((10, 0), {"replace": False}, "at least 1"),
        ((10, 11), {"replace": True}, "exceeds"),
        ((0, 1), {"replace": True}, "at least 1"),
        ((10, 2), {"replace": True, "seed": -1}, "at least 0"),
    ],
)
def test_sampler_validation(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampler(*args, **kwargs)


def test_sampler_rejects_bad_steps():
    s = Sampler(10, 2, replace=False)
    with pytest.raises(ValueError, match="at least 0"):
        s.indices(-1)
    with pytest.raises(TypeError):
        s.indices(1.5)


# ----------------------------------------------------------------------- the JAX law


@pytest.mark.parametrize("replace", [True, False])
def test_partition_batches_have_the_sampler_law(replace):
    """Each batch of a group has the sampler's law (checked on the first batch of 30,000
    groups: every ordered b-tuple, or every b-subset, about equally often), and the batches
    of a group draw their distinct indices from disjoint blocks."""
    n, b, groups = 6, 3, 30_000
    k = n // b
    idx, _ = jax.jit(
        lambda u: minibatch.batch_indices(
            jax.random.PRNGKey(0), u, n=n, b=b, replace=replace, sampling="partition", k=k
        )
    )(jnp.arange(groups, dtype=jnp.int32))
    idx = np.asarray(idx).reshape(groups, k, b)
    first, second = idx[:, 0], idx[:, 1]
    if replace:
        cells = first @ (n ** np.arange(b))
        num_cells = n**b
    else:
        cells = np.sort(first, axis=1) @ (n ** np.arange(b))
        num_cells = len(list(itertools.combinations(range(n), b)))
    counts = np.bincount(cells, minlength=n**b)
    counts = counts[counts > 0] if not replace else counts
    assert len(counts) == num_cells
    expected = groups / num_cells
    chi2 = np.sum((counts - expected) ** 2 / expected)
    dof = num_cells - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof)
    if replace:
        assert np.mean(first[:, 0] == first[:, 1]) == pytest.approx(1 / n, abs=0.01)
    for a, c in zip(first, second, strict=True):
        assert not set(a.tolist()) & set(c.tolist())


def _chi2_bound(counts, probs):
    """Pearson's χ² of ``counts`` against ``probs`` (cells of probability 0 must be empty),
    and a bound that a correct law exceeds with negligible probability."""
    total = counts.sum()
    assert np.all(counts[probs == 0] == 0)
    expected = total * probs[probs > 0]
    chi2 = np.sum((counts[probs > 0] - expected) ** 2 / expected)
    dof = np.sum(probs > 0) - 1
    return chi2, dof + 6 * np.sqrt(2 * dof)


def _jax_batches(n, b, replace, num):
    keys = jax.random.split(jax.random.PRNGKey(0), num)
    draw = jax.vmap(lambda k: minibatch.sample_indices(k, n, b, replace=replace))
    return np.asarray(jax.jit(draw)(keys))


def _sampler_batches(n, b, replace, num):
    sampler = Sampler(n, b, replace=replace, seed=0)
    return np.stack([sampler.indices(step) for step in range(num)])


@pytest.mark.parametrize("replace", [False, True])
def test_jax_law_and_sampler_law_agree(replace):
    """The JAX batch law and the training Sampler's law are one distribution over batches:
    on n = 5, b = 2 every ordered pair of indices has its exact probability (1/n² with
    replacement; 1/(n(n − 1)) for distinct indices without) under each, and the two histograms
    agree with each other (a two-sample χ²). The Sampler's batches of one epoch are disjoint,
    so its steps are not independent; the marginal law of a step is what must agree."""
    n, b, num = 5, 2, 20_000
    cells = np.arange(n * n).reshape(n, n)
    probs = np.full((n, n), 1 / n**2) if replace else (1 - np.eye(n)) / (n * (n - 1))
    counts = {}
    for name, idx in (
        ("jax", _jax_batches(n, b, replace, num)),
        ("sampler", _sampler_batches(n, b, replace, num)),
    ):
        assert idx.shape == (num, b) and idx.dtype == np.int32
        counts[name] = np.bincount(cells[idx[:, 0], idx[:, 1]], minlength=n * n)
        chi2, bound = _chi2_bound(counts[name], probs.reshape(-1))
        assert chi2 < bound, (name, chi2, bound)
    used = probs.reshape(-1) > 0
    a, c = counts["jax"][used], counts["sampler"][used]
    two_sample = np.sum((a - c) ** 2 / (a + c))
    dof = np.sum(used) - 1
    assert two_sample < dof + 6 * np.sqrt(2 * dof)


@pytest.mark.parametrize("replace", [False, True])
def test_inclusion_probabilities_agree(replace):
    """P(i ∈ B) and P(i, j ∈ B) over many steps, for both laws, against the exact values:
    b/n and b(b − 1)/(n(n − 1)) without replacement, 1 − (1 − 1/n)^b and
    1 − 2(1 − 1/n)^b + (1 − 2/n)^b with. Within 5 binomial standard deviations."""
    n, b, num = 12, 5, 6_000
    if replace:
        p1 = 1 - (1 - 1 / n) ** b
        p2 = 1 - 2 * (1 - 1 / n) ** b + (1 - 2 / n) ** b
    else:
        p1, p2 = b / n, b * (b - 1) / (n * (n - 1))
    for idx in (_jax_batches(n, b, replace, num), _sampler_batches(n, b, replace, num)):
        member = np.zeros((num, n), bool)
        member[np.arange(num)[:, None], idx] = True
        single = member.mean(0)
        pair = (member[:, :, None] & member[:, None, :]).mean(0)[~np.eye(n, dtype=bool)]
        for got, p in ((single, p1), (pair, p2)):
            assert np.all(np.abs(got - p) < 5 * np.sqrt(p * (1 - p) / num))
        if not replace:
            assert np.all(np.sort(idx, axis=1)[:, 1:] > np.sort(idx, axis=1)[:, :-1])


def test_full_batch_is_the_whole_data_without_replacement():
    """b = n without replacement: both laws take every example once (the JAX law in a random
    order). With replacement the two differ at b = n: the Sampler then takes the full batch
    (gradient descent), the JAX law n i.i.d. indices."""
    n = 6
    for idx in (_jax_batches(n, n, False, 50), _sampler_batches(n, n, False, 50)):
        np.testing.assert_array_equal(np.sort(idx, axis=1), np.tile(np.arange(n), (50, 1)))


# ------------------------------------------------------------------------- moments


def test_minibatch_noise_scale_matches_enumeration():
    """Cov(g_B) over all mini-batches equals s · C (with and without replacement)."""
    g = reference().g[:5]
    n, bsz = 5, 2
    c = np.cov(g.T, bias=True)
    with_repl = [g[list(t)].mean(0) for t in itertools.product(range(n), repeat=bsz)]
    without = [g[list(t)].mean(0) for t in itertools.combinations(range(n), bsz)]
    for means, repl in ((with_repl, True), (without, False)):
        cov = np.cov(np.stack(means).T, bias=True)
        s = minibatch.minibatch_noise_scale(n, bsz, replacement=repl)
        np.testing.assert_allclose(cov, s * c, atol=1e-14)
        assert s == minibatch.sampling_coefficients(n, bsz, repl)[0]
    assert minibatch.minibatch_noise_scale(5, 5, replacement=False) == 0.0
    with pytest.raises(ValueError, match="batch_size"):
        minibatch.minibatch_noise_scale(7, 0, replacement=True)
    with pytest.raises(ValueError, match="without replacement"):
        minibatch.minibatch_noise_scale(7, 8, replacement=False)


def test_sampling_coefficients_closed_forms():
    """κ₂ = (n − b)/(b(n − 1)), κ₃ = (n − b)(n − 2b)/(b²(n − 1)(n − 2)) without replacement;
    1/b and 1/b² with."""
    for n in range(3, 9):
        for b in range(1, n + 1):
            k2, k3 = minibatch.sampling_coefficients(n, b, False)
            np.testing.assert_allclose(k2, (n - b) / (b * (n - 1)), rtol=1e-12, atol=1e-14)
            want = (n - b) * (n - 2 * b) / (b**2 * (n - 1) * (n - 2))
            np.testing.assert_allclose(k3, want, rtol=1e-12, atol=1e-14)
            assert minibatch.sampling_coefficients(n, b, True) == (1 / b, 1 / b**2)
