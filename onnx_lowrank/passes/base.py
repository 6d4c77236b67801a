"""Passes and pipelines: the compression as small steps over one shared `Workspace`.

A pass holds its settings from `__init__` and does its work in `run(workspace, progress)`,
returning a `PassResult` that says whether it changed anything and what. It declares what it
needs from earlier passes (`requires`) and what it makes available (`provides`), by artifact
name (`ARTIFACTS`), in the spirit of onnx-ir's `requires`/`ensures`. A `Pipeline` is an ordered,
immutable list of passes: it checks those declarations before anything runs, prints itself
(`describe`), and makes new pipelines with a pass inserted before or after a named one, so a user
can add a step (a custom fold, a statistic) to the default compression.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import onnx

from onnx_lowrank.config import Settings
from onnx_lowrank.errors import InputError
from onnx_lowrank.fold import FoldCounts
from onnx_lowrank.graph import Layer

__all__ = ["ARTIFACTS", "LayerDecision", "LayerResult", "Pass", "PassResult", "PassTiming", "Pipeline", "Tracker", "Workspace",
           "plain_tracker"]

log = logging.getLogger(__name__)

#: What passes hand each other through the workspace, by name.
ARTIFACTS = {
    "model": "the current model (`Workspace.model`); the input model at the start",
    "settings": "the run's Settings (`Workspace.settings`)",
    "canonical": "the canonical model: weights as initializers, explicit pads, named nodes",
    "calibration": "calibration feeds the data-aware fit reads (`Workspace.calibration`)",
    "checks": "feeds the guard and the validation run (`Workspace.guard_feeds`, `Workspace.eval_feeds`)",
    "layers": "the layers with their costs and a decision each (`Workspace.layers`, `.decisions`)",
    "spectra": "each candidate's error spectra in output units (`Workspace.spectra`)",
    "gains": "each candidate's output gain (`LayerDecision.output_gain`)",
    "ranks": "ranks (and methods) allocated by a budget (`LayerDecision.ranks`)",
    "chains": "the factorized layers' chains (`LayerDecision.chain`, status rewritten)",
    "rewritten": "the model with the chains in place (`Workspace.model`)",
    "totals": "MACs and parameters of the rewritten model (`Workspace.totals_after`)",
    "validation": "the comparison with the original (`Workspace.validation`)",
}

Tracker = Callable[[Iterable, int, str], Iterator]


def plain_tracker(items: Iterable, total: int, description: str) -> Iterator:
    """The default progress display: none."""
    return iter(items)


@dataclasses.dataclass
class PassResult:
    """What a pass did: `modified` says whether the model or the decisions changed."""

    modified: bool
    summary: str = ""


@dataclasses.dataclass(frozen=True)
class PassTiming:
    """One pass as it ran: its name, wall time in seconds and result."""

    name: str
    seconds: float
    result: PassResult


@dataclasses.dataclass(frozen=True)
class LayerResult:
    """What happened to one layer (the report contract's per-layer object, `to_dict()`)."""

    name: str
    op: str
    method: str | None
    ranks: tuple[int, ...] | None
    status: str
    reason: str | None
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    weight_rel_error: float | None = None
    output_rel_error: float | None = None
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    output_gain: float | None = None

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["ranks"] = list(self.ranks) if self.ranks else None
        return values


@dataclasses.dataclass
class LayerDecision:
    """What happened to one layer; `to_dict()` is the report contract's per-layer object."""

    layer: Layer
    status: str = "skipped"
    reason: str | None = None
    method: str | None = None
    ranks: tuple[int, ...] | None = None
    chain: object | None = None
    macs_after: int | None = None
    params_after: int | None = None
    weight_rel_error: float | None = None
    output_rel_error: float | None = None
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    output_gain: float | None = None

    def result(self) -> LayerResult:
        """The frozen outcome: a layer left as it was keeps its own MACs and parameters."""
        layer = self.layer
        rewritten = self.status == "rewritten"
        return LayerResult(layer.name, layer.op, self.method, self.ranks or None, self.status, self.reason,
                           layer.macs or 0, self.macs_after if rewritten else (layer.macs or 0), layer.params,
                           self.params_after if rewritten else layer.params, self.weight_rel_error,
                           self.output_rel_error, self.latency_ms_before, self.latency_ms_after, self.output_gain)

    def roll_back(self, reason: str) -> None:
        """Give the layer back its original node, saying why."""
        self.status = "rolled_back"
        self.reason = reason


@dataclasses.dataclass
class Workspace:
    """The state the passes share: the original and current model, the feeds and the decisions."""

    original: onnx.ModelProto
    model: onnx.ModelProto
    settings: Settings
    canonical: onnx.ModelProto | None = None
    calibration: list[dict] | None = None
    guard_feeds: list[dict] | None = None
    eval_feeds: list[dict] | None = None
    shapes: dict = dataclasses.field(default_factory=dict)
    layers: list[Layer] = dataclasses.field(default_factory=list)
    decisions: dict[str, LayerDecision] = dataclasses.field(default_factory=dict)
    totals_before: dict[str, int] = dataclasses.field(default_factory=dict)
    totals_after: dict[str, int] = dataclasses.field(default_factory=dict)
    spectra: dict[str, dict] = dataclasses.field(default_factory=dict)
    curves: dict[str, tuple] = dataclasses.field(default_factory=dict)
    folds: FoldCounts = dataclasses.field(default_factory=FoldCounts)
    validation: object | None = None
    counting: str | None = None
    views: dict = dataclasses.field(default_factory=dict)
    #: The run loaded `original` itself (from a path): passes may change it in place, so the
    #: run holds one copy of the weights (`CanonicalizePass`).
    owned: bool = False

    @functools.cached_property
    def pinned(self) -> dict[str, tuple[int, ...]]:
        """The input shapes pinned by `--input-shape`."""
        from onnx_lowrank.inputs import parse_input_shapes

        return parse_input_shapes(self.settings.input_shape)

    @functools.cached_property
    def values(self) -> dict:
        """The input values pinned by `--input-value` (`pins`)."""
        from onnx_lowrank.inputs import input_specs
        from onnx_lowrank.pins import parse_input_values

        return parse_input_values(self.settings.input_value, input_specs(self.original))

    @functools.cached_property
    def memory(self):
        """The run's memory budget (`--max-memory`)."""
        from onnx_lowrank.memory import MemoryBudget

        return MemoryBudget.from_setting(self.settings.max_memory)

    def view(self, feeds: list[dict]):
        """The canonical model with the If branches `feeds` take inlined (`branches.view_of`), once
        per list of feeds: calibration, output gains and the guard walk the layers of those
        branches as main-graph layers."""
        from onnx_lowrank.branches import view_of

        key = (id(self.canonical), id(feeds))
        if key not in self.views:
            self.views[key] = view_of(self.canonical, feeds)
        return self.views[key]

    @property
    def candidates(self) -> list[LayerDecision]:
        """The decisions of layers still to factorize (no reason to leave them out so far)."""
        return [d for d in self.decisions.values() if d.reason is None]

    @property
    def rewritten(self) -> list[LayerDecision]:
        return [d for d in self.decisions.values() if d.status == "rewritten"]


class Pass(abc.ABC):
    """A step of the pipeline: settings in `__init__`, work in `run`.

    Attributes:
        name: how pipelines and logs name it (unique within a pipeline).
        requires: the artifacts (`ARTIFACTS`) earlier passes must have provided (a pass whose
            needs depend on its settings sets them per instance).
        provides: the artifacts it makes available to later passes.
    """

    name: str = "pass"
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    @abc.abstractmethod
    def run(self, workspace: Workspace, progress: Tracker) -> PassResult:
        """Do the pass's work on `workspace`; say what changed."""


#: What a workspace holds before the first pass.
INITIAL = ("model", "settings")


class Pipeline:
    """An ordered list of passes whose declared inputs are checked before anything runs."""

    def __init__(self, passes: Sequence[Pass]):
        self.passes = tuple(passes)
        names = [p.name for p in self.passes]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise InputError(f"pipeline: pass names must be unique; repeated: {', '.join(repeated)}")
        available = set(INITIAL)
        for step in self.passes:
            missing = [a for a in step.requires if a not in available]
            if missing:
                raise InputError(f"pipeline: pass '{step.name}' needs {', '.join(missing)}, which no pass "
                                 f"before it provides (order: {' -> '.join(names)})")
            available.update(step.provides)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise InputError(f"pipeline: no pass named '{name}'; it has: {', '.join(self.names)}") from None

    def insert_before(self, name: str, new: Pass) -> Pipeline:
        """A new pipeline with `new` just before the pass named `name`."""
        index = self._index(name)
        return Pipeline((*self.passes[:index], new, *self.passes[index:]))

    def insert_after(self, name: str, new: Pass) -> Pipeline:
        """A new pipeline with `new` just after the pass named `name`."""
        index = self._index(name) + 1
        return Pipeline((*self.passes[:index], new, *self.passes[index:]))

    def before(self, name: str) -> Pipeline:
        """A new pipeline of the passes before the one named `name` (the first steps of a run)."""
        return Pipeline(self.passes[:self._index(name)])

    def without(self, name: str) -> Pipeline:
        """A new pipeline without the pass named `name` (checked like any other)."""
        index = self._index(name)
        return Pipeline((*self.passes[:index], *self.passes[index + 1:]))

    def describe(self) -> str:
        """One line per pass: its name, what it needs and what it provides."""
        width = max((len(n) for n in self.names), default=0)
        return "\n".join(f"{i + 1:2d}. {p.name:<{width}}  needs {', '.join(p.requires) or '-'}; "
                         f"provides {', '.join(p.provides) or '-'}" for i, p in enumerate(self.passes))

    def run(self, workspace: Workspace, tracker: Tracker = plain_tracker) -> list[PassTiming]:
        """Run the passes in order on `workspace`, timing and logging each."""
        timings = []
        for step in self.passes:
            start = time.perf_counter()
            result = step.run(workspace, tracker)
            elapsed = time.perf_counter() - start
            timings.append(PassTiming(step.name, elapsed, result))
            log.info("%s: %s (%.2f s)", step.name, result.summary, elapsed)
        return timings
