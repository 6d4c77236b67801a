"""The global budget allocator: ranks for every layer under a whole-model target.

The budget (``--target-macs`` / ``--target-params`` / ``--target-latency``) is a multiple-choice
knapsack: each layer offers a few `Option`s (cost, error) besides staying dense, and `allocate`
picks one per layer so that the total cost fits the budget with the least total error (errors
from `ranks.svd_error_curve` / `ranks.tucker_error_curve`, times the layer's output gain).

Everything here is numpy on plain arrays: no graph, no onnx.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Allocation", "LayerOptions", "Option", "allocate"]


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to compress a layer.

    Attributes:
        cost: its cost in the budget's units (MACs or parameters), >= 0.
        error: its normalised error (e.g. relative squared weight error), >= 0, comparable
            across layers: the allocator minimises the sum.
        payload: opaque to the allocator; the caller's method and ranks.
    """

    cost: float
    error: float
    payload: object = None


@dataclasses.dataclass
class LayerOptions:
    """A layer the allocator may compress.

    Attributes:
        name: unique among the layers given to `allocate`.
        dense_cost: the original layer's cost; staying dense (error 0) is always allowed.
        options: the compressed alternatives; those costing at least `dense_cost` are never chosen.
    """

    name: str
    dense_cost: float
    options: list[Option] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Allocation:
    """The allocator's answer.

    Attributes:
        choices: layer name -> the chosen `Option`, or None to keep the layer dense.
        cost: Σ of the chosen costs.
        error: Σ of the chosen errors.
        feasible: whether `cost <= budget`. When False, `choices` is the cheapest reachable
            configuration.
        lowest_cost: the cheapest reachable total (every layer at its cheapest option or dense).
    """

    choices: dict[str, Option | None]
    cost: float
    error: float
    feasible: bool
    lowest_cost: float


class _Points:
    """Every layer's candidates (dense included) in flat arrays, layer-major, cost-ascending."""

    def __init__(self, layers: Sequence[LayerOptions]):
        names = set()
        layer_of, costs, errors, refs = [], [], [], []
        self.start: list[int] = []      # first flat index of each layer
        self.hulls: list[list[int]] = []  # flat indices of each layer's lower hull, cost-ascending
        self.dense: list[int] = []       # flat index of each layer's dense point
        for li, layer in enumerate(layers):
            if layer.name in names:
                raise ValueError(f"layer names must be unique, got {layer.name!r} twice")
            names.add(layer.name)
            dense = float(layer.dense_cost)
            if not math.isfinite(dense) or dense < 0:
                raise ValueError(f"layer {layer.name!r}: dense_cost must be finite and >= 0, "
                                 f"got {layer.dense_cost!r}")
            points = []
            for k, option in enumerate(layer.options):
                cost, error = float(option.cost), float(option.error)
                if not (math.isfinite(cost) and cost >= 0 and math.isfinite(error) and error >= 0):
                    raise ValueError(f"layer {layer.name!r}: option {k} must have finite cost and "
                                     f"error >= 0, got cost {option.cost!r}, "
                                     f"error {option.error!r}")
                if cost < dense:
                    points.append((cost, error, k, option))
            points.append((dense, 0.0, len(layer.options), None))
            points.sort(key=lambda p: (p[0], p[1], p[2]))
            base = len(costs)
            self.start.append(base)
            for cost, error, _, ref in points:
                layer_of.append(li)
                costs.append(cost)
                errors.append(error)
                refs.append(ref)
            self.dense.append(base + len(points) - 1)
            self.hulls.append([base + j for j in _lower_hull([(p[0], p[1]) for p in points])])
        self.layer_of = np.asarray(layer_of, dtype=np.int64)
        self.cost = np.asarray(costs, dtype=np.float64)
        self.error = np.asarray(errors, dtype=np.float64)
        self.refs = refs

    def total(self, state: Sequence[int]) -> tuple[float, float]:
        return (math.fsum(self.cost[i] for i in state), math.fsum(self.error[i] for i in state))


def _lower_hull(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the lower convex hull of (cost, error) points sorted by cost (Andrew's chain).

    The last point (dense: the highest cost, error 0) always ends the hull, so errors along the
    hull do not increase with cost and the slopes rise: moving to cheaper vertices costs more
    error per unit saved at every step.
    """
    hull: list[int] = []
    for j, (c, e) in enumerate(points):
        while len(hull) >= 2:
            (c1, e1), (c2, e2) = points[hull[-2]], points[hull[-1]]
            if (c2 - c1) * (e - e1) - (e2 - e1) * (c - c1) <= 0:
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def _spend_slack(pts: _Points, state: list[int], budget: float, by_ratio: bool) -> list[int]:
    """Upgrade layers while the slack allows, best error decrease (per cost, or absolute) first."""
    state = list(state)
    cur = np.asarray(state)
    total = pts.total(state)[0]
    for _ in range(pts.cost.size):
        slack = budget - total
        extra = pts.cost - pts.cost[cur][pts.layer_of]
        gain = pts.error[cur][pts.layer_of] - pts.error
        fits = (gain > 0) & (extra <= slack)
        if not fits.any():
            break
        if by_ratio:
            score = np.where(extra > 0, gain / np.where(extra > 0, extra, 1.0), np.inf)
        else:
            score = gain
        score = np.where(fits, score, -np.inf)
        best = int(np.argmax(score))  # first maximum: layer order, then cost
        layer = int(pts.layer_of[best])
        state[layer] = best
        cur[layer] = best
        total = pts.total(state)[0]
    return state


def allocate(layers: Sequence[LayerOptions], budget: float) -> Allocation:
    """Choose one option (or dense) per layer: ``min Σ error  s.t.  Σ cost <= budget``.

    A multiple-choice knapsack, solved by the classic greedy on convex hulls (Shoham & Gersho,
    "Efficient bit allocation for an arbitrary set of quantizers", IEEE TASSP 1988):

    1. Per layer, keep the lower convex hull of its (cost, error) points, dense
       ``(dense_cost, 0)`` included; options costing ``>= dense_cost`` are dropped.
    2. Start all dense; while ``Σ cost > budget``, move the layer whose next cheaper hull vertex
       has the smallest slope ``Δerror / Δcost saved`` (ties: layer order). The hulls are convex,
       so this traces the lower convex hull of the total trade-off: every configuration it
       passes minimises ``Σ error + λ Σ cost`` for some λ, hence is exactly optimal for a
       budget equal to its cost. Between those, it errs by at most the last move's error.
    3. Refine: (a) spend the remaining slack on upgrades that fit (any option of any layer), best
       error decrease per cost first, and alternatively largest decrease first; (b) undo the
       move that overshot and cover its deficit with the single switch (any option of any layer)
       of least error, then spend its slack the same ways. The least-error result is kept.

    Everything is deterministic: ties go to the earlier layer, then the cheaper option.
    300 layers x 64 options take a few tens of milliseconds.

    Args:
        layers: the allocatable layers with their options; names unique.
        budget: what their costs may add up to (same units as the costs).

    Returns:
        The `Allocation`. If even the cheapest option of every layer exceeds the budget,
        ``feasible`` is False and the choices are that cheapest configuration, whose cost is
        ``lowest_cost``.
    """
    budget = float(budget)
    if math.isnan(budget):
        raise ValueError("budget must be a number, got nan")
    pts = _Points(layers)
    n = len(pts.hulls)
    lowest = math.fsum(pts.cost[h[0]] for h in pts.hulls)
    pos = [len(h) - 1 for h in pts.hulls]
    state = [h[-1] for h in pts.hulls]

    def slope(i: int) -> float:
        h, p = pts.hulls[i], pos[i]
        return (pts.error[h[p - 1]] - pts.error[h[p]]) / (pts.cost[h[p]] - pts.cost[h[p - 1]])

    heap = [(slope(i), i) for i in range(n) if pos[i] > 0]
    heapq.heapify(heap)
    total = pts.total(state)[0]
    previous = None  # the state before the last move
    while total > budget and heap:
        while total > budget and heap:
            _, i = heapq.heappop(heap)
            previous = list(state)
            h = pts.hulls[i]
            total -= pts.cost[h[pos[i]]] - pts.cost[h[pos[i] - 1]]
            pos[i] -= 1
            state[i] = h[pos[i]]
            if pos[i] > 0:
                heapq.heappush(heap, (slope(i), i))
        total = pts.total(state)[0]  # exact sum, in case the running total drifted

    if total > budget:
        cost, error = pts.total(state)
        return Allocation(_choices(layers, pts, state), cost, error, False, lowest)

    candidates = [state]
    if previous is not None:
        candidates.append(_cover_deficit(pts, previous, budget))
    best, best_error = state, pts.total(state)[1]
    for candidate in candidates:
        if candidate is None:
            continue
        for by_ratio in (True, False):
            refined = _spend_slack(pts, candidate, budget, by_ratio)
            cost, error = pts.total(refined)
            if cost <= budget and error < best_error:
                best, best_error = refined, error
    cost, error = pts.total(best)
    return Allocation(_choices(layers, pts, best), cost, error, True, lowest)


def _cover_deficit(pts: _Points, state: list[int], budget: float) -> list[int] | None:
    """From an over-budget `state`, the single switch that fits the budget with least error."""
    cur = np.asarray(state)
    total = pts.total(state)[0]
    saving = pts.cost[cur][pts.layer_of] - pts.cost
    fits = saving >= total - budget
    if not fits.any():
        return None
    increase = np.where(fits, pts.error - pts.error[cur][pts.layer_of], np.inf)
    best = int(np.argmin(increase))  # first minimum: layer order, then cost
    out = list(state)
    out[int(pts.layer_of[best])] = best
    return out


def _choices(layers: Sequence[LayerOptions], pts: _Points, state: list[int]
             ) -> dict[str, Option | None]:
    return {layer.name: pts.refs[i] for layer, i in zip(layers, state)}
