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

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnx_lowrank.errors import InputError
from onnx_lowrank.graph import activations_before_outputs, with_outputs
from onnx_lowrank.intervals import bootstrap_mean, wilson
from onnx_lowrank.metrics import Metric, Proportion, classifier_output, load_metric, top1_matches
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
        before_activation: for an output a Sigmoid or Softmax produces, the same numbers on the
            activation's input (`tensor` names it), where a saturated output's rounding does not
            hide or inflate the error: the primary numeric error of such an output.
    """

    name: str
    rel_l2: float
    max_abs: float
    cosine: float
    before_activation: OutputError | None = None
    activation: str | None = None

    @property
    def primary_rel_l2(self) -> float:
        """The relative L2 error a bound is checked against: before the activation when there is one."""
        return self.before_activation.rel_l2 if self.before_activation is not None else self.rel_l2

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "rel_l2", "max_abs", "cosine", "before_activation"}``; non-finite numbers
        become ``None``; ``before_activation`` is ``{"tensor", "activation", "rel_l2", "max_abs",
        "cosine"}`` or ``None``."""
        before = None
        if self.before_activation is not None:
            inner = self.before_activation
            before = {"tensor": inner.name, "activation": self.activation, "rel_l2": _json_float(inner.rel_l2),
                      "max_abs": _json_float(inner.max_abs), "cosine": _json_float(inner.cosine)}
        return {"name": self.name, "rel_l2": _json_float(self.rel_l2), "max_abs": _json_float(self.max_abs),
                "cosine": _json_float(self.cosine), "before_activation": before}


@dataclass
class ValidationResult:
    """How a candidate compares with the original.

    Attributes:
        provider: the execution provider that actually ran (``session.get_providers()[0]``).
        inputs: number of samples compared (rows of the batch axis over all runs).
        batches: number of model runs they took.
        outputs: one `OutputError` per original output, in graph order.
        top1_agreement: arg-max agreement of the first ``[N, classes]`` output, else None.
        top1_ci95: its 95 % Wilson interval.
        metric: the task metric's score, when a metric was given.
        metric_ci95: its 95 % interval (Wilson for a `metrics.Proportion`, else a bootstrap over
            inputs of the per-batch score).
        latency_before / latency_after: the models' latency, when measured.
        speedup: ``latency_before.median_ms / latency_after.median_ms``, when measured.
    """

    provider: str
    inputs: int
    outputs: list[OutputError]
    batches: int = 0
    top1_agreement: float | None = None
    top1_ci95: tuple[float, float] | None = None
    metric: float | None = None
    metric_ci95: tuple[float, float] | None = None
    latency_before: LatencyStats | None = None
    latency_after: LatencyStats | None = None
    speedup: float | None = None

    @property
    def max_rel_l2(self) -> float:
        """The worst primary relative L2 error over the outputs (0 with no outputs)."""
        return max((o.primary_rel_l2 for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """The report contract's ``"validation"`` object, plus intervals and the metric.

        ``{"provider", "inputs" (samples), "batches", "outputs": [OutputError.to_dict()],
        "top1_agreement", "top1_ci95": [lo, hi] | None, "metric", "metric_ci95": [lo, hi] | None,
        "latency_ms": {"before": {"median", "p90"}, "after": {...}} | None, "speedup" | None}``.
        Non-finite numbers become ``None`` so the JSON stays standard.
        """
        latency = None
        if self.latency_before is not None and self.latency_after is not None:
            latency = {"before": self.latency_before.to_dict(), "after": self.latency_after.to_dict()}
        return {
            "provider": self.provider,
            "inputs": self.inputs,
            "batches": self.batches,
            "outputs": [o.to_dict() for o in self.outputs],
            "top1_agreement": _json_float(self.top1_agreement),
            "top1_ci95": _interval(self.top1_ci95),
            "latency_ms": latency,
            "speedup": _json_float(self.speedup),
            "metric": _json_float(self.metric),
            "metric_ci95": _interval(self.metric_ci95),
        }


def _interval(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [float(interval[0]), float(interval[1])]


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

    def interval(self) -> tuple[float, float] | None:
        return wilson(self.same, self.total) if self.name is not None and self.total else None


#: Outputs compared before their activation as well: a saturated sigmoid or softmax makes
#: float rounding the whole output error (a DBNet map near 1e-5: rel L2 5e-2 for an exact model).
ACTIVATIONS = ("Sigmoid", "Softmax")
#: Nodes looked through on the way from an output back to its activation.
SHAPE_ONLY = ("Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")


def compare_models(
    original: ModelLike | Session,
    candidate: ModelLike | Session,
    feeds: Sequence[Mapping[str, np.ndarray]],
    provider: str | ProviderChoice = "auto",
    metric: Metric | str | None = None,
    threads: int | None = None,
    *,
    candidate_produced: bool = False,
    memory_limit: int | None = None,
) -> ValidationResult:
    """Run both models on every feed and measure how far the candidate's outputs are.

    Outputs are matched by name. Per output, over all feeds (see the module docstring):
    ``rel_l2 = ||a-b||/||a||``, ``max_abs = max|a-b|``, ``cosine = <a,b>/(||a|| ||b||)``; for an
    output a Sigmoid or Softmax produces (through `SHAPE_ONLY` nodes), the same on the
    activation's input too (`OutputError.before_activation`; both models given as ModelProtos).
    ``top1_agreement`` (with its Wilson interval) reads the output `metrics.classifier_output`
    picks. ``metric`` (a callable or a name for `onnx_lowrank.metrics.load_metric`) gets the
    per-feed output dicts of both models; its interval is Wilson's for a `metrics.Proportion`,
    else a bootstrap over the feeds of the metric of each feed.

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
        memory_limit: bytes the outputs kept for a metric may take (`--max-memory`'s share).

    Returns:
        A `ValidationResult` without latency.

    Raises:
        InputError: no feeds, a candidate missing an original output, outputs of different
            shapes, a metric that does not return a number in [0, 1], outputs for a metric over
            `memory_limit`, or onnxruntime failing on a user's model.
        InternalError: onnxruntime failing on a produced candidate.
    """
    if not feeds:
        raise InputError("no inputs to validate with: expected at least one feed")
    metric_fn = load_metric(metric) if metric is not None else None
    choice = resolve_provider(provider)
    before = _before_activation(original, candidate)
    if before:
        original = with_outputs(original, [tensor for tensor, _ in before.values()])
        candidate = with_outputs(candidate, [tensor for tensor, _ in before.values()])
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
    extra = {tensor for tensor, _ in before.values()}
    cand_inputs = {i.name for i in s_cand.get_inputs()}
    orig_inputs = {i.name for i in s_orig.get_inputs()}
    accumulators = {n: _ErrorAccumulator(n) for n in names}
    # Outputs are kept only for a metric; the error sums and top-1 counts stream.
    orig_outs: list[Feed] = []
    cand_outs: list[Feed] = []
    top1: _Top1Counter | None = None
    samples = 0
    for index, feed in enumerate(feeds):
        what = f"input {index}"
        a_vals = s_orig.run(names, {k: v for k, v in feed.items() if k in orig_inputs}, what)
        b_vals = s_cand.run(names, {k: v for k, v in feed.items() if k in cand_inputs}, what)
        a_out = dict(zip(names, map(np.asarray, a_vals), strict=True))
        b_out = dict(zip(names, map(np.asarray, b_vals), strict=True))
        for n in names:
            accumulators[n].add(a_out[n], b_out[n])
        a_out = {n: v for n, v in a_out.items() if n not in extra}
        b_out = {n: v for n, v in b_out.items() if n not in extra}
        if top1 is None:
            top1 = _Top1Counter(a_out)
        top1.add(a_out, b_out)
        samples += _samples(feed)
        if metric_fn is not None:
            if memory_limit is not None and index == 0:
                _check_kept_outputs(a_out, b_out, len(feeds), memory_limit)
            orig_outs.append(a_out)
            cand_outs.append(b_out)

    score = interval = None
    if metric_fn is not None:
        score = _check_score(metric_fn, metric_fn(orig_outs, cand_outs))
        interval = _metric_interval(metric_fn, score, orig_outs, cand_outs)
    provider_used = s_orig.provider
    if s_cand.provider != provider_used:
        logger.warning("the original ran on %s but the candidate on %s", provider_used, s_cand.provider)
    errors = {n: accumulators[n].result() for n in names}
    outputs = [dataclasses.replace(errors[n], before_activation=errors[before[n][0]], activation=before[n][1])
               if n in before else errors[n] for n in names if n not in extra]
    result = ValidationResult(
        provider=provider_used, inputs=samples, batches=len(feeds), outputs=outputs,
        top1_agreement=top1.result() if top1 is not None else None,
        top1_ci95=top1.interval() if top1 is not None else None,
        metric=score, metric_ci95=interval)
    logger.info("validated %d samples in %d runs on %s: worst rel_l2 %.3g", samples, len(feeds), provider_used,
                result.max_rel_l2)
    return result


def _before_activation(original, candidate) -> dict[str, tuple[str, str]]:
    """Output -> (the input tensor of the Sigmoid/Softmax producing it, its op type), for the
    outputs whose activation input both models (ModelProtos) compute."""
    import onnx

    if not isinstance(original, onnx.ModelProto) or not isinstance(candidate, onnx.ModelProto):
        return {}
    produced = {name for node in candidate.graph.node for name in node.output}
    produced |= {i.name for i in candidate.graph.input}
    return {output: (node.input[0], node.op_type)
            for output, node in activations_before_outputs(original, ACTIVATIONS, SHAPE_ONLY).items()
            if node.input[0] in produced}


def _samples(feed: Mapping[str, np.ndarray]) -> int:
    """The samples a feed holds: the batch axis of its first array that has one."""
    return next((int(np.shape(v)[0]) for v in feed.values() if np.ndim(v) >= 1), 1)


def _check_kept_outputs(a_out: Feed, b_out: Feed, feeds: int, limit: int) -> None:
    """Refuse a metric whose kept outputs (both models, every feed) would pass `limit` bytes."""
    needed = feeds * sum(v.nbytes for v in (*a_out.values(), *b_out.values()))
    if needed > limit:
        from onnx_lowrank.memory import format_bytes

        raise InputError(f"the task metric keeps every output of both models: {feeds} runs need "
                         f"{format_bytes(needed)}, more than the {format_bytes(limit)} --max-memory allows for "
                         "them; validate on fewer inputs (--eval-count) or raise --max-memory")


def _metric_interval(metric_fn: Callable, score: float, original: list[Feed], candidate: list[Feed]
                     ) -> tuple[float, float] | None:
    """Wilson's interval of a proportion; else a bootstrap over the feeds of each feed's score."""
    if isinstance(score, Proportion):
        return wilson(score.successes, score.trials)
    if len(original) < 2:
        return None
    per_feed = [_check_score(metric_fn, metric_fn([a], [b])) for a, b in zip(original, candidate, strict=True)]
    return bootstrap_mean(per_feed)


def _check_score(metric: Callable, score: Any) -> float:
    name = getattr(metric, "__name__", repr(metric))
    try:
        value = score if isinstance(score, Proportion) else float(score)
    except (TypeError, ValueError):
        raise InputError(f"metric {name} returned {score!r}; expected a float in [0, 1]") from None
    if not (0.0 <= value <= 1.0):
        raise InputError(f"metric {name} returned {value}; expected a float in [0, 1]")
    return value
