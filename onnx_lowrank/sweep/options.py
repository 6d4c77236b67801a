"""What a sweep is asked to do: its models, its points (targets x methods) and what to keep."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import onnx

from onnx_lowrank.config import POLICY_KEYS, Settings
from onnx_lowrank.errors import InputError
from onnx_lowrank.methods import auto_candidates, available

__all__ = ["DEFAULT_METHODS", "DEFAULT_TARGETS", "KEEP", "LATENCY_ON", "SweepModel", "SweepOptions", "parse_list",
           "point_settings"]

DEFAULT_TARGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
DEFAULT_METHODS = ("auto",)
#: Which compressed models a sweep writes: the one `--min-metric` picks, the Pareto points, or all.
KEEP = ("best", "pareto", "all")
#: Where the one timing run happens: in the sweep's own process, or as a task on the cluster.
LATENCY_ON = ("driver", "worker")


@dataclasses.dataclass(frozen=True)
class SweepModel:
    """One model of a sweep: the model (a path or a loaded `ModelProto`), the settings every one
    of its points starts from (inputs, metric, provider, ...) and its name in files and tables
    (default: the file's stem)."""

    model: str | os.PathLike | onnx.ModelProto
    settings: Settings = dataclasses.field(default_factory=Settings)
    name: str | None = None

    @property
    def label(self) -> str:
        """The model's name: `name`, else the file's stem, else "model"."""
        if self.name:
            return self.name
        return "model" if isinstance(self.model, onnx.ModelProto) else pathlib.Path(self.model).stem

    @property
    def source(self) -> str:
        """Where the model came from, for the report."""
        return "<in memory>" if isinstance(self.model, onnx.ModelProto) else str(self.model)


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """The points of a sweep and what to do with them.

    Attributes:
        targets: fractions of the whole model's MACs to keep, each in (0, 1].
        methods: `--method` names (or "auto"), each swept over every target.
        keep: which compressed models to write (`KEEP`).
        min_metric: pick the fastest point whose metric is at least this (needs a `--metric`).
        latency_on: where the timing run happens (`LATENCY_ON`; "worker" needs a cluster).
    """

    targets: tuple[float, ...] = DEFAULT_TARGETS
    methods: tuple[str, ...] = DEFAULT_METHODS
    keep: str = "pareto"
    min_metric: float | None = None
    latency_on: str = "driver"

    def __post_init__(self):
        if not self.targets or any(not 0 < t <= 1 for t in self.targets):
            raise InputError(f"--targets must be fractions in (0, 1], got {','.join(f'{t:g}' for t in self.targets) or 'none'}")
        if len(set(self.targets)) < len(self.targets) or len(set(self.methods)) < len(self.methods):
            raise InputError("--targets and --methods must not repeat a value")
        known = available()
        unknown = [m for m in self.methods if m != "auto" and m not in known]
        if not self.methods or unknown:
            raise InputError(f"--methods: unknown method {', '.join(unknown) or '(none given)'}; expected auto or "
                             f"one of {', '.join(known)}")
        if self.keep not in KEEP:
            raise InputError(f"--keep must be one of {', '.join(KEEP)}, got '{self.keep}'")
        if self.keep == "best" and self.min_metric is None:
            raise InputError("--keep best keeps the point --min-metric picks: add --min-metric X")
        if self.latency_on not in LATENCY_ON:
            raise InputError(f"--latency-on must be one of {', '.join(LATENCY_ON)}, got '{self.latency_on}'")

    @property
    def measured_methods(self) -> tuple[str, ...]:
        """Every method whose data spectra some point reads ("auto" stands for its candidates)."""
        names = [name for method in self.methods for name in (auto_candidates() if method == "auto" else (method,))]
        return tuple(dict.fromkeys(names))


def parse_list(text: str, what: str, convert=str) -> tuple:
    """Comma-separated values (`--targets 0.9,0.7`, `--methods auto,svd`), each converted."""
    try:
        return tuple(convert(item.strip()) for item in text.split(",") if item.strip())
    except ValueError:
        raise InputError(f"{what}: expected comma-separated values, got '{text}'") from None


def point_settings(base: Settings, target: float, method: str) -> Settings:
    """The settings of one point: `base` with the method and `--target-macs` of the point, and
    no end-to-end latency or report of its own (the sweep times every point in one run and
    writes one report). `base` may not hold a rank policy or budget of its own: the targets are
    the policy."""
    given = [key for key in POLICY_KEYS if key != "rank_ratio" and getattr(base, key) not in (None, False)]
    if given:
        raise InputError(f"sweep: the targets set the ranks; drop {', '.join(given)} from the settings")
    if not base.validate:
        raise InputError("sweep: every point is validated to place it on the frontier; drop validate = false")
    return dataclasses.replace(base, method=method, target_macs=target, rank_ratio=None, latency=False,
                               require_speedup=False, report=None)
