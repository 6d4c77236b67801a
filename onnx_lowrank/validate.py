"""Numerics and latency of a candidate model against the original, with onnxruntime.

Provider selection: ``auto`` uses CUDA only when a real session on ``CUDAExecutionProvider``
can be created and run here (``get_available_providers()`` lists CUDA in every
``onnxruntime-gpu`` wheel, whether or not the CUDA libraries or a GPU are present); otherwise
CPU. The provider that actually ran is always read back from ``session.get_providers()``.

Numerics, per output ``y`` over all validation batches (``a`` original, ``b`` candidate,
flattened and concatenated, in float64):

* ``rel_l2 = ||a - b||_2 / ||a||_2`` (0 when both are zero, inf when only ``a`` is);
* ``max_abs = max |a - b|``;
* ``cosine = <a, b> / (||a||_2 ||b||_2)`` (1 when both are zero, 0 when one is).

A non-finite candidate value where the original is finite makes ``rel_l2`` and ``max_abs``
inf and ``cosine`` 0, so a bound check can never pass on NaN.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from onnx_lowrank.errors import InputError
from onnx_lowrank.inputs import (
    ImageOptions,
    input_specs,
    load_calibration,
    parse_input_shapes,
    random_feeds,
    resolve_shapes,
)
from onnx_lowrank.metrics import Metric, load_metric

__all__ = [
    "DEFAULT_COUNT",
    "LatencyComparison",
    "LatencyStats",
    "OutputError",
    "PROVIDERS",
    "ProviderChoice",
    "ValidationResult",
    "compare_latency",
    "compare_models",
    "format_table",
    "make_session",
    "measure_latency",
    "resolve_provider",
    "validate_models",
]

logger = logging.getLogger(__name__)

#: Values accepted by ``--provider``.
PROVIDERS = ("auto", "cuda", "tensorrt", "cpu")
#: Number of random feeds when no calibration data is given.
DEFAULT_COUNT = 8
#: onnxruntime log severity: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
_ORT_QUIET = 3
#: Protobuf cannot serialise a message of 2 GiB or more: bigger models go by path.
_PROTO_LIMIT = 2**31 - 1

_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"
_TRT = "TensorrtExecutionProvider"

Feed = dict[str, np.ndarray]
ModelLike = onnx.ModelProto | str | os.PathLike | bytes | ort.InferenceSession


# --------------------------------------------------------------------------------------------
# Providers


@dataclass(frozen=True)
class ProviderChoice:
    """Which onnxruntime execution providers a session asks for.

    Attributes:
        requested: what the user asked for (``auto``, ``cuda``, ``tensorrt``, ``cpu``).
        providers: the list passed to ``InferenceSession``, preferred first, CPU last.
        reason: why ``auto`` fell back to CPU (``None`` when it did not).
    """

    requested: str
    providers: tuple[str, ...]
    reason: str | None = None

    @property
    def name(self) -> str:
        """The preferred provider, e.g. ``"CUDAExecutionProvider"``."""
        return self.providers[0]

    @property
    def on_gpu(self) -> bool:
        """True when the preferred provider runs on a CUDA device."""
        return self.name in (_CUDA, _TRT)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ORT_PREFIX = re.compile(r"^\S+ \S+ \[[EWIVF]:onnxruntime:[^\]]*\] ")


def _probe_reason(captured: str, fallback: str) -> str:
    """One readable line out of what onnxruntime wrote to stderr while probing."""
    lines = [_ORT_PREFIX.sub("", _ANSI.sub("", ln)).strip() for ln in captured.splitlines()]
    lines = [ln for ln in lines if ln]
    for line in lines:
        match = re.search(r"Failed to load library (\S+) with error: (.*)", line)
        if match:
            return f"cannot load {Path(match.group(1)).name}: {match.group(2).strip()}"
    for line in lines:
        if "Failed to create" in line or "Require" in line:
            return line[:300]
    return lines[0][:300] if lines else fallback


class _Captured:
    text = ""


@contextlib.contextmanager
def _capture_fd2():
    """Send file descriptor 2 to a temporary file; its text is in ``.text`` on exit.

    onnxruntime logs provider load failures from C++ straight to fd 2, past Python's
    ``sys.stderr`` and past its own severity settings for some messages.
    """
    captured = _Captured()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield captured
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.text = tmp.read().decode("utf-8", errors="replace")


def _probe_model() -> bytes:
    """A one-node float model (``y = relu(x)``) to try a provider with."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "provider_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


_PROBE_LOCK = threading.Lock()


@functools.cache
def _probe(provider: str) -> tuple[bool, str]:
    """Whether a session on ``provider`` really runs here, and why not. Cached per process."""
    available = ort.get_available_providers()
    if provider not in available:
        return False, f"this onnxruntime build has no {provider} (it has: {', '.join(available)})"
    providers = [provider, _CUDA, _CPU] if provider == _TRT else [provider, _CPU]
    options = ort.SessionOptions()
    options.log_severity_level = _ORT_QUIET
    ort.set_default_logger_severity(_ORT_QUIET)
    # onnxruntime's Python layer also print()s "EP Error ... Falling back" to stdout.
    stdout = io.StringIO()
    with _PROBE_LOCK, _capture_fd2() as captured, contextlib.redirect_stdout(stdout):
        try:
            session = ort.InferenceSession(_probe_model(), options, providers=providers)
            used = session.get_providers()[0]
            if used == provider:
                x = np.array([-1.0, 0.0, 1.0, 2.0], dtype=np.float32)
                y = session.run(None, {"x": x})[0]
                if not np.array_equal(y, np.maximum(x, 0)):
                    return False, f"a test run on {provider} gave wrong results"
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot use it"
            used, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        else:
            error = None
    if used == provider:
        logger.debug("%s works here", provider)
        return True, ""
    fallback = error or f"the session fell back to {used}"
    reason = _probe_reason(captured.text + stdout.getvalue(), fallback)
    logger.debug("%s does not work here: %s", provider, reason)
    return False, reason


def resolve_provider(requested: str | ProviderChoice = "auto") -> ProviderChoice:
    """The providers to run on for ``--provider auto|cuda|tensorrt|cpu``.

    ``auto`` is CUDA when a probe session on ``CUDAExecutionProvider`` is created and runs
    with CUDA as its first provider (the answer is cached per process; onnxruntime's
    fallback messages are kept off the terminal), else CPU. ``auto`` never picks TensorRT,
    whose engine builds take minutes; ask for it.

    Raises:
        InputError: an unknown name, or ``cuda``/``tensorrt`` requested where onnxruntime
            cannot use it.
    """
    if isinstance(requested, ProviderChoice):
        return requested
    name = str(requested).strip().lower()
    if name == "cpu":
        return ProviderChoice("cpu", (_CPU,))
    if name == "auto":
        ok, reason = _probe(_CUDA)
        if ok:
            return ProviderChoice("auto", (_CUDA, _CPU))
        logger.info("provider auto: using CPU (%s)", reason)
        return ProviderChoice("auto", (_CPU,), reason=reason)
    if name == "cuda":
        ok, reason = _probe(_CUDA)
        if not ok:
            raise InputError(f"CUDA was requested but onnxruntime cannot use it here: {reason}")
        return ProviderChoice("cuda", (_CUDA, _CPU))
    if name == "tensorrt":
        ok, reason = _probe(_TRT)
        if not ok:
            raise InputError(f"TensorRT was requested but onnxruntime cannot use it here: {reason}")
        return ProviderChoice("tensorrt", (_TRT, _CUDA, _CPU))
    raise InputError(f"unknown provider '{requested}'; expected one of {', '.join(PROVIDERS)}")


# --------------------------------------------------------------------------------------------
# Sessions

_IR_LIMIT = re.compile(r"max supported IR version: (\d+)")


def _session_from(source: str | bytes, options: ort.SessionOptions, providers: Sequence[str]):
    return ort.InferenceSession(source, options, providers=list(providers))


def make_session(
    model: ModelLike,
    provider: str | ProviderChoice = "auto",
    threads: int | None = None,
) -> ort.InferenceSession:
    """An onnxruntime session with all graph optimisations (``ORT_ENABLE_ALL``).

    Args:
        model: a ``ModelProto``, a path (external data is found next to it), serialised
            bytes, or an ``InferenceSession`` (returned as is). A ``ModelProto`` of 2 GiB or
            more is written with external data to a temporary folder and loaded by path.
        provider: ``auto|cuda|tensorrt|cpu`` or a `ProviderChoice`.
        threads: intra-op threads (``None``: onnxruntime's default).

    A model whose IR version is newer than this onnxruntime accepts is loaded with the IR
    version lowered to the newest it accepts (logged); the operators are unchanged.

    Raises:
        InputError: the path does not exist, or onnxruntime cannot load the model.
    """
    if isinstance(model, ort.InferenceSession):
        return model
    choice = resolve_provider(provider)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = _ORT_QUIET
    if threads is not None:
        options.intra_op_num_threads = int(threads)

    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() >= _PROTO_LIMIT:
            with tempfile.TemporaryDirectory(prefix="onnx_lowrank_") as tmp:
                path = os.path.join(tmp, "model.onnx")
                onnx.save(model, path, save_as_external_data=True, location="model.onnx.data")
                return _load_session(path, options, choice, label="the in-memory model")
        return _load_session(
            model.SerializeToString(), options, choice, label="the in-memory model"
        )
    if isinstance(model, bytes):
        return _load_session(model, options, choice, label="the serialised model")
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    return _load_session(path, options, choice, label=path)


def _load_session(
    source: str | bytes, options: ort.SessionOptions, choice: ProviderChoice, label: str
) -> ort.InferenceSession:
    try:
        return _session_from(source, options, choice.providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind types
        message = str(exc)
        limit = _IR_LIMIT.search(message)
        if not limit:
            first = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
            raise InputError(f"onnxruntime cannot load {label}: {first}") from None
    # The IR version is newer than this onnxruntime accepts: lower it and retry.
    ir_max = int(limit.group(1))
    if isinstance(source, bytes):
        proto = onnx.load_from_string(source)
        proto.ir_version = min(proto.ir_version, ir_max)
        logger.info("loading %s with IR version lowered to %d", label, ir_max)
        return _load_session(proto.SerializeToString(), options, choice, label)
    proto = onnx.load(source, load_external_data=False)
    proto.ir_version = min(proto.ir_version, ir_max)
    logger.info("loading %s with IR version lowered to %d", label, ir_max)
    # Keep external data where it is: write the lowered proto next to the original.
    directory = os.path.dirname(os.path.abspath(source))
    try:
        fd, tmp_path = tempfile.mkstemp(suffix=".onnx", dir=directory)
    except OSError:
        # A read-only folder: load the weights into memory instead.
        proto = onnx.load(source)
        proto.ir_version = min(proto.ir_version, ir_max)
        return make_session(proto, choice, options.intra_op_num_threads or None)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(proto.SerializeToString())
        return _load_session(tmp_path, options, choice, label)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp_path)


def _actual_provider(session: ort.InferenceSession) -> str:
    return session.get_providers()[0]


# --------------------------------------------------------------------------------------------
# Numerics


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


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of one model run.

    Attributes:
        median_ms: median over the timed runs, milliseconds.
        p90_ms: 90th percentile (linear interpolation), milliseconds.
        samples: every timed run, milliseconds, in order.
    """

    median_ms: float
    p90_ms: float
    samples: tuple[float, ...] = ()

    @classmethod
    def from_samples(cls, samples_ms: Iterable[float]) -> LatencyStats:
        """Median and p90 of the given run times (milliseconds)."""
        samples = tuple(float(s) for s in samples_ms)
        if not samples:
            raise ValueError("no latency samples")
        return cls(float(np.median(samples)), float(np.percentile(samples, 90)), samples)

    def to_dict(self) -> dict[str, float]:
        """``{"median": ms, "p90": ms}`` as in the report contract."""
        return {"median": self.median_ms, "p90": self.p90_ms}


@dataclass(frozen=True)
class LatencyComparison:
    """Latency of the original (``before``) and candidate (``after``) measured together.

    Attributes:
        before: the original's stats.
        after: the candidate's stats.
        speedup: ``before.median_ms / after.median_ms``.
        provider: the provider the sessions ran on.
    """

    before: LatencyStats
    after: LatencyStats
    speedup: float
    provider: str


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


def _json_float(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


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
    """Streaming arg-max agreement of the first output shaped ``[N, classes]`` (classes > 1)."""

    def __init__(self, first: Feed):
        names = [n for n, a in first.items() if a.ndim == 2 and a.shape[1] > 1]
        self.name = names[0] if names else None
        self.same = self.total = 0

    def add(self, a: Feed, b: Feed) -> None:
        if self.name is None:
            return
        self.same += int(
            np.count_nonzero(a[self.name].argmax(axis=1) == b[self.name].argmax(axis=1))
        )
        self.total += a[self.name].shape[0]

    def result(self) -> float | None:
        return self.same / self.total if self.name is not None and self.total else None


def compare_models(
    original: ModelLike,
    candidate: ModelLike,
    feeds: Sequence[Mapping[str, np.ndarray]],
    provider: str | ProviderChoice = "auto",
    metric: Metric | str | None = None,
    threads: int | None = None,
) -> ValidationResult:
    """Run both models on every feed and measure how far the candidate's outputs are.

    Outputs are matched by name. Per output, over all feeds (see the module docstring):
    ``rel_l2 = ||a-b||/||a||``, ``max_abs = max|a-b|``, ``cosine = <a,b>/(||a|| ||b||)``.
    ``top1_agreement`` is the arg-max agreement of the first output shaped ``[N, classes]``
    (2-D, classes > 1), else None. ``metric`` (a callable or a name for
    `onnx_lowrank.metrics.load_metric`) gets the per-feed output dicts of both models.

    Args:
        original: the reference model (anything `make_session` takes).
        candidate: the model under test.
        feeds: input dicts; each runs once through both models.
        provider: ``auto|cuda|tensorrt|cpu`` or a `ProviderChoice`.
        metric: an optional task metric.
        threads: intra-op threads.

    Returns:
        A `ValidationResult` without latency.

    Raises:
        InputError: no feeds, a candidate missing an original output, outputs of different
            shapes, or a metric that does not return a number in [0, 1].
    """
    if not feeds:
        raise InputError("no inputs to validate with: expected at least one feed")
    metric_fn = load_metric(metric) if metric is not None else None
    choice = resolve_provider(provider)
    s_orig = make_session(original, choice, threads)
    s_cand = make_session(candidate, choice, threads)
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
        a_vals = _run(
            s_orig, names, {k: v for k, v in feed.items() if k in orig_inputs}, "original", index
        )
        b_vals = _run(
            s_cand, names, {k: v for k, v in feed.items() if k in cand_inputs}, "candidate", index
        )
        a_out = dict(zip(names, a_vals, strict=True))
        b_out = dict(zip(names, b_vals, strict=True))
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
    provider_used = _actual_provider(s_orig)
    if _actual_provider(s_cand) != provider_used:
        logger.warning(
            "the original ran on %s but the candidate on %s",
            provider_used,
            _actual_provider(s_cand),
        )
    result = ValidationResult(
        provider=provider_used,
        inputs=len(feeds),
        outputs=[accumulators[n].result() for n in names],
        top1_agreement=top1.result() if top1 is not None else None,
        metric=score,
    )
    logger.info(
        "validated %d input(s) on %s: worst rel_l2 %.3g",
        len(feeds),
        provider_used,
        result.max_rel_l2,
    )
    return result


def _run(session, names, feed, which: str, index: int) -> list[np.ndarray]:
    try:
        return [np.asarray(v) for v in session.run(names, dict(feed))]
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shapes = ", ".join(
            f"{k} {tuple(np.shape(v))} {np.asarray(v).dtype}" for k, v in feed.items()
        )
        raise InputError(f"the {which} model failed on input {index} ({shapes}): {first}") from None


def _check_score(metric: Callable, score: Any) -> float:
    name = getattr(metric, "__name__", repr(metric))
    try:
        value = float(score)
    except (TypeError, ValueError):
        raise InputError(f"metric {name} returned {score!r}; expected a float in [0, 1]") from None
    if not (0.0 <= value <= 1.0):
        raise InputError(f"metric {name} returned {value}; expected a float in [0, 1]")
    return value


# --------------------------------------------------------------------------------------------
# Latency


class _Runner:
    """One timed run of a session on a fixed feed.

    On a CUDA device the run goes through IO binding, with the inputs copied to the device
    once and the outputs left there.
    """

    def __init__(
        self, session: ort.InferenceSession, feed: Mapping[str, np.ndarray], io_binding: bool
    ):
        self.session = session
        inputs = {i.name for i in session.get_inputs()}
        self.feed = {k: np.ascontiguousarray(v) for k, v in feed.items() if k in inputs}
        self.binding = None
        provider = _actual_provider(session)
        if io_binding and provider in (_CUDA, _TRT):
            binding = session.io_binding()
            self._device_inputs = []
            for name, value in self.feed.items():
                ortvalue = ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0)
                self._device_inputs.append(ortvalue)  # keep the device copies alive
                binding.bind_ortvalue_input(name, ortvalue)
            for out in session.get_outputs():
                binding.bind_output(out.name, "cuda", 0)
            self.binding = binding

    def __call__(self) -> float:
        """Run once; return the wall time in milliseconds."""
        if self.binding is not None:
            start = time.perf_counter_ns()
            self.session.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()
            stop = time.perf_counter_ns()
        else:
            start = time.perf_counter_ns()
            self.session.run(None, self.feed)
            stop = time.perf_counter_ns()
        return (stop - start) / 1e6


def _check_counts(warmup: int, repeats: int) -> None:
    if warmup < 0:
        raise InputError(f"latency warm-up runs must be >= 0, found {warmup}")
    if repeats < 1:
        raise InputError(f"latency repeats must be >= 1, found {repeats}")


def measure_latency(
    model: ModelLike,
    feed: Mapping[str, np.ndarray],
    provider: str | ProviderChoice = "auto",
    warmup: int = 10,
    repeats: int = 50,
    threads: int | None = None,
    io_binding: bool = True,
) -> LatencyStats:
    """Latency of one model: ``warmup`` untimed runs, then ``repeats`` timed ones.

    On CUDA/TensorRT (with ``io_binding``) the inputs are copied to the device once and the
    outputs bound to the device, so the time is the model's, not the PCIe copies'.

    Returns:
        `LatencyStats` with the median and 90th percentile in milliseconds.
    """
    _check_counts(warmup, repeats)
    session = make_session(model, provider, threads)
    run = _Runner(session, feed, io_binding)
    for _ in range(warmup):
        run()
    return LatencyStats.from_samples(run() for _ in range(repeats))


def compare_latency(
    original: ModelLike,
    candidate: ModelLike,
    feed: Mapping[str, np.ndarray],
    provider: str | ProviderChoice = "auto",
    warmup: int = 10,
    repeats: int = 50,
    threads: int | None = None,
    io_binding: bool = True,
) -> LatencyComparison:
    """Latency of both models in one process, interleaved.

    After ``warmup`` runs of each, the timed runs alternate between the two models, and the
    order inside each pair alternates too (AB, BA, AB, ...), so drifts in clock speed, heat
    or background load hit both alike. ``speedup = median_before / median_after``.
    """
    _check_counts(warmup, repeats)
    choice = resolve_provider(provider)
    runners = [
        _Runner(make_session(m, choice, threads), feed, io_binding) for m in (original, candidate)
    ]
    for runner in runners:
        for _ in range(warmup):
            runner()
    samples: list[list[float]] = [[], []]
    for i in range(repeats):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            samples[which].append(runners[which]())
    before = LatencyStats.from_samples(samples[0])
    after = LatencyStats.from_samples(samples[1])
    speedup = before.median_ms / after.median_ms if after.median_ms > 0 else math.inf
    provider_used = _actual_provider(runners[0].session)
    logger.info(
        "latency on %s: %.3f ms -> %.3f ms (x%.2f)",
        provider_used,
        before.median_ms,
        after.median_ms,
        speedup,
    )
    return LatencyComparison(before, after, speedup, provider_used)


# --------------------------------------------------------------------------------------------
# The whole validation


def _load_model(model: str | os.PathLike | onnx.ModelProto, which: str) -> onnx.ModelProto:
    """The model's graph without its external data (enough for its inputs)."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file (the {which} model)")
    try:
        return onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise InputError(f"cannot read {which} model {path} as ONNX: {exc}") from None


def validate_models(
    original_path: str | os.PathLike | onnx.ModelProto,
    candidate_path: str | os.PathLike | onnx.ModelProto,
    calib: str | os.PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int]] | Iterable[str] | None = None,
    provider: str | ProviderChoice = "auto",
    count: int | None = None,
    metric: Metric | str | None = None,
    latency: bool = True,
    threads: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    image_options: ImageOptions | None = None,
    warmup: int = 10,
    repeats: int = 50,
) -> ValidationResult:
    """Validate a candidate against the original: numerics, optional metric, latency.

    Feeds come from ``calib`` (see `onnx_lowrank.inputs.load_calibration`; ``count`` caps
    the samples) or, without it, ``count`` (default `DEFAULT_COUNT`) random feeds from
    ``seed`` with the shapes of `onnx_lowrank.inputs.resolve_shapes`. Sessions are created
    once, from the paths (external data is found next to each model), and reused for the
    latency, measured on the first feed with `compare_latency`.

    Args:
        original_path: the original model (path or ``ModelProto``).
        candidate_path: the candidate model.
        calib: an ``.npz`` or a folder of images.
        input_shapes: pinned shapes: ``{name: dims}`` or ``--input-shape`` strings.
        provider: ``auto|cuda|tensorrt|cpu``.
        count: number of random feeds, or cap on calibration samples.
        metric: a task metric (callable or name for `onnx_lowrank.metrics.load_metric`).
        latency: measure latency.
        threads: intra-op threads.
        seed: seed of the random feeds.
        batch_size: calibration samples per feed.
        image_options: preprocessing for an image folder.
        warmup: untimed latency runs per model.
        repeats: timed latency runs per model.

    Raises:
        InputError: any bad input (paths, shapes, calibration data, provider, metric).
    """
    original = _load_model(original_path, "original")
    candidate = _load_model(candidate_path, "candidate")
    specs = input_specs(original)
    spec_names = {s.name for s in specs}
    cand_names = [s.name for s in input_specs(candidate)]
    unknown = [n for n in cand_names if n not in spec_names]
    if unknown:
        raise InputError(
            f"the candidate has input(s) {', '.join(unknown)} that the original lacks; "
            f"original inputs: {', '.join(spec_names) or '(none)'}"
        )
    if input_shapes is None:
        pinned: dict[str, tuple[int, ...]] = {}
    elif isinstance(input_shapes, Mapping):
        pinned = {k: tuple(int(d) for d in v) for k, v in input_shapes.items()}
    else:
        pinned = parse_input_shapes(input_shapes)
    metric_fn = load_metric(metric) if metric is not None else None
    choice = resolve_provider(provider)

    if calib is not None:
        feeds = load_calibration(calib, specs, pinned, count, batch_size, image_options)
    else:
        shapes = resolve_shapes(specs, pinned)
        feeds = random_feeds(specs, shapes, count or DEFAULT_COUNT, seed)

    def session_for(model, proto):
        source = model if not isinstance(model, onnx.ModelProto) else proto
        return make_session(source, choice, threads)

    s_orig = session_for(original_path, original)
    s_cand = session_for(candidate_path, candidate)
    result = compare_models(s_orig, s_cand, feeds, choice, metric_fn, threads)
    if latency:
        timing = compare_latency(s_orig, s_cand, feeds[0], choice, warmup, repeats, threads)
        result.latency_before = timing.before
        result.latency_after = timing.after
        result.speedup = timing.speedup
    return result


# --------------------------------------------------------------------------------------------
# Display


def _fmt(value: float | None, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return format(value, spec)


def format_table(result: ValidationResult):
    """A ``rich.table.Table`` of the result, for the ``validate`` command.

    One row per output (rel L2, max abs, cosine); the caption gives the top-1 agreement, the
    metric and the latency when present.
    """
    from rich.table import Table

    title = f"Validation on {result.provider} ({result.inputs} input(s))"
    table = Table(title=title, min_width=len(title) + 4, caption_justify="left")
    table.add_column("output")
    table.add_column("rel L2", justify="right")
    table.add_column("max abs", justify="right")
    table.add_column("cosine", justify="right")
    for out in result.outputs:
        table.add_row(out.name, _fmt(out.rel_l2), _fmt(out.max_abs), _fmt(out.cosine, ".6f"))
    notes = []
    if result.top1_agreement is not None:
        notes.append(f"top-1 agreement {result.top1_agreement:.2%}")
    if result.metric is not None:
        notes.append(f"metric {result.metric:.4f}")
    if result.latency_before is not None and result.latency_after is not None:
        b, a = result.latency_before, result.latency_after
        notes.append(
            f"latency median {b.median_ms:.3f} -> {a.median_ms:.3f} ms, "
            f"speed-up x{_fmt(result.speedup, '.2f')}"
        )
        notes.append(f"latency p90 {b.p90_ms:.3f} -> {a.p90_ms:.3f} ms")
    if notes:
        table.caption = "\n".join(notes)
    return table
