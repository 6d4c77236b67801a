"""Versatile filters fitted to a trained kernel (spatial and channel versatile filters).

Wang et al. 2018, "Learning Versatile Filters for Efficient Convolutional Neural Networks"
(NeurIPS). The paper *trains* networks whose filters are built from a few primary filters;
here the structure is fitted *after* training, by least squares on the kernel alone, so expect
a large error on trained weights (the paper's accuracy needs training with the structure).

Spatial versatile filters. A primary ``d x d`` filter ``f`` (all ``S/g`` input channels)
serves ``s = ceil(d/2)`` secondary filters ``M_i ∘ f``, ``i = 1..s``, where ``M_i`` is the
centred ``(d - 2i + 2)``-square mask (``M_1`` all ones; for even d the innermost mask is
``2 x 2``). Each conv group's ``T/g`` filters share ``P = ceil((T/g) / s)`` primaries; each
primary has ``s`` slots ``(p, i)`` (secondary ``M_i ∘ f_p``) and each output channel takes
exactly one slot, so when s does not divide ``T/g``, ``P·s - T/g < s`` slots stay empty (the fit
chooses which; a level's conv computes only the primaries with a member at that level).

Fit (a k-means-like alternation, each step optimal given the other, so the error never
increases):

1. levels: the Hungarian assignment of filters to levels minimising the energy each filter
   has outside its mask (``Σ_t ||(1 - M_level(t)) ∘ w_t||²``), with the level counts of
   ``T/g // s`` full sets and one partial set at the widest levels ``1..r``,
   ``r = (T/g) mod s``;
2. primaries start as the level-1 members themselves;
3. repeat until the assignment stops changing (at most ``n_iter`` times):
   (a) assign filters to slots ``(p, i)`` one-to-one (Hungarian, ``T/g x P·s``) minimising
   ``Σ_t ||w_t - M_i ∘ f_p||²``; (b) refit each primary by least squares, position by
   position: ``f_p[x] = mean of the members of p whose mask covers x`` (a position no member
   covers keeps its value: it is never used).

Exactness: for a kernel built from primaries with full sets and at most one partial set at
levels ``1..r`` per group (any channel order), step 1 recovers the true levels (the only
zero-cost assignment with those counts, as a level-i secondary has energy on ring i), step 2
the true primaries, and step 3a an assignment of zero cost, so the fit is exact.

Channel versatile filters. A primary with ``ĉ < S`` channels slides over the input channels
with stride ``g_c``: ``n = (S - ĉ)/g_c + 1`` outputs per primary, output ``(p, o)`` the filter
that is ``f_p`` on channels ``o·g_c .. o·g_c + ĉ - 1`` and zero elsewhere. With P primaries
there are ``P·n`` candidate outputs; each original filter t takes one of them, no two the
same (``P = ceil(T/n)`` by default, so at most ``n - 1`` are unused). Fit: initial primaries
by farthest-point selection among each filter's highest-energy channel window, then the same
alternation: Hungarian assignment of filters to outputs ``(p, o)`` minimising
``||w_t - shift_o(f_p)||²``, and ``f_p`` = the mean of its filters' windows (least squares;
a primary with no filter keeps its value). Exact for a kernel built from at most P generic
primaries (nonzero channels), each filter at its own output: a filter's highest-energy window
is exactly its primary, and farthest-point selection picks every distinct one.

Both fits are deterministic (no random numbers). ``scipy.optimize.linear_sum_assignment``
(scipy comes with tensorly) solves the assignments.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.optimize import linear_sum_assignment

from .base import Factors, build, check_groups, check_int, check_kernel, fmt_shape

__all__ = [
    "ChannelVersatileFactors",
    "SpatialVersatileFactors",
    "channel_versatile",
    "spatial_versatile",
    "versatile_levels",
]

logger = logging.getLogger(__name__)

# Alternation steps at most (each is one assignment and one refit; the fit usually settles in < 10).
N_ITER = 50


def versatile_levels(size: int) -> int:
    """``s = ceil(d/2)``: the number of nested centred masks of a ``d x d`` filter."""
    return (size + 1) // 2


def _masks(size: int) -> np.ndarray:
    """``M [s, d, d]`` boolean: ``M[i-1]`` is the centred ``(d - 2i + 2)``-square."""
    levels = versatile_levels(size)
    masks = np.zeros((levels, size, size), dtype=bool)
    for i in range(levels):
        masks[i, i : size - i, i : size - i] = True
    return masks


# ------------------------------------------------------------------------------------------
# Spatial versatile filters


@dataclass(frozen=True, eq=False)
class SpatialVersatileFactors(Factors):
    """Spatial versatile primaries of a 2-D kernel ``W [T, S/g, d, d]``.

    Attributes:
        method: ``"versatile"``.
        shape: the kernel's shape ``(T, S/g, d, d)``.
        ranks: ``(P/g,)``, primaries per group.
        stages: ``(primaries,)`` with ``primaries [P, S/g, d, d]`` (float64, group-major: the
            primaries of conv group j are ``j·P/g .. (j+1)·P/g - 1``).
        groups_per_stage: ``(g,)``.
        rel_error: ``||W - W_hat||_F / ||W||_F``.
        groups: the conv's ``group`` attribute g.
        assignment: per original output channel t, ``(p, i)``: output t is ``M_i ∘ f_p``
            (p a global primary index, i the level, 1-based).
        n_iter: alternation steps run (the largest over the groups).
    """

    groups: int
    assignment: tuple[tuple[int, int], ...]
    n_iter: int

    @property
    def primaries(self) -> np.ndarray:
        """``[P, S/g, d, d]`` float64 (read-only)."""
        return self.stages[0]

    @property
    def size(self) -> int:
        """The kernel size d."""
        return self.shape[2]

    @property
    def n_levels(self) -> int:
        """``s = ceil(d/2)``."""
        return versatile_levels(self.size)

    def level_size(self, level: int) -> int:
        """The kernel size ``d - 2i + 2`` of level i (1-based)."""
        return self.size - 2 * (level - 1)

    def level_table(self, level: int) -> np.ndarray:
        """``[g, n_i]`` int64: per conv group, the primaries computed at ``level`` (1-based).

        Row j lists, ascending, group j's primaries with a member at that level, padded (when
        groups differ in count) by repeating the row's last entry (or the group's first primary)
        so that each level stays one regular grouped conv; padded outputs are computed, never used.
        """
        per = self.primaries.shape[0] // self.groups
        rows = [sorted({p for p, i in self.assignment if i == level and p // per == j})
                for j in range(self.groups)]
        width = max(len(row) for row in rows)
        table = [row + [row[-1] if row else j * per] * (width - len(row)) for j, row in enumerate(rows)]
        return np.array(table, dtype=np.int64).reshape(self.groups, width)

    def level_kernel(self, level: int) -> np.ndarray:
        """The level's conv weight ``[g·n_i, S/g, k_i, k_i]``: its primaries cropped to the
        centred ``k_i = d - 2i + 2`` square (float64, group-major)."""
        a = level - 1
        return self.primaries[self.level_table(level).ravel(), :, a : self.size - a, a : self.size - a]

    def output_channels(self) -> np.ndarray:
        """``[T]`` int64: for each original output channel t, its channel in the concatenation
        of the level convs' outputs (levels ascending, levels with no primary left out)."""
        start, where = 0, {}
        for level in range(1, self.n_levels + 1):
            table = self.level_table(level)
            for position, p in enumerate(table.ravel()):
                where.setdefault((int(p), level), start + position)
            start += table.size
        return np.array([where[pair] for pair in self.assignment], dtype=np.int64)

    def to_tensor(self) -> np.ndarray:
        """``W_hat [T, S/g, d, d]``: output t is ``M_i ∘ f_p`` for its ``(p, i)`` (float64)."""
        masks = _masks(self.size)
        primary = np.array([p for p, _ in self.assignment], dtype=np.int64)
        level = np.array([i for _, i in self.assignment], dtype=np.int64)
        return self.primaries[primary] * masks[level - 1][:, None]

    @property
    def macs_ratio(self) -> float:
        """MACs of the level convs over the original conv's: ``Σ_i n_i (d-2i+2)² / (T d²)``."""
        total = sum(self.level_table(i).size * self.level_size(i) ** 2 for i in range(1, self.n_levels + 1))
        return total / (self.shape[0] * self.size**2)


def _check_spatial(kernel: object) -> np.ndarray:
    method = "versatile"
    if isinstance(kernel, np.ndarray) and kernel.ndim != 4:
        raise ValueError(
            f"{method}: spatial versatile filters need a 2-D conv kernel [T, S/g, d, d], "
            f"found shape {fmt_shape(kernel.shape)} ({kernel.ndim - 2} spatial dims)")
    weight = check_kernel(method, kernel, spatial_dims=(2,))
    kh, kw = weight.shape[2:]
    if kh != kw:
        raise ValueError(
            f"{method}: spatial versatile filters need a square kernel d x d, "
            f"found {kh} x {kw} (shape {fmt_shape(weight.shape)})")
    if kh < 2:
        raise ValueError(
            f"{method}: spatial versatile filters need a kernel of size d >= 2 (a 1 x 1 filter has "
            f"no nested masks), found {kh} x {kw} (shape {fmt_shape(weight.shape)})")
    return weight


def spatial_versatile(kernel: np.ndarray, groups: int = 1, n_iter: int = N_ITER) -> SpatialVersatileFactors:
    """Fit spatial versatile primaries to a trained 2-D kernel (see the module docstring).

    Parameters
    ----------
    kernel : ndarray ``[T, S/g, d, d]``, square, ``d >= 2`` (odd or even).
    groups : the conv's ``group`` attribute g (the fit runs per group; primaries never mix groups).
    n_iter : the most alternation steps per group.

    Returns
    -------
    SpatialVersatileFactors with ``P = g·ceil((T/g)/s)`` primaries, ``s = ceil(d/2)``
    (``d = 2``: ``s = 1``, every filter is its own primary and the fit is exact).

    References
    ----------
    Wang, Xu, Xu, Tao, "Learning Versatile Filters for Efficient Convolutional Neural
    Networks", NeurIPS 2018, section 3.1.
    """
    weight = _check_spatial(kernel)
    groups = check_groups("versatile", groups, weight.shape)
    n_iter = check_int("versatile", "n_iter", n_iter)
    per = weight.shape[0] // groups
    primaries, assignment, steps = [], [], 0
    offset = 0
    for j in range(groups):
        f, prim, level, used = _fit_spatial_group(weight[j * per : (j + 1) * per], n_iter)
        primaries.append(f)
        assignment.extend((offset + int(p), int(i)) for p, i in zip(prim, level, strict=True))
        offset += f.shape[0]
        steps = max(steps, used)
    return build(SpatialVersatileFactors, weight, method="versatile", shape=tuple(weight.shape),
                 ranks=(primaries[0].shape[0],), stages=(np.concatenate(primaries, axis=0),),
                 groups_per_stage=(groups,), groups=groups, assignment=tuple(assignment), n_iter=steps)


def _spatial_slots(count: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Initial slots -> (primary, level 1-based): full sets, then a partial set at levels 1..r."""
    full, rest = divmod(count, levels)
    prim = [p for p in range(full) for _ in range(levels)] + [full] * rest
    level = [i for _ in range(full) for i in range(1, levels + 1)] + list(range(1, rest + 1))
    return np.array(prim, dtype=np.int64), np.array(level, dtype=np.int64)


def _fit_spatial_group(w: np.ndarray, n_iter: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One group ``w [T, C, d, d]`` -> (primaries [P, C, d, d], primary [T], level [T], steps)."""
    count, channels, size, _ = w.shape
    masks = _masks(size)
    levels = masks.shape[0]
    n_prim = -(-count // levels)
    flat = w.reshape(count, channels, size * size)
    mask_flat = masks.reshape(levels, size * size)
    total = (flat**2).sum(axis=(1, 2))
    # 1. levels: least energy outside the masks, with the level counts of full sets + a partial set
    init_prim, init_level = _spatial_slots(count, levels)
    inside = np.einsum("tcx,ix->ti", flat**2, mask_flat.astype(np.float64))
    rows, cols = linear_sum_assignment((total[:, None] - inside)[:, init_level - 1])
    # 2. primaries start as the level-1 members
    slot_of = np.empty(count, dtype=np.int64)
    slot_of[rows] = init_prim[cols] * levels + init_level[cols] - 1
    first = init_level[cols] == 1
    primaries = np.zeros((n_prim, channels, size * size))
    primaries[init_prim[cols[first]]] = flat[rows[first]]
    # 3. alternate: filters -> slots (p, i) one-to-one, column p·s + i - 1; primaries by least squares
    steps = 0
    for steps in range(1, n_iter + 1):
        # cost[t, (p, i)] = ||w_t - M_i f_p||^2 = ||w_t||^2 - 2 <M_i w_t, f_p> + ||M_i f_p||^2
        cost = np.empty((count, n_prim, levels))
        for i in range(levels):
            m = mask_flat[i]
            inner = np.einsum("tcx,pcx->tp", flat[:, :, m], primaries[:, :, m])
            cost[:, :, i] = total[:, None] - 2 * inner + (primaries[:, :, m] ** 2).sum(axis=(1, 2))
        rows, cols = linear_sum_assignment(cost.reshape(count, n_prim * levels))
        new_slot = np.empty(count, dtype=np.int64)
        new_slot[rows] = cols
        changed = steps == 1 or not np.array_equal(new_slot, slot_of)
        slot_of = new_slot
        primaries = _spatial_means(flat, slot_of // levels, slot_of % levels + 1, mask_flat, primaries)
        if not changed:
            break
    prim, level = slot_of // levels, slot_of % levels + 1
    return primaries.reshape(n_prim, channels, size, size), prim, level, steps


def _spatial_means(flat: np.ndarray, prim: np.ndarray, level: np.ndarray, mask_flat: np.ndarray,
                   previous: np.ndarray) -> np.ndarray:
    """Least-squares primaries: at each position the mean of the members whose mask covers it.

    A position no member covers does not enter the fit; it keeps its previous value (its value
    is never used, and keeping it lets the next assignment step still see it).
    """
    cover = mask_flat[level - 1].astype(np.float64)  # [T, d*d]
    sums = np.zeros_like(previous)
    counts = np.zeros((previous.shape[0], flat.shape[2]))
    np.add.at(sums, prim, flat * cover[:, None, :])
    np.add.at(counts, prim, cover)
    return np.where(counts[:, None, :] > 0, sums / np.maximum(counts, 1)[:, None, :], previous)


# ------------------------------------------------------------------------------------------
# Channel versatile filters


@dataclass(frozen=True, eq=False)
class ChannelVersatileFactors(Factors):
    """Channel versatile primaries of a 2-D kernel ``W [T, S, kh, kw]`` (groups = 1).

    Attributes:
        method: ``"versatile-channel"``.
        shape: the kernel's shape ``(T, S, kh, kw)``.
        ranks: ``(P,)``.
        stages: ``(primaries,)`` with ``primaries [P, 1, ĉ, kh, kw]`` (float64), the weight of
            the 3-D Conv over the input viewed as ``[B, 1, S, H, W]``.
        groups_per_stage: ``(1,)``.
        rel_error: ``||W - W_hat||_F / ||W||_F``.
        stride: the channel stride ``g_c``.
        selection: per original output channel t, its index ``p·n + o`` among the 3-D Conv's
            ``P·n`` outputs flattened as ``[B, P·n, H', W']`` (all distinct).
        n_iter: alternation steps run.
    """

    stride: int
    selection: tuple[int, ...]
    n_iter: int

    @property
    def primaries(self) -> np.ndarray:
        """``[P, 1, ĉ, kh, kw]`` float64 (read-only)."""
        return self.stages[0]

    @property
    def c_hat(self) -> int:
        """The primaries' channel count ĉ."""
        return self.primaries.shape[2]

    @property
    def n_outputs(self) -> int:
        """``n = (S - ĉ)/g_c + 1``: outputs per primary."""
        return (self.shape[1] - self.c_hat) // self.stride + 1

    @cached_property
    def offsets(self) -> np.ndarray:
        """Per output channel t, ``(p, o)`` as an int64 array ``[T, 2]``."""
        index = np.array(self.selection, dtype=np.int64)
        out = np.stack([index // self.n_outputs, index % self.n_outputs], axis=1)
        out.flags.writeable = False
        return out

    def to_tensor(self) -> np.ndarray:
        """``W_hat [T, S, kh, kw]``: ``f_p`` on channels ``o·g_c .. o·g_c + ĉ - 1`` (float64)."""
        out = np.zeros(self.shape)
        for t, (p, o) in enumerate(self.offsets):
            out[t, o * self.stride : o * self.stride + self.c_hat] = self.primaries[p, 0]
        return out

    @property
    def macs_ratio(self) -> float:
        """MACs of the 3-D Conv over the original conv's: ``P·n·ĉ / (T·S)``."""
        return self.primaries.shape[0] * self.n_outputs * self.c_hat / (self.shape[0] * self.shape[1])


def channel_versatile(kernel: np.ndarray, c_hat: int, stride: int, n_primaries: int | None = None,
                      groups: int = 1, n_iter: int = N_ITER) -> ChannelVersatileFactors:
    """Fit channel versatile primaries to a trained 2-D kernel (see the module docstring).

    Parameters
    ----------
    kernel : ndarray ``[T, S, kh, kw]`` (any kernel size, groups = 1).
    c_hat : the primaries' channel count ĉ, ``1 <= ĉ < S``.
    stride : the channel stride ``g_c >= 1``; ``g_c`` must divide ``S - ĉ``.
    n_primaries : P, at least ``ceil(T/n)`` (the default) so that every filter gets its own output.
    groups : must be 1 (a grouped conv's channel windows would cross groups).
    n_iter : the most alternation steps.

    Returns
    -------
    ChannelVersatileFactors with primaries ``[P, 1, ĉ, kh, kw]`` and the selection of T of the
    ``P·n`` outputs.

    References
    ----------
    Wang, Xu, Xu, Tao, "Learning Versatile Filters for Efficient Convolutional Neural
    Networks", NeurIPS 2018, section 3.2.
    """
    method = "versatile-channel"
    if isinstance(kernel, np.ndarray) and kernel.ndim != 4:
        raise ValueError(
            f"{method}: channel versatile filters need a 2-D conv kernel [T, S, kh, kw], "
            f"found shape {fmt_shape(kernel.shape)} ({kernel.ndim - 2} spatial dims)")
    weight = check_kernel(method, kernel, spatial_dims=(2,))
    groups = check_groups(method, groups, weight.shape)
    if groups != 1:
        raise ValueError(
            f"{method}: channel versatile filters need an ungrouped conv (a primary's channel "
            f"windows would cross groups), found groups={groups} for a {fmt_shape(weight.shape)} kernel")
    count, channels = weight.shape[:2]
    c_hat = check_int(method, "c_hat", c_hat)
    stride = check_int(method, "stride", stride)
    n_iter = check_int(method, "n_iter", n_iter)
    if c_hat >= channels:
        raise ValueError(f"{method}: c_hat must be smaller than the {channels} input channels of a "
                         f"{fmt_shape(weight.shape)} kernel, found c_hat={c_hat}")
    if (channels - c_hat) % stride:
        raise ValueError(
            f"{method}: the channel stride {stride} must divide S - c_hat = {channels} - {c_hat} = "
            f"{channels - c_hat} so the windows end on the last channel")
    n = (channels - c_hat) // stride + 1
    least = -(-count // n)
    n_primaries = least if n_primaries is None else check_int(method, "n_primaries", n_primaries)
    if n_primaries < least:
        raise ValueError(
            f"{method}: {n_primaries} primaries give {n_primaries} x {n} = {n_primaries * n} outputs, "
            f"fewer than the {count} output channels; need at least {least}")
    primaries, slot_of, steps = _fit_channel(weight, c_hat, stride, n, n_primaries, n_iter)
    return build(ChannelVersatileFactors, weight, method=method, shape=tuple(weight.shape),
                 ranks=(n_primaries,), stages=(primaries,), groups_per_stage=(1,), stride=stride,
                 selection=tuple(int(x) for x in slot_of), n_iter=steps)


def _fit_channel(w: np.ndarray, c_hat: int, stride: int, n: int, n_prim: int, n_iter: int
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (primaries [P, 1, ĉ, kh, kw], slot p·n + o per filter, steps)."""
    count, _, kh, kw = w.shape
    # windows[t, o] = w_t[o·g_c : o·g_c + ĉ] flattened
    windows = np.stack([w[:, o * stride : o * stride + c_hat].reshape(count, -1) for o in range(n)], axis=1)
    total = (w.reshape(count, -1) ** 2).sum(axis=1)
    best = windows[np.arange(count), np.argmax((windows**2).sum(axis=2), axis=1)]
    primaries = best[_farthest_points(best, n_prim)]
    slot_of = np.full(count, -1, dtype=np.int64)
    steps = 0
    for steps in range(1, n_iter + 1):
        inner = np.einsum("tod,pd->tpo", windows, primaries).reshape(count, n_prim * n)
        norms = np.repeat((primaries**2).sum(axis=1), n)
        rows, cols = linear_sum_assignment(total[:, None] - 2 * inner + norms[None, :])
        new_slot = np.empty(count, dtype=np.int64)
        new_slot[rows] = cols
        changed = not np.array_equal(new_slot, slot_of)
        slot_of = new_slot
        prim, offset = slot_of // n, slot_of % n
        sums = np.zeros_like(primaries)
        np.add.at(sums, prim, windows[np.arange(count), offset])
        used = np.bincount(prim, minlength=n_prim)
        primaries = np.where(used[:, None] > 0, sums / np.maximum(used, 1)[:, None], primaries)
        if not changed:
            break
    return primaries.reshape(n_prim, 1, c_hat, kh, kw), slot_of, steps


def _farthest_points(points: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` rows: the largest first, then each the farthest from those chosen.

    Rows that repeat a chosen one (distance 0) are taken only when nothing else is left.
    """
    if count >= points.shape[0]:
        extra = np.arange(count - points.shape[0]) % points.shape[0]
        return np.concatenate([np.arange(points.shape[0]), extra])
    chosen = [int(np.argmax((points**2).sum(axis=1)))]
    distance = ((points - points[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(count - 1):
        nxt = int(np.argmax(distance))
        chosen.append(nxt)
        distance = np.minimum(distance, ((points - points[nxt]) ** 2).sum(axis=1))
    return np.array(chosen, dtype=np.int64)
