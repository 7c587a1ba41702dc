"""Config → problem: the dataset, the model and the objective a run config describes.

``problem_from_config(config)`` is the one place that turns a run config (see
:func:`sharpness_jax.config.default_config`) into data and functions, so that an analysis of
a run uses exactly the run's dataset (with its options and the config's ``dtype``), model
(with its options and ``param_dtype`` = ``dtype``) and objective (the loss with its label
smoothing, a mean over examples)::

    problem = problem_from_config(stored_config)
    hvp = sj.hessian(problem.objective, params, Batch(*problem.dataset.train))
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from sharpness_jax import data, models
from sharpness_jax.config import resolve_config
from sharpness_jax.model_factory import build_from_factory
from sharpness_jax.objective import Objective, get_loss
from sharpness_jax.resnet18 import StatefulModel, with_state

__all__ = ["Problem", "problem_from_config"]


class Problem(NamedTuple):
    """What a run config trains and measures.

    Attributes:
      dataset: the splits (``data.Dataset``: ``train``, ``test``, ``num_classes``).
      model: the zoo model (``models.Model``: ``init``, ``predict``), or the one
        ``model.factory`` makes (:mod:`sharpness_jax.model_factory`), built for the dataset's
        input shape and output count; for ``"resnet18"`` a
        :class:`~sharpness_jax.resnet18.StatefulModel` (``init`` gives ``(params, state)``).
      objective: ``Objective(model.predict, loss)``; the training objective L(θ) =
        (1/n) Σ_p ℓ_p(θ), label smoothing included (weight decay is the optimizer's). For a
        stateful model: the eval-mode model at its initial state (``resnet18.with_state``;
        use ``Objective(with_state(model, state).predict, loss)`` at a checkpoint's state).
    """

    dataset: data.Dataset
    model: models.Model
    objective: Objective


def problem_from_config(config: Any) -> Problem:
    """The dataset, model and objective of ``config`` (resolved first; not validated).

    Args:
      config: a (partial) run config; missing fields take the defaults.

    Returns:
      :class:`Problem`.
    """
    c = resolve_config(config)
    options = {k: v for k, v in c.dataset.to_dict().items() if k not in ("name", "dtype")}
    dataset = data.load_dataset(c.dataset.name, dtype=c.dtype, **options)
    model_options = {
        k: v for k, v in c.model.to_dict().items() if k not in ("name", "factory", "param_dtype")
    }
    shapes = {"input_shape": tuple(np.shape(dataset.train.inputs)[1:])}
    shapes.update(num_outputs=dataset.num_classes, param_dtype=c.dtype)
    if c.model.factory:
        model = build_from_factory(
            c.model.factory, example_inputs=dataset.train.inputs, **shapes, **model_options
        )
    else:
        model = models.build_model(c.model.name, **shapes, **model_options)
    loss = get_loss(c.loss.name, label_smoothing=c.loss.label_smoothing)
    if isinstance(model, StatefulModel):
        # Batch-norm statistics start at (0, 1) whatever the key.
        initial_state = model.init(jax.random.PRNGKey(0))[1]
        return Problem(dataset, model, Objective(with_state(model, initial_state).predict, loss))
    return Problem(dataset, model, Objective(model.predict, loss))
