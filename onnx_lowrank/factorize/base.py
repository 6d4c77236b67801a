"""Shared pieces of the factorizations: result types, validation, groups and reconstruction.

A conv factorization turns a kernel ``W[T, S/g, k1..kN]`` (ONNX layout: T output channels,
S input channels, g groups, N = 1, 2 or 3 spatial dims) into a chain of ONNX Conv stages.
The result keeps the stage weights in float64 (``stages``, the math) and hands out their
float32 casts (``weights``), which are exactly the initializers of the chain's Conv nodes,
together with each stage's ``group`` attribute (``groups_per_stage``).

Reconstruction is generic: :func:`compose_chain` folds the chain of stride-1, dilation-1
convs back into one kernel, so ``to_tensor()`` checks the stage layout itself, not a
method-specific formula. In every chain here at most one stage has a kernel extent above 1
along each spatial dim, so the composed kernel has the original spatial shape, and strides,
dilations and pads are the rewrite's business (they go on that stage).

Grouped kernels (g > 1) are factored group by group with the same per-group rank
(:func:`per_group`), and the per-group stage weights are concatenated along the output-channel
axis (:func:`stack_groups`): a stage with ``group = g`` (or ``g * R`` for depthwise stages)
then applies group i's factors to group i's channels.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "ConvFactors",
    "Factors",
    "NumericalError",
    "build",
    "canonical_signs",
    "check_groups",
    "check_int",
    "check_kernel",
    "check_matrix",
    "check_rank",
    "compose_chain",
    "fmt_shape",
    "leading_eigh",
    "mode_basis",
    "per_group",
    "relative_error",
    "stack_groups",
]

_T = TypeVar("_T")


class NumericalError(ArithmeticError):
    """A factorization failed for a numerical reason (a matrix that rounding left singular or
    indefinite), not because of its arguments: the layer is skipped with this reason."""


_F = TypeVar("_F", bound="Factors")


@dataclass(frozen=True, eq=False)
class Factors(ABC):
    """A factorization result: the stage weights of a chain and how well they reproduce W.

    Attributes:
        method: the method's name (``"svd"``, ``"spatial-svd"``, ``"tiled-svd"``, ``"tucker2"``,
            ``"tucker1-in"``, ``"tucker1-out"``, ``"cp"``, ``"cp-depthwise"``).
        shape: the shape of the factored kernel or matrix.
        ranks: the rank(s), per group for grouped kernels.
        stages: the stage weights in float64, read-only, same layout as ``weights``.
        groups_per_stage: the ONNX ``group`` attribute of each stage (1 for matrices).
        rel_error: ``||W - W_hat||_F / ||W||_F`` against the input, with W_hat from ``stages``.
    """

    method: str
    shape: tuple[int, ...]
    ranks: tuple[int, ...]
    stages: tuple[np.ndarray, ...]
    groups_per_stage: tuple[int, ...]
    rel_error: float

    def __post_init__(self) -> None:
        for stage in self.stages:
            stage.flags.writeable = False

    @cached_property
    def weights(self) -> tuple[np.ndarray, ...]:
        """The stage weights as read-only float32 arrays, in chain order."""
        out = tuple(np.ascontiguousarray(stage, dtype=np.float32) for stage in self.stages)
        for weight in out:
            weight.flags.writeable = False
        return out

    @property
    def n_params(self) -> int:
        """Number of parameters of the chain (the sum of the weights' sizes)."""
        return sum(int(stage.size) for stage in self.stages)

    @abstractmethod
    def to_tensor(self) -> np.ndarray:
        """Reconstruct the factored array (float64, the original shape)."""


@dataclass(frozen=True, eq=False)
class ConvFactors(Factors):
    """A conv kernel factored into a chain of Conv stages.

    Attributes:
        groups: the original kernel's ``group`` attribute.
    """

    groups: int

    def _input_orders(self) -> tuple[np.ndarray | None, ...]:
        """Per stage, the stage-input channel -> previous-stage output channel map, or None."""
        return (None,) * len(self.stages)

    def to_tensor(self) -> np.ndarray:
        """The kernel ``[T, S/g, k..]`` the chain computes (float64), see :func:`compose_chain`."""
        return compose_chain(self.stages, self.groups_per_stage, self.groups, self._input_orders())


def build(cls: type[_F], reference: np.ndarray, **fields: Any) -> _F:
    """Create a result of type ``cls`` and measure its ``rel_error`` against ``reference``."""
    draft = cls(rel_error=math.nan, **fields)
    return replace(draft, rel_error=relative_error(reference, draft.to_tensor()))


def relative_error(reference: np.ndarray, approx: np.ndarray) -> float:
    """``||reference - approx||_F / ||reference||_F`` in float64 (0 when both are zero)."""
    reference = np.asarray(reference, dtype=np.float64)
    diff = float(np.linalg.norm((reference - approx).ravel()))
    norm = float(np.linalg.norm(reference.ravel()))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def fmt_shape(shape: Sequence[int]) -> str:
    """A shape as the error messages print it: ``[64, 32, 3, 3]``."""
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def check_int(method: str, name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` as an int, or raise ValueError unless it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{method}: {name} must be an integer, found {value!r}")
    if value < minimum:
        raise ValueError(f"{method}: {name} must be >= {minimum}, found {value}")
    return int(value)


def _check_float_array(method: str, what: str, array: object) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{method}: expected the {what} as a numpy array, found {type(array).__name__}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{method}: expected a floating-point {what}, found dtype {array.dtype}")
    if array.size == 0:
        raise ValueError(f"{method}: expected a non-empty {what}, found shape {fmt_shape(array.shape)}")
    out = array.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{method}: the {what} of shape {fmt_shape(array.shape)} holds NaN or Inf values")
    return out


def check_matrix(method: str, matrix: object) -> np.ndarray:
    """Validate a weight matrix ``[K, N]`` and return it as float64."""
    if isinstance(matrix, np.ndarray) and matrix.ndim != 2:
        raise ValueError(f"{method}: expected a 2-D matrix [K, N], found shape {fmt_shape(matrix.shape)}")
    return _check_float_array(method, "matrix", matrix)


def check_kernel(method: str, kernel: object, spatial_dims: Sequence[int] = (1, 2, 3)) -> np.ndarray:
    """Validate a conv kernel ``[T, S/g, k1..kN]`` with N in ``spatial_dims``; return it as float64."""
    if isinstance(kernel, np.ndarray) and kernel.ndim - 2 not in spatial_dims:
        allowed = " or ".join(str(n) for n in spatial_dims)
        raise ValueError(
            f"{method}: expected a conv kernel [T, S/g, k1..kN] with N = {allowed} spatial dims, "
            f"found shape {fmt_shape(kernel.shape)} ({kernel.ndim - 2} spatial dims)"
        )
    return _check_float_array(method, "kernel", kernel)


def check_groups(method: str, groups: object, shape: Sequence[int]) -> int:
    """Validate the ``group`` attribute against a kernel's output channels; return it."""
    groups = check_int(method, "groups", groups)
    if shape[0] % groups:
        raise ValueError(
            f"{method}: {shape[0]} output channels of a {fmt_shape(shape)} kernel are not divisible by groups={groups}"
        )
    return groups


def check_rank(
    method: str,
    rank: object,
    full: int,
    shape: Sequence[int],
    *,
    name: str = "rank",
    groups: int = 1,
    what: str = "kernel",
    limit: str = "the full rank",
) -> int:
    """Validate a rank against the full rank (or another upper bound) ``full``; return it as an int.

    The message reads ``channel_svd: rank 70 exceeds the full rank 64 of a [64, 32, 3, 3] kernel``.
    """
    rank = check_int(method, name, rank)
    if rank > full:
        per_group = f" with groups={groups} (ranks are per group)" if groups > 1 else ""
        raise ValueError(f"{method}: {name} {rank} exceeds {limit} {full} of a {fmt_shape(shape)} {what}{per_group}")
    return rank


def per_group(
    kernel: np.ndarray, groups: int, factor_one: Callable[..., _T], *per_group_args: Iterable[object]
) -> list[_T]:
    """Apply ``factor_one`` to each group's slice ``W[i*T/g:(i+1)*T/g]`` (shape ``[T/g, S/g, k..]``).

    Group i's call also gets the i-th item of each of ``per_group_args`` (e.g. its moments),
    drawn lazily, one group at a time.
    """
    size = kernel.shape[0] // groups
    blocks = (kernel[i * size : (i + 1) * size] for i in range(groups))
    return [factor_one(*args) for args in zip(blocks, *per_group_args, strict=True)]


def stack_groups(per_group_stages: Sequence[Sequence[np.ndarray]]) -> tuple[np.ndarray, ...]:
    """Concatenate each stage's per-group weights along axis 0 (output channels, group-major)."""
    return tuple(np.concatenate(parts, axis=0) for parts in zip(*per_group_stages, strict=True))


def mode_basis(tensor: np.ndarray, mode: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Leading left singular vectors of the mode-``mode`` unfolding ``X_(mode) [I, J]``.

    Returns all ``min(I, J)`` singular values (descending) and ``count`` orthonormal columns
    spanning the leading left singular subspace, signed as in :func:`leading_eigh`. Uses the
    eigenvectors of the smaller Gram matrix: ``X X^T``, or when ``I > J`` ``X^T X`` then an
    orthonormal basis of ``X V`` (a 2048-channel mode of a 1x1 conv costs a 512x512 eigh),
    completed by an orthonormal complement (zero energy) when ``count > J``.
    """
    unfolded = np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)
    size, others = unfolded.shape
    if size <= others:
        values, basis = leading_eigh(unfolded @ unfolded.T, count)
    else:
        values, right = leading_eigh(unfolded.T @ unfolded, min(count, others))
        basis = np.linalg.qr(unfolded @ right, mode="complete" if count > others else "reduced")[0][:, :count]
        basis = basis * canonical_signs(basis)
    return np.sqrt(values[: min(size, others)]), basis


def leading_eigh(gram: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric PSD Gram matrix, largest first.

    Returns all eigenvalues (descending, clipped at 0) and the ``count`` leading eigenvectors
    as columns, each signed so that its largest-magnitude entry is positive (deterministic).
    """
    values, vectors = np.linalg.eigh(gram)
    values = np.clip(values[::-1], 0.0, None)
    vectors = vectors[:, ::-1][:, :count]
    return values, vectors * canonical_signs(vectors)


def canonical_signs(columns: np.ndarray) -> np.ndarray:
    """Per column, the sign (+-1) that makes its largest-magnitude entry positive."""
    if columns.shape[1] == 0:
        return np.ones(0)
    pivots = columns[np.argmax(np.abs(columns), axis=0), np.arange(columns.shape[1])]
    return np.where(pivots < 0, -1.0, 1.0)


def compose_chain(
    stages: Sequence[np.ndarray],
    groups_per_stage: Sequence[int],
    groups: int = 1,
    input_orders: Sequence[np.ndarray | None] | None = None,
) -> np.ndarray:
    """The kernel of a chain of stride-1, dilation-1 Convs, as ``[T, S/g, k..]`` (float64).

    A Conv is a cross-correlation, so two stages with kernels ``K1 [M, S, a..]`` then
    ``K2 [T, M, b..]`` make one with ``K[t, s, q + v] = sum_m K2[t, m, q] K1[m, s, v]`` (spatial
    size ``a + b - 1``). Stage i has ONNX ``group = groups_per_stage[i]``, a multiple of the
    original ``groups``; the chain is composed for each original group separately.
    ``input_orders[i]``, when not None, is a channel shuffle before stage i: its input channel c
    reads the previous stage's output channel ``input_orders[i][c]`` (only with groups = 1).
    """
    orders = input_orders if input_orders is not None else (None,) * len(stages)
    blocks = []
    for index in range(groups):
        acc = None
        for stage, stage_groups, order in zip(stages, groups_per_stage, orders, strict=True):
            sub = stage.reshape(groups, -1, *stage.shape[1:])[index]
            sub_groups = stage_groups // groups
            if acc is None:
                channels = sub.shape[1] * sub_groups
                acc = np.eye(channels).reshape(channels, channels, *([1] * (stage.ndim - 2)))
            if order is not None:
                acc = acc[order]
            acc = _apply_stage(sub, sub_groups, acc)
        blocks.append(acc)
    return np.concatenate(blocks, axis=0)


def _apply_stage(weight: np.ndarray, groups: int, acc: np.ndarray) -> np.ndarray:
    """Compose a grouped stage ``weight [O, M/groups, b..]`` after a kernel ``acc [M, S, a..]``."""
    out_channels, in_per_group = weight.shape[:2]
    inner = weight.shape[2:]
    channels = acc.shape[1]
    outer = acc.shape[2:]
    size = tuple(a + b - 1 for a, b in zip(outer, inner, strict=True))
    out = np.zeros((groups, out_channels // groups, channels, *size))
    grouped_weight = weight.reshape(groups, out_channels // groups, in_per_group, -1)
    grouped_acc = acc.reshape(groups, in_per_group, -1)
    for position, offset in enumerate(np.ndindex(*inner)):
        window = (slice(None),) * 3 + tuple(slice(o, o + n) for o, n in zip(offset, outer, strict=True))
        product = np.matmul(grouped_weight[..., position], grouped_acc)
        out[window] += product.reshape(groups, out_channels // groups, channels, *outer)
    return out.reshape(out_channels, channels, *size)
