"""Activation-aware fitting: a layer's chain fitted to its response after the activation.

Zhang et al., "Accelerating Very Deep Convolutional Networks for Classification and Detection"
(TPAMI 2016, section 3.2): for a layer whose output goes through ``F`` (a per-channel affine map
and an element-wise nonlinearity, `factorize.activation.Activation`), fit the low-rank map to the
response ``z = F(W p + b)`` of the ORIGINAL layer from the inputs ``p~`` of the compressed model,
through the relaxation

    min_{M, c, y} Σ_n ||z_n - F(y_n)||² + λ ||y_n - (M p~_n + c)||²

alternating (i) the method's own data-aware fit of the auxiliary target y (the least-squares map
``B = Cov(y, p~) Cov(p~)^-1`` with intercept ``b0 = E[y] - B E[p~]``, handed to the method as the
layer's weight and bias, with the moments of ``p~``: the method's whitened fit of ``B`` under
``Cov(p~)`` is then the rank-constrained least-squares fit of y, and the refit and bias shift of
`fitting` follow) and (ii) the element-wise y-step (`Activation.auxiliary`), with λ growing so
that y ends on the fit. The first target is the preimage of z nearest the activation's input 0,
so that a unit the activation silences (a ReLU's dead or mostly negative channel) costs no rank.
Every method gets it: the method only sees a weight and moments.

The vectors are a sample of the layer's input positions (`calibrate.layer_samples`); every
`HOLD_EVERY`-th one is held out, and the activation-aware chain replaces the linear one only when
its response error on the held-out vectors is lower (`ActivationFit.kept`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np

from onnx_lowrank.factorize.activation import Activation
from onnx_lowrank.factorize.linalg import solve_spd
from onnx_lowrank.factorize.moments import Moments
from onnx_lowrank.calibrate import vector_shape
from onnx_lowrank.graph import Layer
from onnx_lowrank.memory import MemoryBudget

__all__ = ["ActivationFit", "ITERATIONS", "fit_through_activation", "lowered", "sample_rows", "stored"]

log = logging.getLogger(__name__)

#: Alternations of the relaxation, with λ from `LAMBDA_START` up by `LAMBDA_GROWTH` each time.
ITERATIONS = 6
LAMBDA_START = 0.01
LAMBDA_GROWTH = 2.0
#: One vector in this many is held out to decide between the linear and the activation-aware fit.
HOLD_EVERY = 4
#: Ridge of the auxiliary least-squares map, relative to the mean variance of ``p~``.
RIDGE = 1e-3
#: Input vectors sampled per layer, at most (fewer when the statistics budget would not hold them).
SAMPLE_ROWS = 8192


@dataclasses.dataclass(frozen=True)
class ActivationFit:
    """The chain chosen, and the held-out response errors ``Σ||F(ŷ) - z||² / Σ||z - E z||²`` of
    the linear fit and the best activation-aware one."""

    chain: object
    linear_error: float
    activation_error: float

    @property
    def kept(self) -> bool:
        """Whether the activation-aware chain replaced the linear one."""
        return self.activation_error < self.linear_error


def sample_rows(layer: Layer, budget: MemoryBudget | None) -> int:
    """How many input vectors to sample for `layer`: `SAMPLE_ROWS`, or what `budget.statistics`
    holds at ``groups · D · 24`` bytes a vector (``p``, ``p~`` in float32, a float64 copy of ``p~``)."""
    groups, dim = vector_shape(layer)
    if budget is None:
        return SAMPLE_ROWS
    return max(1, min(SAMPLE_ROWS, budget.statistics // (24 * groups * dim)))


def lowered(layer: Layer, weight: np.ndarray) -> np.ndarray:
    """A weight in `layer`'s stored layout as per-group rows ``[groups, m, D]`` (``y = W_g p``)."""
    if layer.op == "Conv":
        groups = layer.conv.group
        return weight.reshape(groups, weight.shape[0] // groups, -1)
    matrix = weight.T if layer.op == "Gemm" and layer.gemm.trans_b else weight
    return matrix.T[None]


def stored(layer: Layer, rows: np.ndarray) -> np.ndarray:
    """`lowered`'s inverse: per-group rows back to the layer's stored weight layout."""
    if layer.op == "Conv":
        return rows.reshape(layer.weight.shape)
    matrix = rows[0].T
    return matrix.T if layer.op == "Gemm" and layer.gemm.trans_b else matrix


def takes_bias(layer: Layer) -> bool:
    """Whether the chain's last node can carry a bias the fit may set: Conv, and Gemm that adds C
    unscaled (alpha = beta = 1; other Gemms and MatMul keep their bias, if any, fixed)."""
    if layer.op == "Conv":
        return True
    return layer.op == "Gemm" and layer.gemm.alpha == 1 and layer.gemm.beta == 1


def fit_through_activation(layer: Layer, linear, stats: Moments, p: np.ndarray, pt: np.ndarray,
                           activation: Activation, fit: Callable[[Layer, Moments], object],
                           kernel: Callable[[Layer, object], np.ndarray], iterations: int = ITERATIONS
                           ) -> ActivationFit:
    """Zhang et al.'s alternation for `layer` (see the module docstring), from its `linear` chain.

    Args:
        stats: the layer's input moments (all the vectors the linear fit saw); their ``p~`` side
            is the second moment of the auxiliary fits (better estimated than from the sample).
        p, pt: ``[groups, n, D]`` sampled input vectors of the original and the compressed model.
        activation: what the layer's output goes through (all output channels).
        fit: ``(layer with weight B and bias b0, moments of p~) -> chain``: the method's data-aware
            fit with the method-independent refit.
        kernel: ``(layer, chain) -> the chain's single weight in the layer's layout`` (`fitting.chain_kernel`).

    Returns:
        The chain with the lower held-out response error, and both errors.
    """
    groups, count, _ = p.shape
    held = np.arange(count) % HOLD_EVERY == 0
    weight = lowered(layer, layer.weight.astype(np.float64))
    per_group = weight.shape[1]
    bias = np.zeros(groups * per_group) if layer.bias is None else layer.bias.astype(np.float64).reshape(-1)
    acts = [activation.select(slice(g * per_group, (g + 1) * per_group)) for g in range(groups)]
    z = np.stack([acts[g](p[g] @ weight[g].T + bias[g * per_group:(g + 1) * per_group]) for g in range(groups)])
    fitted, target = pt[:, ~held].astype(np.float64), z[:, ~held]
    spread = float(np.sum((z[:, held] - z[:, held].mean(axis=1, keepdims=True)) ** 2)) or 1.0

    def outputs(chain, rows) -> np.ndarray:
        """The chain's pre-activation outputs ``M p~ + c`` on the vectors `rows` selects."""
        matrix = lowered(layer, kernel(layer, chain))
        shift = _bias(chain, bias)
        return np.stack([pt[g][rows] @ matrix[g].T + shift[g * per_group:(g + 1) * per_group] for g in range(groups)])

    def error(chain) -> float:
        y = outputs(chain, held)
        return float(sum(np.sum((acts[g](y[g]) - z[g][held]) ** 2) for g in range(groups))) / spread

    moments = _compressed_side(stats)
    intercept = takes_bias(layer)
    best, best_error = linear, error(linear)
    linear_error = best_error
    preimage = np.stack([np.broadcast_to(-a.shift / np.where(a.scale != 0, a.scale, 1.0), target.shape[1:])
                         for a in acts])
    for start in ("linear", "preimage"):
        lam, current = LAMBDA_START, linear
        for _ in range(iterations):
            v = outputs(current, ~held)
            if start == "preimage" and current is linear:   # the nearest preimage of z, whatever the fit
                y = np.stack([acts[g].auxiliary(target[g], preimage[g], 1e-6) for g in range(groups)])
            else:
                y = np.stack([acts[g].auxiliary(target[g], v[g], lam) for g in range(groups)])
            step, offset = _least_squares(y - v, fitted, intercept)
            rows = lowered(layer, kernel(layer, current)) + step
            shift = _bias(current, bias).reshape(groups, -1) + offset
            new_bias = shift.reshape(-1).astype(np.float32) if intercept else layer.bias
            current = fit(dataclasses.replace(layer, weight=stored(layer, rows).astype(layer.weight.dtype),
                                              bias=new_bias), moments)
            candidate_error = error(current)
            if candidate_error < best_error:
                best, best_error = current, candidate_error
            lam *= LAMBDA_GROWTH
    log.info("%s: held-out response error after its %s %.4g linear, %.4g activation-aware", layer.name,
             activation.kind, linear_error, best_error)
    return ActivationFit(best, linear_error, best_error)


def _compressed_side(stats: Moments) -> Moments:
    """The unpaired moments of ``p~`` alone, from paired (sequential) or unpaired moments."""
    if not stats.paired:
        return stats
    return Moments(stats.n, stats.sum_t, stats.tt)


def _least_squares(y: np.ndarray, pt: np.ndarray, intercept: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per group, the ridge least-squares map ``B [m, D]`` from ``p~`` to ``y`` on the sampled
    vectors and its intercept ``b0 [m]`` (zero without `intercept`): ``B = Cov(y, p~)(Cov(p~) +
    λI)^-1``, ``b0 = E y - B E p~`` (non-centred moments without intercept), ``λ = (RIDGE + D/n) ·
    tr Cov(p~) / D`` (`whiten.shrinkage`'s rule for n vectors of dimension D)."""
    maps, offsets = [], []
    for targets, inputs in zip(y, pt, strict=True):
        mean_y = targets.mean(axis=0) if intercept else np.zeros(targets.shape[1])
        mean_p = inputs.mean(axis=0) if intercept else np.zeros(inputs.shape[1])
        centred = inputs - mean_p
        gram = centred.T @ centred / len(inputs)
        ridge = RIDGE + inputs.shape[1] / len(inputs)
        gram[np.diag_indices_from(gram)] += ridge * max(float(np.trace(gram)) / len(gram), 1e-12)
        B = solve_spd("activation-aware fit", gram, (targets - mean_y).T @ centred / len(inputs))
        maps.append(B)
        offsets.append(mean_y - B @ mean_p)
    return np.stack(maps), np.stack(offsets)


def _bias(chain, default: np.ndarray) -> np.ndarray:
    """The chain's bias (float64), or `default` when it keeps the layer's own."""
    return default if getattr(chain, "bias", None) is None else chain.bias.astype(np.float64).reshape(-1)
