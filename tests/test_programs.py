"""The compile cache: owned by the caller of train, a fresh one per call by default, shared
compiled programs across runs of one setup, the last few setups kept."""

from training_configs import config

from sharpness_jax import training
from sharpness_jax.programs import CompileCache


def test_runs_share_programs_only_through_a_shared_cache():
    c = config(max_steps=2, model={"widths": (6,)})  # a setup the other tests do not use
    first, again = training.train(c), training.train(c)  # a fresh cache each
    assert first.traces["train_step"] == 1 and again.traces["train_step"] == 1
    cache = CompileCache()
    a = training.train(c, cache=cache)
    b = training.train(config(max_steps=3, seed=1, model={"widths": (6,)}), cache=cache)
    assert a.traces["train_step"] == 1 and b.traces == {}
    assert a.rows == first.rows


def test_the_cache_keeps_the_last_setups():
    cache = CompileCache(max_setups=1)
    small, wide = config(max_steps=1, model={"widths": (6,)}), config(max_steps=1)
    training.train(small, cache=cache)
    assert training.train(small, cache=cache).traces == {}
    training.train(wide, cache=cache)  # evicts the first setup
    assert len(cache.setups) == 1
    assert training.train(small, cache=cache).traces["train_step"] == 1
