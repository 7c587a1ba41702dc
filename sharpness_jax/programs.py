"""The compiled programs of the training loop, and the cache that holds them.

A :class:`CompileCache` belongs to its caller: ``training.train(config, cache=cache)`` (and
``training.measure``) look up the :class:`Programs` of the config's setup (model, loss,
dtype, chunk size and data shapes) in it, and runs that share a setup and a cache (other
seeds, a resumed or repeated run, another optimizer) reuse the compiled train step,
evaluation and measurements: a repeated run compiles nothing again. Without a cache each call
starts a fresh one. A study holds one cache for all its sub-runs.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sharpness_jax import checks, records
from sharpness_jax.objective import Batch, Objective
from sharpness_jax.optim import make_optimizer
from sharpness_jax.per_example import sum_over_chunks
from sharpness_jax.problem import Problem
from sharpness_jax.resnet18 import StatefulModel, with_state

PyTree = Any

__all__ = ["CompileCache", "Programs", "Runtime"]


def _loss_and_grad(objective: Objective, params: PyTree, batch: Batch, chunk_size: int | None):
    """(L_B(θ), ∇L_B(θ)) with L_B = (1/|B|) Σ_{p∈B} ℓ_p, chunked over examples."""
    n = checks.num_examples(batch)

    def chunk_fn(chunk, mask, index):
        del index

        def total(p):
            return jnp.sum(jnp.where(mask, objective.batch_losses(p, Batch(*chunk)), 0))

        return jax.value_and_grad(total)(params)

    loss, grad = sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size)
    return loss / n, jax.tree.map(lambda g: g / n, grad)


def _kept(ok: jax.Array, new: tuple, old: tuple) -> tuple:
    """The trees of ``new`` where ``ok``, else those of ``old`` (a diverged step is undone)."""
    return tuple(
        jax.tree.map(lambda n, o: jnp.where(ok, n, o), a, b) for a, b in zip(new, old, strict=True)
    )


def _all_finite(tree: PyTree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]))


def _sam_gradient(objective, params, grads, batch, chunk_size, rho: float):
    """SAM's gradient (Foret et al. 2021) ∇L_B(θ + ρ g/‖g‖), g = ∇L_B(θ), on the same batch B.

    A small implementation inside the train step: ``optax.contrib.sam`` alternates the
    ascent and descent steps over two calls of the optimizer (two batches, a step counter
    the train loop would have to know of), while the train step here is one update per
    batch. ‖g‖ is the Euclidean norm over all parameters (0/0 leaves θ unperturbed).
    """
    return _loss_and_grad(objective, _sam_point(params, grads, rho), batch, chunk_size)[1]


def _sam_point(params: PyTree, grads: PyTree, rho: float) -> PyTree:
    """θ + ρ g/‖g‖ (θ itself where g = 0)."""
    norm = optax.tree.norm(grads)
    scale = jnp.where(norm > 0, rho / jnp.where(norm > 0, norm, 1), 0).astype(norm.dtype)
    return jax.tree.map(lambda p, g: p + (scale * g).astype(p.dtype), params, grads)


def _update_fn(
    objective: Objective,
    tx: optax.GradientTransformation,
    chunk_size: int | None,
    sam_rho: float = 0.0,
):
    """(θ, opt_state, data, idx) -> (L_B(θ), ∇L_B(θ), update, opt_state'): one step's update,
    B the rows ``idx`` of ``data`` (None: all of them). With ``sam_rho`` ρ > 0 the update is
    that of SAM's gradient (:func:`_sam_gradient`); ρ = 0 is the plain step, unchanged."""

    def update(params, opt_state, batch_data, idx):
        batch = batch_data if idx is None else jax.tree.map(lambda a: a[idx], batch_data)
        loss, grads = _loss_and_grad(objective, params, batch, chunk_size)
        direction = grads
        if sam_rho:
            direction = _sam_gradient(objective, params, grads, batch, chunk_size, sam_rho)
        updates, new_opt_state = tx.update(direction, opt_state, params)
        return loss, grads, updates, new_opt_state

    return update


def _stateful_update_fn(model: StatefulModel, objective: Objective, tx, sam_rho: float = 0.0):
    """(θ, opt_state, s, data, idx) -> (L_B(θ), ∇L_B(θ), update, opt_state', s') of a model
    with batch-norm state s: the loss of the batch in train mode (normalised by its own
    statistics, ``model.train_apply``), s' the updated running statistics. The batch is one
    piece (batch statistics are of the whole batch; ``chunk_size`` does not apply). With SAM
    (ρ > 0) the direction is the train-mode gradient at θ + ρ g/‖g‖ on the same batch and
    state; s' is that of the pass at θ."""

    def update(params, opt_state, model_state, batch_data, idx):
        batch = batch_data if idx is None else jax.tree.map(lambda a: a[idx], batch_data)

        def mean_loss(p):
            outputs, new_state = model.train_apply(p, model_state, batch.inputs)
            return jnp.mean(jax.vmap(objective.loss)(outputs, batch.targets)), new_state

        loss_and_grad = jax.value_and_grad(mean_loss, has_aux=True)
        (loss, new_model_state), grads = loss_and_grad(params)
        direction = grads
        if sam_rho:
            direction = loss_and_grad(_sam_point(params, grads, sam_rho))[1]
        updates, new_opt_state = tx.update(direction, opt_state, params)
        return loss, grads, updates, new_opt_state, new_model_state

    return update


class Programs:
    """The jitted functions of one setup: model, loss, dtype, chunk size and data shapes.

    Runs that share a setup (other seeds, a resumed or repeated run, another optimizer) reuse
    them: a repeated run compiles nothing again.
    """

    def __init__(self, model, objective, chunk_size, integer_labels):
        self.model = model
        self.stateful = isinstance(model, StatefulModel)
        self.objective = objective
        self.chunk_size = chunk_size
        self.integer_labels = integer_labels
        self.compiled: dict[tuple[str, str, Any], Callable] = {}
        self.optimizers: dict[str, optax.GradientTransformation] = {}
        self.traces: Counter[str] = Counter()

    def jit(
        self, scope: str, name: str, fn: Callable, *, owner: Any = None, **jit_kwargs
    ) -> Callable:
        """``jax.jit(fn)`` created once per (scope, name, owner); traces counted under ``name``.

        ``owner`` is the registered measurement function, so that re-registering a name
        compiles the new function instead of reusing the old one.
        """
        key = (scope, name, owner)
        if key not in self.compiled:
            self.compiled[key] = self.counted_jit(name, fn, **jit_kwargs)
        return self.compiled[key]

    def counted_jit(self, name: str, fn: Callable, **jit_kwargs) -> Callable:
        """A new ``jax.jit(fn)`` (not cached) whose traces are counted under ``name``."""

        def counted(*args, **kwargs):
            self.traces[name] += 1
            return fn(*args, **kwargs)

        counted.__name__ = counted.__qualname__ = name.replace("/", "_")
        return jax.jit(counted, **jit_kwargs)

    def optimizer(self, c: ml_collections.ConfigDict) -> tuple[str, optax.GradientTransformation]:
        """The optax transformation of ``c.optimizer`` and its cache key."""
        key = json.dumps(records.encode_value(c.optimizer.to_dict()), sort_keys=True)
        if key not in self.optimizers:
            self.optimizers[key] = make_optimizer(c)
        return key, self.optimizers[key]

    def train_step(self, c: ml_collections.ConfigDict) -> Callable:
        """(θ, opt_state, data, idx, limit) -> (θ', opt_state', L_B(θ)); θ' = θ if diverged."""
        key, tx = self.optimizer(c)
        if self.stateful:
            return self._stateful_train_step(key, tx, float(c.optimizer.sam_rho))
        update = _update_fn(self.objective, tx, self.chunk_size, float(c.optimizer.sam_rho))

        def train_step(params, opt_state, batch_data, idx, limit):
            loss, _, updates, new_opt_state = update(params, opt_state, batch_data, idx)
            new_params = optax.apply_updates(params, updates)
            ok = jnp.isfinite(loss) & (loss <= limit) & _all_finite(new_params)
            return (*_kept(ok, (new_params, new_opt_state), (params, opt_state)), loss)

        return self.jit(key, "train_step", train_step, donate_argnums=(0, 1))

    def _stateful_train_step(self, key: str, tx, sam_rho: float) -> Callable:
        """(θ, opt_state, s, data, idx, limit) -> (θ', opt_state', s', L_B(θ)); all three kept
        as they were if the step diverged."""
        update = _stateful_update_fn(self.model, self.objective, tx, sam_rho)

        def train_step(params, opt_state, model_state, batch_data, idx, limit):
            loss, _, updates, new_opt_state, new_model_state = update(
                params, opt_state, model_state, batch_data, idx
            )
            new_params = optax.apply_updates(params, updates)
            ok = jnp.isfinite(loss) & (loss <= limit) & _all_finite(new_params)
            new = (new_params, new_opt_state, new_model_state)
            return (
                *_kept(ok, new, (params, opt_state, model_state)),
                loss,
            )

        return self.jit(key, "train_step", train_step, donate_argnums=(0, 1, 2))

    def step_update(self, c: ml_collections.ConfigDict) -> Callable:
        """(θ, opt_state, data, idx) -> (L_B(θ), ∇L_B(θ), update): the update of the train
        step, without applying it (for measurements; nothing donated)."""
        key, tx = self.optimizer(c)
        if self.stateful:  # (θ, opt_state, s, data, idx): the train-mode update at state s
            rho = float(c.optimizer.sam_rho)
            update = _stateful_update_fn(self.model, self.objective, tx, rho)
            return self.jit(key, "step_update", lambda *args: update(*args)[:3])
        update = _update_fn(self.objective, tx, self.chunk_size, float(c.optimizer.sam_rho))

        def step_update(params, opt_state, batch_data, idx):
            return update(params, opt_state, batch_data, idx)[:3]

        return self.jit(key, "step_update", step_update)

    def evaluate(self) -> Callable:
        """(θ, batch) -> (Σ_p ℓ_p(θ), number of correct argmax predictions); for a stateful
        model (θ, s, batch) -> the same in eval mode at state s."""
        objective, chunk_size, labels = self.objective, self.chunk_size, self.integer_labels

        def evaluate(params, batch, objective=objective):
            def chunk_fn(chunk, mask, index):
                del index
                chunk = Batch(*chunk)
                outputs = objective.batch_outputs(params, chunk.inputs)
                losses = jax.vmap(objective.loss)(outputs, chunk.targets)
                total = jnp.sum(jnp.where(mask, losses, 0))
                if not labels:
                    return total, jnp.zeros((), jnp.int32)
                predicted = jnp.argmax(outputs, axis=-1).astype(chunk.targets.dtype)
                hit = (predicted == chunk.targets) & mask
                return total, jnp.sum(hit.astype(jnp.int32))

            return sum_over_chunks(chunk_fn, batch, chunk_size=chunk_size)

        if self.stateful:
            model = self.model

            def evaluate_at(params, model_state, batch):
                at_state = Objective(with_state(model, model_state).predict, objective.loss)
                return evaluate(params, batch, at_state)

            return self.jit("", "evaluate", evaluate_at)
        return self.jit("", "evaluate", evaluate)


class CompileCache:
    """The :class:`Programs` of the last few setups, owned by the caller of ``train``.

    Args:
      max_setups: how many setups to keep (the oldest is dropped first).
    """

    def __init__(self, max_setups: int = 4):
        self.max_setups = max_setups
        self.setups: dict[str, Programs] = {}

    def programs(self, c: ml_collections.ConfigDict, problem: Problem, labels: bool) -> Programs:
        """The programs of the setup of config ``c`` on ``problem``'s data (built on a miss
        from ``problem``'s model and objective)."""
        setup = {
            "model": c.model.to_dict(),
            "loss": c.loss.to_dict(),
            "dtype": c.dtype,
            "chunk_size": c.chunk_size,
            "input_shape": list(np.shape(problem.dataset.train.inputs)[1:]),
            "num_outputs": problem.dataset.num_classes,
            "integer_labels": labels,
        }
        key = json.dumps(records.encode_value(setup), sort_keys=True)
        if key not in self.setups:
            programs = Programs(problem.model, problem.objective, c.chunk_size, labels)
            while len(self.setups) >= self.max_setups:
                self.setups.pop(next(iter(self.setups)))
            self.setups[key] = programs
        return self.setups[key]


class Runtime:
    """One run's view of its programs: the measurement scope and the per-step memos.

    For a stateful model (batch norm) it also holds the model state s of the current step
    (:attr:`model_state`, set by the training loop); measurements see the eval-mode objective
    at s (:attr:`objective`), a pytree whose leaves are s. A measurement that passes the
    objective to its jitted function as an argument is compiled once per run, whatever s;
    one that closes over it is compiled once per state (per measured step), so that it never
    computes at stale statistics.
    """

    def __init__(self, programs: Programs, scope: str, config: ml_collections.ConfigDict):
        self.programs = programs
        self.scope = scope
        self.config = config
        self.memo: dict[tuple[int, str], dict[str, float]] = {}
        self.updates: dict[int, tuple[jax.Array, PyTree, PyTree]] = {}
        self._model_state: PyTree = None
        self._objective: Objective | None = None
        self._state_compiled: dict[tuple[str, Any], Callable] = {}

    @property
    def chunk_size(self) -> int | None:
        return self.programs.chunk_size

    @property
    def model_state(self) -> PyTree:
        """The model state of the current step (None for a stateless model)."""
        return self._model_state

    @model_state.setter
    def model_state(self, state: PyTree) -> None:
        if state is not self._model_state:
            self._model_state, self._objective = state, None
            self._state_compiled.clear()
            self.memo.clear()
            self.updates.clear()

    @property
    def objective(self) -> Objective:
        """The measured objective: the eval-mode model at :attr:`model_state` for a stateful
        model (``resnet18.with_state``), else the run's objective."""
        if not self.programs.stateful:
            return self.programs.objective
        if self._objective is None:
            model = with_state(self.programs.model, self._model_state)
            self._objective = Objective(model.predict, self.programs.objective.loss)
        return self._objective

    def jit(self, name: str, fn: Callable, *, owner: Any = None, **jit_kwargs) -> Callable:
        """The compiled ``fn`` of a measurement, created once per (scope, name, owner).

        For a stateful model, a call that takes an :class:`Objective` among its arguments
        uses that compiled function at every state (the state is a leaf of the objective);
        a call without one is compiled anew at each state (``fn`` may close over the
        objective, and with it over the state, as a constant).
        """
        shared = self.programs.jit(self.scope, name, fn, owner=owner, **jit_kwargs)
        if not self.programs.stateful:
            return shared
        key = (name, owner)

        def call(*args, **kwargs):
            if any(isinstance(a, Objective) for a in (*args, *kwargs.values())):
                return shared(*args, **kwargs)
            if key not in self._state_compiled:
                self._state_compiled[key] = self.programs.counted_jit(name, fn, **jit_kwargs)
            return self._state_compiled[key](*args, **kwargs)

        return call

    def evaluate(self, params: PyTree, batch: Batch, step: int, split: str) -> dict[str, float]:
        """Full-split mean loss and accuracy at ``step``, computed once per (step, split)."""
        memo_key = (step, split)
        if memo_key not in self.memo:
            n = checks.num_examples(batch)
            state = () if self._model_state is None else (self._model_state,)
            total, correct = self.programs.evaluate()(params, *state, batch)
            if any(s != step for s, _ in self.memo):
                self.memo.clear()
            self.memo[memo_key] = {
                "loss": float(total) / n,
                "accuracy": float(correct) / n if self.programs.integer_labels else math.nan,
            }
        return self.memo[memo_key]

    def step_update(
        self, params: PyTree, opt_state: PyTree, train: Batch, idx, step: int
    ) -> tuple[jax.Array, PyTree, PyTree]:
        """(L_B(θ_s), ∇L_B(θ_s), u_s) of the train step at ``step``, computed once per step."""
        if step not in self.updates:
            self.updates.clear()
            fn = self.programs.step_update(self.config)
            state = () if self._model_state is None else (self._model_state,)
            self.updates[step] = fn(params, opt_state, *state, train, idx)
        return self.updates[step]
