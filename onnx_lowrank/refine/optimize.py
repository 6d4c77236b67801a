"""Block-wise reconstruction: a block's low-rank factors refined by gradient steps on its output.

After the closed-form, layer-by-layer fit, the factors and biases of the chains in one block (a
run of layers between two tensors the block boundaries pick, `passes.refine`) are refined
jointly so that the block, fed the inputs it sees in the compressed model, reproduces the
ORIGINAL block's output on the calibration inputs (BRECQ, Li et al., ICLR 2021, for the same
step in post-training quantization; AdaRound, Nagel et al. 2020, for the layer-wise one):

    min_θ  Σ_n ||f(x~_n; θ) - y_n||² / Σ_n ||y_n||²  +  μ Σ_k ||θ_k - θ0_k||² / ||θ0_k||²

by Adam (Kingma & Ba 2015) on mini-batches of the calibration samples, each tensor's step size
relative to its own scale (`LEARNING_RATE` times its root mean square), the second term pulling
towards the closed-form solution θ0. One sample in `HOLD_EVERY` (a seeded choice) is held out:
the held-out error is measured before the first step and every `EVAL_EVERY` steps, the best
parameters are kept, and the run stops after `PATIENCE` measurements without improvement, so the
held-out error it reports never exceeds the closed form's. The mini-batch order comes from the
seed, so a run is deterministic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from onnx_lowrank.refine.block import Block

__all__ = ["Refinement", "RefineOptions", "refine_block"]


@dataclasses.dataclass(frozen=True)
class RefineOptions:
    """The optimiser's settings. The learning rate was picked on the digits CNN at 0.2 of the
    MACs (1e-3 / 3e-3 / 1e-2: held-out block error 0.032 -> 0.025 / 0.025 / 0.022 in 120 steps,
    still falling at 120); the others are first choices, not tuned (see the README)."""

    steps: int = 120
    batch: int = 8
    learning_rate: float = 1e-2
    pull: float = 1e-2
    hold_every: int = 4
    eval_every: int = 10
    patience: int = 3
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Refinement:
    """Refined parameters, the block's relative squared output error on the held-out samples
    before and after, and the gradient steps taken."""

    params: dict[str, np.ndarray]
    held_out_before: float
    held_out_after: float
    steps: int

    @property
    def improved(self) -> bool:
        return self.held_out_after < self.held_out_before


def _error(block: Block, params, inputs, targets, rows: np.ndarray, batch: int) -> float:
    """Relative squared output error of the block on the samples `rows`, in chunks of `batch`."""
    residual = energy = 0.0
    for begin in range(0, len(rows), batch):
        chunk = rows[begin:begin + batch]
        outputs = block.forward({k: v[chunk] for k, v in inputs.items()}, params)
        for name, value in outputs.items():
            reference = targets[name][chunk].astype(np.float64)
            residual += float(np.sum((value - reference) ** 2))
            energy += float(np.sum(reference ** 2))
    return residual / energy if energy > 0 else residual


def refine_block(block: Block, params: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray],
                 targets: Mapping[str, np.ndarray], options: RefineOptions = RefineOptions()) -> Refinement:
    """Refine `params` (constants of `block`, the closed-form fit) on samples stacked on axis 0.

    Args:
        block: the compressed block.
        params: name -> the closed-form value of each trainable constant.
        inputs: the block's inputs in the compressed model, ``[N, ...]`` each.
        targets: the ORIGINAL block's outputs on the same samples, ``[N, ...]`` each.
    """
    count = len(next(iter(inputs.values())))
    rng = np.random.default_rng(options.seed)
    order = rng.permutation(count)
    held = np.sort(order[::options.hold_every])
    fit = np.setdiff1d(np.arange(count), held)
    start = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
    scale = {k: float(np.sqrt(np.mean(v.astype(np.float64) ** 2))) or 1.0 for k, v in start.items()}
    norm = {k: float(np.sum(v.astype(np.float64) ** 2)) or 1.0 for k, v in start.items()}
    current = {k: v.copy() for k, v in start.items()}
    first = {k: np.zeros_like(v) for k, v in start.items()}
    second = {k: np.zeros_like(v) for k, v in start.items()}
    best, best_error = start, _error(block, start, inputs, targets, held, options.batch)
    held_before, stale, step = best_error, 0, 0
    beta1, beta2 = 0.9, 0.999
    while step < options.steps and stale < options.patience and len(fit):
        chunk = rng.choice(fit, size=min(options.batch, len(fit)), replace=False)
        tape: list = []
        outputs = block.forward({k: v[chunk] for k, v in inputs.items()}, current, tape)
        energy = sum(float(np.sum(targets[n][chunk].astype(np.float64) ** 2)) for n in outputs) or 1.0
        grads = block.backward(tape, {n: (2 / energy) * (v - targets[n][chunk]) for n, v in outputs.items()},
                               current)
        step += 1
        for name, value in current.items():
            grad = grads.get(name, 0.0) + (2 * options.pull / norm[name]) * (value - start[name])
            first[name] = beta1 * first[name] + (1 - beta1) * grad
            second[name] = beta2 * second[name] + (1 - beta2) * grad * grad
            unbiased = first[name] / (1 - beta1 ** step)
            spread = np.sqrt(second[name] / (1 - beta2 ** step))
            current[name] = (value - options.learning_rate * scale[name] * unbiased / (spread + 1e-12)
                             ).astype(np.float32)
        if step % options.eval_every == 0:
            error = _error(block, current, inputs, targets, held, options.batch)
            if error < best_error:
                best, best_error, stale = {k: v.copy() for k, v in current.items()}, error, 0
            else:
                stale += 1
    return Refinement(best, held_before, best_error, step)
