"""Rank policies: how many components each layer keeps.

A policy maps a layer's full ranks (one per factorized mode, per group; see `methods.full_ranks`)
to the ranks to keep. Fixed policies here; budgets that allocate ranks across layers build on them.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["FixedRank", "RankPolicy", "RankRatio"]


@dataclasses.dataclass(frozen=True)
class FixedRank:
    """Keep `rank` components in every mode, capped at the mode's full rank."""

    rank: int

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")

    def ranks(self, full: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(min(self.rank, f) for f in full)

    def describe(self) -> dict:
        return {"rank": self.rank}


@dataclasses.dataclass(frozen=True)
class RankRatio:
    """Keep `ceil(ratio · full)` components in every mode (at least 1)."""

    ratio: float

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise ValueError(f"rank ratio must be in (0, 1], got {self.ratio}")

    def ranks(self, full: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(max(1, min(f, math.ceil(self.ratio * f - 1e-9))) for f in full)

    def describe(self) -> dict:
        return {"rank_ratio": self.ratio}


RankPolicy = FixedRank | RankRatio
