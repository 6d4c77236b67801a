"""Timed runs of onnxruntime sessions: the `Runner`, latency statistics, end-to-end comparison,
and the device the times are for.

One protocol for every timing in the tool (end to end here, per layer in `onnx_lowrank.latency`):

* On CPU a run is ``session.run`` on a fixed feed, timed with ``perf_counter_ns``.
* On CUDA/TensorRT the inputs are copied to the device once and the outputs are bound to it
  (IO binding), so the time is the model's, not the PCIe copies'; the clock is read after
  ``synchronize_outputs()``, i.e. after the device has finished. The session is a timing session
  (`onnx_lowrank.runtime.execution_providers`: exhaustive cuDNN algorithm search by default) and
  the `Runner` runs it once, untimed, when it is made, so the algorithm search and TensorRT's
  engine build happen before any warm-up run is counted.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from onnx_lowrank.errors import InputError
from onnx_lowrank.runtime import (
    CPU, CUDA, TENSORRT, ModelLike, ProviderChoice, Session, make_session, provider_name,
    resolve_provider,
)

__all__ = [
    "LatencyComparison", "LatencyStats", "Runner", "check_counts", "compare_latency", "device_name",
    "interleaved_latency",
]

logger = logging.getLogger(__name__)


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


class Runner:
    """One timed run of a session on a fixed feed (see the module docstring).

    Attributes:
        session: the `Session` it runs.
        binding: the IO binding on a CUDA device, else None.
    """

    def __init__(self, session: Session, feed: Mapping[str, np.ndarray], io_binding: bool = True):
        self.session = session
        inputs = {i.name for i in session.get_inputs()}
        self.feed = {k: np.ascontiguousarray(v) for k, v in feed.items() if k in inputs}
        self.binding = None
        if io_binding and session.provider in (CUDA, TENSORRT):
            binding = session.io_binding()
            self._device_inputs = []
            for name, value in self.feed.items():
                ortvalue = ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0)
                self._device_inputs.append(ortvalue)  # keep the device copies alive
                binding.bind_ortvalue_input(name, ortvalue)
            for out in session.get_outputs():
                binding.bind_output(out.name, "cuda", 0)
            binding.synchronize_inputs()
            self.binding = binding
            self()  # cuDNN's algorithm search and TensorRT's engine build happen here, untimed

    def __call__(self) -> float:
        """Run once; return the wall time in milliseconds."""
        session = self.session.inner
        if self.binding is not None:
            start = time.perf_counter_ns()
            session.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()
            stop = time.perf_counter_ns()
        else:
            start = time.perf_counter_ns()
            session.run(None, self.feed)
            stop = time.perf_counter_ns()
        return (stop - start) / 1e6


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


@functools.cache
def _gpu_name() -> str:
    """The first GPU's name from nvidia-smi (what CUDA device 0 usually is), else ``cuda``."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "cuda"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    command = [exe, "--query-gpu=name", "--format=csv,noheader"]
    if visible:
        command.insert(1, f"--id={visible}")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "cuda"
    names = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return names[0] if done.returncode == 0 and names else "cuda"


def device_name(provider: str | ProviderChoice = "cpu") -> str:
    """What the provider runs on: the CPU model and logical CPU count, or the GPU's name.

    CPU: ``"model name"`` of /proc/cpuinfo (else `platform.processor()`), e.g.
    ``"AMD EPYC 9R14 (2 logical CPUs)"``. CUDA/TensorRT: the name nvidia-smi gives for the
    first visible GPU, or ``"cuda"`` when it cannot be asked.
    """
    name = provider_name(provider)
    if name == CPU:
        return f"{_cpu_model()} ({os.cpu_count()} logical CPUs)"
    if name in (CUDA, TENSORRT):
        return _gpu_name()
    return name


def check_counts(warmup: int, repeats: int) -> None:
    """Raise `InputError` unless ``warmup >= 0`` and ``repeats >= 1``."""
    if warmup < 0:
        raise InputError(f"latency warm-up runs must be >= 0, found {warmup}")
    if repeats < 1:
        raise InputError(f"latency repeats must be >= 1, found {repeats}")


def compare_latency(
    original: ModelLike | Session,
    candidate: ModelLike | Session,
    feed: Mapping[str, np.ndarray],
    provider: str | ProviderChoice = "auto",
    warmup: int = 10,
    repeats: int = 50,
    threads: int | None = None,
    io_binding: bool = True,
    *,
    candidate_produced: bool = False,
) -> LatencyComparison:
    """Latency of both models in one process, interleaved (`interleaved_latency`):
    ``speedup = median_before / median_after``. `candidate_produced`: the candidate is the
    tool's own product (see `onnx_lowrank.runtime.make_session`); the original is always the user's.
    """
    choice = resolve_provider(provider)
    (before, after), provider_used = interleaved_latency(
        [original, candidate], feed, choice, warmup, repeats, threads, io_binding,
        produced=[False, candidate_produced], labels=["the original model", "the candidate model"])
    speedup = before.median_ms / after.median_ms if after.median_ms > 0 else math.inf
    logger.info("latency on %s: %.3f ms -> %.3f ms (x%.2f)", provider_used, before.median_ms,
                after.median_ms, speedup)
    return LatencyComparison(before, after, speedup, provider_used)


def interleaved_latency(
    models: Sequence[ModelLike | Session],
    feed: Mapping[str, np.ndarray],
    provider: str | ProviderChoice = "auto",
    warmup: int = 10,
    repeats: int = 50,
    threads: int | None = None,
    io_binding: bool = True,
    *,
    produced: Sequence[bool],
    labels: Sequence[str],
) -> tuple[list[LatencyStats], str]:
    """Latency of several models in one process, interleaved, and the provider that ran them.

    After ``warmup`` runs of each, every round runs each model once, in order on even rounds and
    in reverse order on odd ones (two models: AB, BA, AB, ...), so drifts in clock speed, heat or
    background load hit all alike. `produced[i]`: model i is the tool's own product;
    `labels[i]`: how errors name it.
    """
    check_counts(warmup, repeats)
    choice = resolve_provider(provider)
    sessions = [make_session(model, choice, threads, produced=made, label=label, timing=True)
                for model, made, label in zip(models, produced, labels, strict=True)]
    runners = [Runner(session, feed, io_binding) for session in sessions]
    for runner in runners:
        for _ in range(warmup):
            runner()
    samples: list[list[float]] = [[] for _ in runners]
    forward = list(range(len(runners)))
    for i in range(repeats):
        for which in (forward if i % 2 == 0 else forward[::-1]):
            samples[which].append(runners[which]())
    return [LatencyStats.from_samples(times) for times in samples], sessions[0].provider
