r"""Benchmark workloads of the zoo's large models, and the accelerator suite.

* ResNet-18: the CIFAR-style ResNet-18 with batch norm of :mod:`sharpness_jax.resnet18`
  (11.2 M parameters), measured in eval mode at its initial running statistics (0, 1) (the
  cost of a product does not depend on them), inputs 32×32×3, K = 10, softmax cross-entropy.
* GPT: the causal LM of :mod:`sharpness_jax.gpt`, 2 layers, d = 128, 4 heads, T = 64,
  V = 256 (437,760 parameters, tied head), per-token cross-entropy (mean over the unpadded
  tokens) with a padding mask: each sequence is padded after a random length in [T/2, T].
* W1 at n = 8192 (GPU suite only): the MLP 784-512-512-10 tanh of ``experiments.benchmark``.

All inputs are random draws of the right shapes and dtypes (N(0, 1) images and MNIST-shaped
vectors, uniform labels and tokens), not real data; the costs measured do not depend on the
values. Times and "× gradient" figures are those of ``experiments.benchmark`` (paired with the
fastest of three full-batch gradients timed just before each run).

The rows of the benchmark (``--models``, on by default): one H, GGN and C matvec of ResNet-18
(n = 16) and the GPT LM (n = 32), each as a multiple of a gradient (target ≤ 3×).

The GPU suite (``--gpu_suite``) runs only the accelerator workloads: ResNet-18 on 256 images and
the GPT LM on 256 sequences (H, GGN, C matvecs, all per-example gradients, cold λ_max(H) to the
default Lanczos tolerance), and W1 on n = 8192 (every operator and eigen/trace row of W1). It is
sized to finish in under 8 minutes on one GPU (``gpu_suite_wall_s``, compilation included); it
runs unchanged on any backend (``jax.devices()``), and ``--small`` shrinks it to seconds on a
CPU::

  python -m experiments.benchmark --gpu_suite            # on a GPU
  python -m experiments.benchmark --gpu_suite --small    # every code path, on a CPU
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

import sharpness_jax as sj
from experiments import benchmark
from sharpness_jax import models, sharpness
from sharpness_jax.resnet18 import with_state

#: name -> (n, model options, input shape): the benchmark rows, the GPU suite, and --small.
ROWS = {
    "resnet18": (16, {"width_multiplier": 1.0}, (32, 32, 3)),
    "gpt": (32, {"num_layers": 2, "width": 128, "num_heads": 4}, (64,)),
}
SUITE = {
    "resnet18": (256, {"width_multiplier": 1.0}, (32, 32, 3)),
    "gpt": (256, {"num_layers": 2, "width": 128, "num_heads": 4}, (64,)),
    "w1": (8192, {"widths": (512, 512)}, (784,)),
}
SMALL = {
    "resnet18": (8, {"width_multiplier": 1 / 32}, (8, 8, 3)),
    "gpt": (8, {"num_layers": 1, "width": 16, "num_heads": 2}, (8,)),
    "w1": (64, {"widths": (16,)}, (784,)),
}
NUM_CLASSES = 10
VOCAB = {"gpt": 256}
SMALL_VOCAB = 32
#: The operators of the model rows (names in ``benchmark.OPERATORS``).
ROW_OPERATORS = ("hessian", "ggn", "gradient_covariance")


def problem(name: str, n: int, options: dict[str, Any], shape, *, small: bool = False):
    """(objective, params, batch) of one workload on random inputs of the right shapes.

    The initial weights are drawn from an RBG key: flax draws every leaf separately, and
    threefry's per-leaf programs take seconds to compile on a CPU (11 s for ResNet-18).
    """
    kx, ky, kl = jax.random.split(jax.random.PRNGKey(0), 3)
    kp = jax.random.key(0, impl="unsafe_rbg")
    if name == "gpt":
        vocab = SMALL_VOCAB if small else VOCAB["gpt"]
        model = models.build_model("gpt", input_shape=shape, num_outputs=vocab, **options)
        (length,) = shape
        tokens = jax.random.randint(kx, (n, length + 1), 0, vocab)
        lengths = jax.random.randint(kl, (n, 1), length // 2, length + 1)
        mask = jnp.arange(length)[None, :] < lengths
        batch = sj.Batch(tokens[:, :-1], (tokens[:, 1:], mask))
        return sj.Objective(model.predict, sj.token_cross_entropy("mean")), model.init(kp), batch
    inputs = jax.random.normal(kx, (n, *shape), jnp.float32)
    labels = jax.random.randint(ky, (n,), 0, NUM_CLASSES)
    loss = sj.get_loss("cross_entropy")
    if name == "resnet18":
        stateful = models.build_model(
            "resnet18", input_shape=shape, num_outputs=NUM_CLASSES, **options
        )
        params, state = stateful.init(kp)
        predict = with_state(stateful, state).predict
    else:
        model = models.build_model(
            "mlp", input_shape=shape, num_outputs=NUM_CLASSES, activation="tanh", **options
        )
        params, predict = model.init(kp), model.predict
    return sj.Objective(predict, loss), params, sj.Batch(inputs, labels)


def operator_rows(objective, params, batch, *, gradient, chunk: int, repeats: int):
    """The gradient's time and one matvec of each of ``ROW_OPERATORS``, paired with
    ``gradient`` (``benchmark.gradient_fn``)."""
    grad = gradient[0]
    out = {"gradient_s": benchmark.timeit(grad, params, batch, repeats=repeats)}
    g = grad(params, batch)
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    for name in ROW_OPERATORS:
        ctor = benchmark.OPERATORS[name]

        def matvec(p, b, v, g, ctor=ctor, name=name):
            # C's constructor needs ḡ once; it is passed in so that the matvec alone is timed.
            kw = {"mean_gradient": g} if name == "gradient_covariance" else {}
            return ctor(objective, p, b, chunk_size=chunk, **kw)(v)

        out[f"{name}_s"], out[f"{name}_x_grad"] = benchmark.paired(
            jax.jit(matvec), (params, batch, v, g), gradient, repeats=repeats
        )
    return out


def suite_extras(objective, params, batch, *, gradient, chunk: int, repeats: int):
    """All per-example gradients and a cold λ_max(H) (default tolerance), paired."""
    out: dict[str, Any] = {}
    pe = jax.jit(lambda p, b: sj.per_example_grads(objective, p, b, chunk_size=chunk))
    out["per_example_grads_s"], out["per_example_grads_x_grad"] = benchmark.paired(
        pe, (params, batch), gradient, repeats=repeats
    )
    top = jax.jit(lambda p, b: sharpness.hessian_top_k(objective, p, b, chunk_size=chunk))
    eig = top(params, batch)
    out["lambda_max"] = float(eig.values[0])
    out["lambda_max_cold_matvecs"] = int(eig.num_matvecs)
    out["lambda_max_cold_s"], out["lambda_max_cold_grad_equivalents"] = benchmark.paired(
        top, (params, batch), gradient, repeats=max(1, repeats // 2)
    )
    return out


def _workload(name, n, options, shape, *, chunk, repeats, small, suite, w1_eigen=True):
    start = time.perf_counter()
    objective, params, batch = problem(name, n, options, shape, small=small)
    chunk = min(chunk, n)
    out: dict[str, Any] = {"n": n, "num_params": sj.num_params(params), "chunk_size": chunk}
    kw = {"chunk": chunk, "repeats": repeats}
    if name == "w1":
        out.update(benchmark.operator_times(objective, params, batch, **kw))
        if w1_eigen:
            out.update(benchmark.eigen_and_trace_times(objective, params, batch, **kw))
    else:
        kw["gradient"] = benchmark.gradient_fn(objective, params, batch, chunk=chunk)
        out.update(operator_rows(objective, params, batch, **kw))
        if suite:
            out.update(suite_extras(objective, params, batch, **kw))
    out["wall_s"] = time.perf_counter() - start
    return out


def model_rows(
    *, repeats: int, chunk: int, small: bool = False, workloads: tuple[str, ...] = tuple(ROWS)
) -> dict[str, Any]:
    """The benchmark's ResNet-18 and GPT rows: {"resnet18": {...}, "gpt": {...}} (or those of
    ``workloads``)."""
    sizes = SMALL if small else ROWS
    return {
        name: _workload(name, *sizes[name], chunk=chunk, repeats=repeats, small=small, suite=False)
        for name in workloads
    }


def target_checks(workloads: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each figure with a target: ``<workload>_<row>`` in ``benchmark.TARGETS``, or for W1 at
    another n the W1 target of the same row."""
    checks = {}
    for workload, rows in workloads.items():
        for key, value in rows.items():
            name = f"{workload}_{key}"
            target = benchmark.TARGETS.get(name)
            if target is None and workload.startswith("w1"):
                target = benchmark.TARGETS.get(key)
            if target is not None:
                checks[name] = {
                    "value": value,
                    "target": target[0],
                    "unit": target[1],
                    "met": bool(value <= target[0]),
                }
    return checks


def gpu_suite(
    *,
    repeats: int,
    chunk: int,
    small: bool = False,
    workloads: tuple[str, ...] = tuple(SUITE),
    w1_eigen: bool = True,
) -> dict[str, Any]:
    """The accelerator workloads alone (module docstring), with their targets.

    ``workloads`` selects some of ``SUITE`` (all by default; the suite's wall-time target
    applies to all of them); ``w1_eigen=False`` leaves out W1's eigen/trace rows
    (``benchmark.eigen_and_trace_times``, which the tests run on the small W1 of
    ``benchmark.run``).
    """
    start = time.perf_counter()
    sizes = SMALL if small else SUITE
    result: dict[str, Any] = {
        "devices": [str(d) for d in jax.devices()],
        "gpu_suite": True,
        "chunk_size": chunk,
        "repeats": repeats,
        "small": small,
    }
    unknown = sorted(set(workloads) - set(SUITE))
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; choose from {tuple(SUITE)}")
    rows = {}
    for name in workloads:
        n = sizes[name][0]
        label = f"w1_n{n}" if name == "w1" else name
        rows[label] = _workload(
            name,
            *sizes[name],
            chunk=chunk,
            repeats=repeats,
            small=small,
            suite=True,
            w1_eigen=w1_eigen,
        )
    result.update(rows)
    result["gpu_suite_wall_s"] = time.perf_counter() - start
    checks = target_checks({**rows, "gpu_suite": {"wall_s": result["gpu_suite_wall_s"]}})
    result["targets"] = {} if small else checks
    return result


def markdown(result: dict[str, Any]) -> str:
    """The GPU suite's table: one column per workload."""
    names = [k for k in result if isinstance(result[k], dict) and k != "targets"]
    keys = sorted({key for name in names for key in result[name]})
    lines = [
        f"devices: {', '.join(result['devices'])}; suite wall time "
        f"{result['gpu_suite_wall_s']:.1f} s (target ≤ 480 s)",
        "",
        "| quantity | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key in keys:
        cells = [f"{result[n][key]:.4g}" if key in result[n] else "" for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
