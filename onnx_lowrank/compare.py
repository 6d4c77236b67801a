"""Numerics of a candidate model against the original, both run in onnxruntime.

Per output ``y`` over all validation batches (``a`` original, ``b`` candidate, flattened and
concatenated, in float64):

* ``rel_l2 = ||a - b||_2 / ||a||_2`` (0 when both are zero, inf when only ``a`` is);
* ``max_abs = max |a - b|``;
* ``cosine = <a, b> / (||a||_2 ||b||_2)`` (1 when both are zero, 0 when one is).

A non-finite candidate value where the original is finite makes ``rel_l2`` and ``max_abs``
inf and ``cosine`` 0, so a bound check can never pass on NaN.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnx_lowrank.errors import InputError
from onnx_lowrank.metrics import Metric, classifier_output, load_metric, top1_matches
from onnx_lowrank.runtime import ModelLike, ProviderChoice, Session, make_session, resolve_provider
from onnx_lowrank.timing import LatencyStats

__all__ = ["OutputError", "ValidationResult", "compare_models"]

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]


def _json_float(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class OutputError:
    """Error of one output over all validation batches (see the module docstring).

    Attributes:
        name: output name.
        rel_l2: ``||a - b|| / ||a||``.
        max_abs: ``max |a - b|``.
        cosine: ``<a, b> / (||a|| ||b||)``.
    """

    name: str
    rel_l2: float
    max_abs: float
    cosine: float

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "rel_l2", "max_abs", "cosine"}``; non-finite numbers become ``None``."""
        return {
            "name": self.name,
            "rel_l2": _json_float(self.rel_l2),
            "max_abs": _json_float(self.max_abs),
            "cosine": _json_float(self.cosine),
        }


@dataclass
class ValidationResult:
    """How a candidate compares with the original.

    Attributes:
        provider: the execution provider that actually ran (``session.get_providers()[0]``).
        inputs: number of feeds (model runs) compared.
        outputs: one `OutputError` per original output, in graph order.
        top1_agreement: arg-max agreement of the first ``[N, classes]`` output, else None.
        metric: the task metric's score, when a metric was given.
        latency_before: the original's latency, when measured.
        latency_after: the candidate's latency, when measured.
        speedup: ``latency_before.median_ms / latency_after.median_ms``, when measured.
    """

    provider: str
    inputs: int
    outputs: list[OutputError]
    top1_agreement: float | None = None
    metric: float | None = None
    latency_before: LatencyStats | None = None
    latency_after: LatencyStats | None = None
    speedup: float | None = None

    @property
    def max_rel_l2(self) -> float:
        """The worst ``rel_l2`` over the outputs (0 with no outputs)."""
        return max((o.rel_l2 for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """The report contract's ``"validation"`` object, plus ``"metric"``.

        ``{"provider", "inputs", "outputs": [{"name", "rel_l2", "max_abs", "cosine"}],
        "top1_agreement", "latency_ms": {"before": {"median", "p90"}, "after": {...}} | None,
        "speedup" | None, "metric" | None}``. Non-finite numbers become ``None`` so the JSON
        stays standard.
        """
        latency = None
        if self.latency_before is not None and self.latency_after is not None:
            latency = {
                "before": self.latency_before.to_dict(),
                "after": self.latency_after.to_dict(),
            }
        return {
            "provider": self.provider,
            "inputs": self.inputs,
            "outputs": [o.to_dict() for o in self.outputs],
            "top1_agreement": _json_float(self.top1_agreement),
            "latency_ms": latency,
            "speedup": _json_float(self.speedup),
            "metric": _json_float(self.metric),
        }


class _ErrorAccumulator:
    """Streaming sums for ``rel_l2``, ``max_abs`` and ``cosine`` of one output."""

    def __init__(self, name: str):
        self.name = name
        self.aa = self.bb = self.ab = self.dd = 0.0
        self.max_abs = 0.0
        self.bad = False

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.shape != b.shape:
            raise InputError(
                f"output '{self.name}' has shape {a.shape} in the original but {b.shape} "
                "in the candidate"
            )
        a = np.asarray(a, dtype=np.float64).ravel()
        b = np.asarray(b, dtype=np.float64).ravel()
        if not a.size:
            return
        finite = np.isfinite(a)
        if not np.isfinite(b[finite]).all():
            self.bad = True
        # Where the original itself is not finite, compare only where both agree on it.
        if not finite.all():
            same = (a == b) | (np.isnan(a) & np.isnan(b))
            if not same[~finite].all():
                self.bad = True
            a, b = a[finite], b[finite]
        if self.bad:
            return
        d = a - b
        self.aa += float(a @ a)
        self.bb += float(b @ b)
        self.ab += float(a @ b)
        self.dd += float(d @ d)
        if d.size:
            self.max_abs = max(self.max_abs, float(np.abs(d).max()))

    def result(self) -> OutputError:
        if self.bad:
            return OutputError(self.name, math.inf, math.inf, 0.0)
        if self.aa == 0.0:
            rel = 0.0 if self.dd == 0.0 else math.inf
        else:
            rel = math.sqrt(self.dd / self.aa)
        if self.aa == 0.0 and self.bb == 0.0:
            cosine = 1.0
        elif self.aa == 0.0 or self.bb == 0.0:
            cosine = 0.0
        else:
            cosine = max(-1.0, min(1.0, self.ab / math.sqrt(self.aa * self.bb)))
        return OutputError(self.name, rel, self.max_abs, cosine)


class _Top1Counter:
    """Streaming arg-max agreement of the output `metrics.classifier_output` picks."""

    def __init__(self, first: Feed):
        self.name = classifier_output(first)
        self.same = self.total = 0

    def add(self, a: Feed, b: Feed) -> None:
        if self.name is None:
            return
        same, rows = top1_matches(a[self.name], b[self.name])
        self.same += same
        self.total += rows

    def result(self) -> float | None:
        return self.same / self.total if self.name is not None and self.total else None


def compare_models(
    original: ModelLike | Session,
    candidate: ModelLike | Session,
    feeds: Sequence[Mapping[str, np.ndarray]],
    provider: str | ProviderChoice = "auto",
    metric: Metric | str | None = None,
    threads: int | None = None,
    *,
    candidate_produced: bool = False,
) -> ValidationResult:
    """Run both models on every feed and measure how far the candidate's outputs are.

    Outputs are matched by name. Per output, over all feeds (see the module docstring):
    ``rel_l2 = ||a-b||/||a||``, ``max_abs = max|a-b|``, ``cosine = <a,b>/(||a|| ||b||)``.
    ``top1_agreement`` is the arg-max agreement of the first output shaped ``[N, classes]``
    (2-D, classes > 1), else None. ``metric`` (a callable or a name for
    `onnx_lowrank.metrics.load_metric`) gets the per-feed output dicts of both models.

    Args:
        original: the reference model, the user's (anything `onnx_lowrank.runtime.make_session`
            takes).
        candidate: the model under test.
        feeds: input dicts; each runs once through both models.
        provider: ``auto|cuda|tensorrt|cpu`` or a `ProviderChoice`.
        metric: an optional task metric.
        threads: intra-op threads.
        candidate_produced: the candidate is the tool's own product, so onnxruntime failing on
            it is an `InternalError`, not the user's bad input.

    Returns:
        A `ValidationResult` without latency.

    Raises:
        InputError: no feeds, a candidate missing an original output, outputs of different
            shapes, a metric that does not return a number in [0, 1], or onnxruntime failing
            on a user's model.
        InternalError: onnxruntime failing on a produced candidate.
    """
    if not feeds:
        raise InputError("no inputs to validate with: expected at least one feed")
    metric_fn = load_metric(metric) if metric is not None else None
    choice = resolve_provider(provider)
    s_orig = make_session(original, choice, threads, produced=False, label="the original model")
    s_cand = make_session(candidate, choice, threads, produced=candidate_produced,
                          label="the candidate model")
    names = [o.name for o in s_orig.get_outputs()]
    cand_names = [o.name for o in s_cand.get_outputs()]
    missing = [n for n in names if n not in cand_names]
    if missing:
        raise InputError(
            f"the candidate has no output {', '.join(repr(n) for n in missing)}; original "
            f"outputs: {', '.join(names)}; candidate outputs: {', '.join(cand_names)}"
        )
    cand_inputs = {i.name for i in s_cand.get_inputs()}
    orig_inputs = {i.name for i in s_orig.get_inputs()}
    accumulators = {n: _ErrorAccumulator(n) for n in names}
    # Outputs are kept only for a metric; the error sums and top-1 counts stream.
    orig_outs: list[Feed] = []
    cand_outs: list[Feed] = []
    top1: _Top1Counter | None = None
    for index, feed in enumerate(feeds):
        what = f"input {index}"
        a_vals = s_orig.run(names, {k: v for k, v in feed.items() if k in orig_inputs}, what)
        b_vals = s_cand.run(names, {k: v for k, v in feed.items() if k in cand_inputs}, what)
        a_out = dict(zip(names, map(np.asarray, a_vals), strict=True))
        b_out = dict(zip(names, map(np.asarray, b_vals), strict=True))
        for n in names:
            accumulators[n].add(a_out[n], b_out[n])
        if top1 is None:
            top1 = _Top1Counter(a_out)
        top1.add(a_out, b_out)
        if metric_fn is not None:
            orig_outs.append(a_out)
            cand_outs.append(b_out)

    score = None
    if metric_fn is not None:
        score = _check_score(metric_fn, metric_fn(orig_outs, cand_outs))
    provider_used = s_orig.provider
    if s_cand.provider != provider_used:
        logger.warning("the original ran on %s but the candidate on %s", provider_used, s_cand.provider)
    result = ValidationResult(
        provider=provider_used,
        inputs=len(feeds),
        outputs=[accumulators[n].result() for n in names],
        top1_agreement=top1.result() if top1 is not None else None,
        metric=score,
    )
    logger.info("validated %d input(s) on %s: worst rel_l2 %.3g", len(feeds), provider_used,
                result.max_rel_l2)
    return result


def _check_score(metric: Callable, score: Any) -> float:
    name = getattr(metric, "__name__", repr(metric))
    try:
        value = float(score)
    except (TypeError, ValueError):
        raise InputError(f"metric {name} returned {score!r}; expected a float in [0, 1]") from None
    if not (0.0 <= value <= 1.0):
        raise InputError(f"metric {name} returned {value}; expected a float in [0, 1]")
    return value
