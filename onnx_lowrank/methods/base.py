"""The `Method` protocol: everything the pipeline asks of one factorization, in one object.

A method answers, for a layer (`graph.Layer`): whether it applies (or why not), the ranks at
which it is exact, the chain it builds at given ranks (geometry only: costing a rank needs no
factorization), the singular-value spectra of the modes it truncates (from the weight, or in
output units from calibration statistics) and the error-versus-rank curve read off them, the
stage weights of its factorization (weight-only, or fitted to calibration statistics when they
are given), and the reconstruction of a bare weight (`project`, for `--keep-structure` and
low-rank-aware training). The method-independent steps (refit of the last stage, bias
correction, costs, weight error) live in `onnx_lowrank.fitting`.

A method that does not factorize some kind of layer names the method that serves it
(`resolve`): by default Gemm, MatMul and pointwise convolutions take truncated SVD ("svd":
Tucker-2 or CP of a matrix is an SVD with extra nodes) and ConvTranspose takes Tucker-2.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from onnx_lowrank.graph import Layer
from onnx_lowrank.ranks import ModeSpectrum, rank_grid, svd_error_curve
from onnx_lowrank.rewrite.chain import Chain, ShuffleStage, chain_costs

__all__ = ["ConvMethod", "Method", "RankedMethod", "conv_layout", "filled", "is_matrix_layer", "placeholder", "spectrum_of", "swap_channels"]

#: A point of an error curve: the ranks, and the relative squared error they leave.
CurvePoint = tuple[tuple[int, ...], float]


def is_matrix_layer(layer: Layer) -> bool:
    """Gemm, MatMul and pointwise Conv layers: a matrix product, factorized by truncated SVD."""
    if layer.op in ("Gemm", "MatMul"):
        return True
    return layer.op == "Conv" and all(k == 1 for k in layer.weight.shape[2:])


def placeholder(*shape: int) -> np.ndarray:
    """A zero-memory stand-in weight of `shape` for chain templates (costing needs shapes only)."""
    return np.broadcast_to(np.float32(0), shape)


def filled(template: Chain, weights: Sequence[np.ndarray]) -> Chain:
    """`template` with its weighted stages' placeholders replaced by `weights`, in order."""
    weighted = iter(weights)
    stages = []
    for stage in template.stages:
        if isinstance(stage, ShuffleStage):
            stages.append(stage)
            continue
        weight = next(weighted)
        if weight.shape != stage.weight.shape:
            raise AssertionError(f"{template.method}: factor of shape {weight.shape} where the chain "
                                 f"expects {stage.weight.shape}")
        stages.append(dataclasses.replace(stage, weight=weight))
    return dataclasses.replace(template, stages=tuple(stages))


class Method(abc.ABC):
    """One factorization method. Subclasses set `name` and implement the abstract methods.

    Attributes:
        name: the `--method` name.
        ranked: whether ranks are chosen (by a policy or a budget: see `RankedMethod`); False
            when the structure fixes the cost (versatile filters).
        in_auto: whether `--method auto` considers it (its error curve must be exact or a
            bound, so that the budget compares methods fairly).
        sample_space: whether its data-aware fit and spectra take sample-space statistics
            (`factorize.moments.SampleMoments`, for inputs wider than the vectors they see);
            otherwise such a layer is factorized from its weight and only refit on the data.
    """

    name: ClassVar[str]
    ranked: ClassVar[bool] = False
    in_auto: ClassVar[bool] = False
    sample_space: ClassVar[bool] = False

    def configure(self, settings) -> Method:
        """This method with the run's `Settings` applied (e.g. tiles, seed); default: itself."""
        return self

    def resolve(self, layer: Layer) -> str:
        """The name of the method that factorizes `layer` when this one is asked for."""
        if is_matrix_layer(layer):
            return "svd"
        if layer.op == "ConvTranspose":
            return "tucker2"
        return self.name

    def not_applicable(self, layer: Layer) -> str | None:
        """Why this method cannot factorize `layer` (one line), or None."""
        return None

    def uses_data(self, layer: Layer) -> bool:
        """Whether calibration statistics change this method's fit of `layer` (or its refit)."""
        return layer.op != "ConvTranspose"

    @abc.abstractmethod
    def build(self, layer: Layer, ranks: tuple[int, ...] | None, stats=None):
        """The chain replacing `layer` (a `rewrite.chain.Chain` or another chain kind with
        `describe`, `params`, costs and a rewrite); fitted to calibration moments `stats`."""

    @abc.abstractmethod
    def project(self, weight: np.ndarray, rank: int | tuple[int, ...], groups: int = 1) -> np.ndarray:
        """`W -> Ŵ`: the reconstruction of this method's factorization of a bare kernel
        `[T, S/g, k..]` (rank `rank`), same shape (float64)."""


class RankedMethod(Method):
    """A method whose cost and error are set by ranks: a chain template, spectra and error curves."""

    ranked = True

    @abc.abstractmethod
    def full_ranks(self, layer: Layer) -> tuple[int, ...]:
        """The ranks (per mode, per group) at which the chain reproduces the layer exactly."""

    @abc.abstractmethod
    def template(self, layer: Layer, ranks: tuple[int, ...]) -> Chain:
        """The chain at `ranks` with zero-memory placeholder weights (`placeholder`)."""

    def costs(self, layer: Layer, ranks: tuple[int, ...]) -> tuple[int, int]:
        """(MACs, parameters) of the chain at `ranks` on the layer's shapes."""
        return chain_costs(self.template(layer, ranks), layer)

    @abc.abstractmethod
    def spectra(self, layer: Layer, stats=None) -> tuple[ModeSpectrum, ...]:
        """Per factorized mode (as in `full_ranks`), the singular values it truncates, per group:
        of the weight, or with `stats` (the layer's calibration moments) in output units."""

    def error_curve(self, layer: Layer, spectra: Sequence[ModeSpectrum], multiple: int) -> list[CurvePoint]:
        """(ranks, relative squared error) on the rank grid (multiples of `multiple`).

        One mode: Eckart–Young, `Σ_{i>r} σ_i² / Σ σ_i²` of the first spectrum.
        """
        grid = rank_grid(self.full_ranks(layer)[0], multiple)
        return [((r,), e) for r, e in zip(grid, svd_error_curve(spectra[0], grid), strict=True)]

    @abc.abstractmethod
    def weights(self, layer: Layer, ranks: tuple[int, ...], stats=None) -> tuple[np.ndarray, ...]:
        """The stage weights of the factorization at `ranks`, in chain order; fitted to the
        layer's output on calibration data when `stats` (its input moments) are given."""

    def build(self, layer, ranks, stats=None):
        """`template` at `ranks` filled with `weights`."""
        return filled(self.template(layer, ranks), self.weights(layer, ranks, stats))


class ConvMethod(RankedMethod):
    """A method whose numerics factor a bare Conv kernel (`factor_kernel`), so that it can also
    `project` a weight of any framework (the weight-distortion step of low-rank-aware training)."""

    @abc.abstractmethod
    def factor_kernel(self, kernel: np.ndarray, groups: int, ranks: tuple[int, ...], stats=None):
        """The factorization of `kernel` `[T, S/g, k..]` (a `factorize.ConvFactors`): weight-only,
        or fitted to calibration moments `stats`."""

    def rank_tuple(self, rank: int | tuple[int, ...], kernel: np.ndarray, groups: int) -> tuple[int, ...]:
        """`project`'s `rank` argument as this method's ranks."""
        return tuple(rank) if isinstance(rank, tuple) else (int(rank),)

    def weights(self, layer, ranks, stats=None):
        return self.factor_kernel(layer.weight, layer.conv.group, ranks, stats).weights

    def project(self, weight, rank, groups=1):
        return self.factor_kernel(np.asarray(weight), groups, self.rank_tuple(rank, weight, groups)).to_tensor()


def swap_channels(weight: np.ndarray, groups: int) -> np.ndarray:
    """`[g·A, B, k..]` -> `[g·B, A, k..]`, swapping the two channel axes within each group:
    a ConvTranspose weight `[S, T/g, k..]` becomes the Conv-layout `[T, S/g, k..]` and back."""
    a, b = weight.shape[0] // groups, weight.shape[1]
    blocks = weight.reshape(groups, a, b, *weight.shape[2:])
    return np.ascontiguousarray(np.swapaxes(blocks, 1, 2).reshape(groups * b, a, *weight.shape[2:]))


def conv_layout(layer: Layer) -> np.ndarray:
    """The layer's kernel as `[T, S/g, k..]` (a ConvTranspose's channel axes swapped per group)."""
    return swap_channels(layer.weight, layer.conv.group) if layer.op == "ConvTranspose" else layer.weight


def spectrum_of(values: Sequence[np.ndarray], shape: tuple[int, int]) -> ModeSpectrum:
    """A `ModeSpectrum` of per-group singular values of an `L x M` unfolding, keeping at most
    min(L, M) of each (a data-whitened spectrum can be longer; beyond them it is zero)."""
    limit = min(shape)
    return ModeSpectrum(tuple(np.asarray(v)[:limit] for v in values), shape)
