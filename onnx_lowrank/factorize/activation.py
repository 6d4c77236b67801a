"""Element-wise activations after a layer, and the auxiliary step of fitting through them.

A layer's output ``y`` (one value per output channel c) often reaches the rest of the network
only through a per-channel affine map and an element-wise nonlinearity:

    F_c(y) = f(s_c · y + t_c)

(BatchNormalization, or an exporter's Mul/Add, gives ``s``, ``t``; ``f`` is ReLU, LeakyReLU,
PReLU, Clip, a hard-sigmoid or sigmoid, or the gated units ``u · hardsigmoid(u)`` (hard-swish)
and ``u · sigmoid(u)`` (swish)). Errors of the low-rank fit where ``F`` is flat (a ReLU's
negative side) never reach the next layer. Zhang et al., "Accelerating Very Deep Convolutional
Networks for Classification and Detection" (TPAMI 2016), section 3.2, fit the layer to the
*response* ``z = F(W p + b)`` by relaxing

    min_{M, c} Σ_n ||z_n - F(M p~_n + c)||²
    ~  min_{M, c, y} Σ_n ||z_n - F(y_n)||² + λ ||y_n - (M p~_n + c)||²

and alternating two closed-form steps while λ grows: with y fixed, (M, c) is the usual
low-rank least-squares fit of y (the data-aware fit of the method); with (M, c) fixed, each
element of y solves the scalar problem of :meth:`Activation.auxiliary`.

This module never imports onnx; it is deterministic (no random numbers).
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["KINDS", "Activation"]

#: The nonlinearities `Activation` knows: name -> number of scalar parameters it reads.
KINDS = {"relu": 0, "leaky_relu": 1, "prelu": 0, "clip": 2, "hard_sigmoid": 2, "sigmoid": 0,
         "hard_swish": 2, "swish": 0}
#: Newton steps of the scalar auxiliary problem on a curved piece, from each start.
AUX_STEPS = 10
#: Step of the central difference that gives ``F''`` in the Newton steps.
CURVATURE_STEP = 1e-4
#: How far inside its kinks a curved piece is searched (in units of the activation's input).
KINK_MARGIN = 1e-7
#: Halvings of a Newton step that does not lower the cost.
BACKTRACKS = 3


@dataclasses.dataclass(frozen=True)
class Activation:
    """``F_c(y) = f(scale_c · y + shift_c)`` over the last axis (channels) of ``y [..., m]``.

    Attributes:
        kind: a key of `KINDS`. ``leaky_relu`` reads ``params = (alpha,)``; ``clip`` reads
            ``(low, high)``; ``hard_sigmoid`` and ``hard_swish`` read ``(alpha, beta)`` of
            ``clip(alpha·u + beta, 0, 1)`` (hard-swish is ``u`` times it; ONNX HardSwish is
            ``(1/6, 1/2)``); ``prelu`` reads the per-channel slopes ``slope``.
        scale, shift: the per-channel affine map before ``f`` (``[m]``).
        slope: PReLU's negative-side slope per channel (``[m]``), else None.
    """

    kind: str
    scale: np.ndarray
    shift: np.ndarray
    params: tuple[float, ...] = ()
    slope: np.ndarray | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Activation: unknown kind '{self.kind}'; expected one of {', '.join(KINDS)}")
        if len(self.params) != KINDS[self.kind]:
            raise ValueError(f"Activation: {self.kind} takes {KINDS[self.kind]} parameters, found {len(self.params)}")
        if (self.kind == "prelu") != (self.slope is not None):
            raise ValueError("Activation: a per-channel slope goes with prelu, and only with it")

    @property
    def channels(self) -> int:
        return len(self.scale)

    def select(self, channels: slice) -> Activation:
        """The activation of a block of channels (one group of a grouped layer)."""
        slope = None if self.slope is None else self.slope[channels]
        return dataclasses.replace(self, scale=self.scale[channels], shift=self.shift[channels], slope=slope)

    def __call__(self, y: np.ndarray) -> np.ndarray:
        """``F(y)`` element-wise."""
        return self._f(self.scale * y + self.shift)

    def derivative(self, y: np.ndarray) -> np.ndarray:
        """``F'(y) = scale · f'(scale · y + shift)`` (one-sided at the kinks: 0 at a ReLU's 0)."""
        return self.scale * self._df(self.scale * y + self.shift)

    def auxiliary(self, z: np.ndarray, v: np.ndarray, lam: float) -> np.ndarray:
        """Zhang et al.'s y-step: element-wise ``argmin_y (F(y) - z)² + λ (y - v)²``.

        ``f`` is cut into pieces (`_pieces`) at its kinks. On a piece where ``f(u) = k·u + d``
        the cost is a quadratic in y with minimum ``y = (a (z - e) + λ v) / (a² + λ)``,
        ``a = k·scale``, ``e = k·shift + d``, clamped to the piece; on a curved piece (the
        middle of a hard-swish, all of a sigmoid or swish) Newton steps (`_newton`) clamped to
        the piece, from ``v``, from the preimage of ``z`` on the
        identity branch and from the piece's ends and middle (u = -4, 0, 4 on an unbounded one). The cheapest candidate per element wins: for a ReLU this is the
        paper's closed form, ``min(v, 0)`` or ``max(0, (z + λ v)/(1 + λ))``.
        """
        scale = np.where(self.scale != 0, self.scale, 1.0)
        best, cost = None, None
        for low, high, line in self._pieces():
            if line is None:      # inside the kinks, where the one-sided derivatives belong to the piece
                low, high = low + KINK_MARGIN, high - KINK_MARGIN
            ends = ((low - self.shift) / scale, (high - self.shift) / scale)
            y_low, y_high = np.minimum(*ends), np.maximum(*ends)
            if line is not None:
                k, d = line
                a, e = k * self.scale, k * self.shift + d
                candidates = [np.clip((a * (z - e) + lam * v) / (a * a + lam), y_low, y_high)]
            else:
                points = [low, (low + high) / 2, high] if np.isfinite(high - low) else [-4.0, 0.0, 4.0]
                starts = [v, (z - self.shift) / scale, *((point - self.shift) / scale for point in points)]
                candidates = [self._newton(z, v, lam, np.clip(start, y_low, y_high), y_low, y_high)
                              for start in starts]
            for y in candidates:
                value = self._cost(y, z, v, lam)
                if best is None:
                    best, cost = y, value
                else:
                    better = value < cost
                    best, cost = np.where(better, y, best), np.where(better, value, cost)
        return best

    def _newton(self, z, v, lam, y, low, high) -> np.ndarray:
        """`AUX_STEPS` Newton steps of the auxiliary cost clamped to ``[low, high]``: curvature
        ``F'² + (F - z) F'' + λ`` (``F''`` by central differences of ``F'``), Gauss-Newton's
        ``F'² + λ`` where that is not positive; a step that raises the cost is halved up to
        `BACKTRACKS` times."""
        for _ in range(AUX_STEPS):
            slope, residual = self.derivative(y), self(y) - z
            bend = (self.derivative(y + CURVATURE_STEP) - self.derivative(y - CURVATURE_STEP)) / (2 * CURVATURE_STEP)
            gauss = slope * slope + lam
            curvature = gauss + residual * bend
            curvature = np.where(curvature > 0, curvature, gauss)
            step = np.clip(y - (residual * slope + lam * (y - v)) / curvature, low, high)
            for _ in range(BACKTRACKS):    # halve a step that does not lower the cost
                worse = self._cost(step, z, v, lam) > self._cost(y, z, v, lam)
                step = np.where(worse, (y + step) / 2, step)
            y = step
        return y

    def _cost(self, y, z, v, lam) -> np.ndarray:
        return (self(y) - z) ** 2 + lam * (y - v) ** 2

    def _pieces(self) -> list[tuple[float, float, tuple | None]]:
        """``(low, high, (k, d) or None)``: the intervals of the activation's input u between kinks,
        each with ``f(u) = k·u + d`` on it, or None where f is curved."""
        inf = np.inf
        kind = self.kind
        if kind in ("relu", "leaky_relu", "prelu"):
            slope = 0.0 if kind == "relu" else self.params[0] if kind == "leaky_relu" else self.slope
            return [(-inf, 0.0, (slope, 0.0)), (0.0, inf, (1.0, 0.0))]
        if kind == "clip":
            low, high = self.params
            return [(-inf, low, (0.0, low)), (low, high, (1.0, 0.0)), (high, inf, (0.0, high))]
        if kind in ("hard_sigmoid", "hard_swish"):
            alpha, beta = self.params
            first, second = -beta / alpha, (1 - beta) / alpha
            middle = (alpha, beta) if kind == "hard_sigmoid" else None
            last = (0.0, 1.0) if kind == "hard_sigmoid" else (1.0, 0.0)
            return [(-inf, first, (0.0, 0.0)), (first, second, middle), (second, inf, last)]
        return [(-inf, inf, None)]

    def _gate(self, u: np.ndarray) -> np.ndarray:
        alpha, beta = self.params
        return np.clip(alpha * u + beta, 0.0, 1.0)

    def _f(self, u: np.ndarray) -> np.ndarray:
        kind = self.kind
        if kind == "relu":
            return np.maximum(u, 0.0)
        if kind in ("leaky_relu", "prelu"):
            slope = self.params[0] if kind == "leaky_relu" else self.slope
            return np.where(u > 0, u, slope * u)
        if kind == "clip":
            return np.clip(u, *self.params)
        if kind == "hard_sigmoid":
            return self._gate(u)
        if kind == "hard_swish":
            return u * self._gate(u)
        sigma = _sigmoid(u)
        return sigma if kind == "sigmoid" else u * sigma

    def _df(self, u: np.ndarray) -> np.ndarray:
        kind = self.kind
        if kind == "relu":
            return (u > 0).astype(np.float64)
        if kind in ("leaky_relu", "prelu"):
            slope = self.params[0] if kind == "leaky_relu" else self.slope
            return np.where(u > 0, 1.0, slope * np.ones_like(u))
        if kind == "clip":
            low, high = self.params
            return ((u > low) & (u < high)).astype(np.float64)
        if kind in ("hard_sigmoid", "hard_swish"):
            alpha, beta = self.params
            inside = ((alpha * u + beta > 0) & (alpha * u + beta < 1)) * alpha
            return inside if kind == "hard_sigmoid" else self._gate(u) + u * inside
        sigma = _sigmoid(u)
        return sigma * (1 - sigma) if kind == "sigmoid" else sigma * (1 + u * (1 - sigma))


def _sigmoid(u: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-u))`` without overflow."""
    e = np.exp(-np.abs(u))
    return np.where(u >= 0, 1 / (1 + e), e / (1 + e))
