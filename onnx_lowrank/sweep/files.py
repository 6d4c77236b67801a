"""A sweep's files: the kept models, sweep.json, sweep.md and pareto.png (and, for several models,
an index of them), each written atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence

from onnx_lowrank.files import atomic_write_bytes
from onnx_lowrank.intervals import with_interval
from onnx_lowrank.model import save_model
from onnx_lowrank.plots import save
from onnx_lowrank.sweep.points import SweepPoint
from onnx_lowrank.sweep.result import SweepResult

__all__ = ["markdown", "point_file", "write_index", "write_models", "write_sweep"]


def point_file(name: str, point: SweepPoint) -> str:
    """The file name of a point's model: ``<model>-<method>-<target>.onnx``."""
    return f"{name}-{point.method}-{point.target:g}.onnx"


def write_models(points: Sequence[SweepPoint], outcomes: Sequence, kept: Sequence[int], name: str,
                 folder: str | os.PathLike) -> list[SweepPoint]:
    """Save the models of the points at `kept` into `folder` (created if needed); the points
    with their `file` set."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    points = list(points)
    for index in kept:
        points[index] = dataclasses.replace(points[index], file=point_file(name, points[index]))
        save_model(outcomes[index].model, folder / points[index].file)
    return points


def write_sweep(result: SweepResult, folder: str | os.PathLike) -> list[pathlib.Path]:
    """sweep.json (`SweepResult.to_dict`), sweep.md (`markdown`) and pareto.png in `folder`."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n"
    return [atomic_write_bytes(folder / "sweep.json", text.encode()),
            atomic_write_bytes(folder / "sweep.md", markdown(result).encode()),
            save(result.figure(), folder / "pareto.png")]


def write_index(results: Sequence[SweepResult], folder: str | os.PathLike) -> list[pathlib.Path]:
    """For a sweep of several models: sweep.json (``{"models": [each model's sweep.json]}``) and
    sweep.md (one line per model: its points, frontier and pick) in `folder`."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"models": [r.to_dict() for r in results]}, indent=2, allow_nan=False) + "\n"
    lines = ["# onnx-lowrank sweep", "", "| model | points | on the frontier | picked | details |", "|---|--:|--:|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {sum(p.ok for p in r.points)} of {len(r.points)} | {len(r.frontier)} | "
                     f"{_picked(r)} | [{r.name}/sweep.md]({r.name}/sweep.md) |")
    return [atomic_write_bytes(folder / "sweep.json", text.encode()),
            atomic_write_bytes(folder / "sweep.md", ("\n".join(lines) + "\n").encode())]


def _picked(result: SweepResult) -> str:
    if result.options.min_metric is None:
        return "-"
    best = result.best
    if best is None:
        return f"none keeps {result.quality} >= {result.options.min_metric:g}"
    return f"{best.label} (x{_number(best.speed, '.2f')}, {result.quality} {_number(getattr(best, result.quality), '.4f')})"


def markdown(result: SweepResult) -> str:
    """The sweep.md text: what was swept, the costs, and one table row per point."""
    timing = (f"latency measured on {result.provider} ({result.device}), all points in one interleaved run; "
              f"the original's median {result.original_latency.median_ms:.4g} ms"
              if result.original_latency is not None else "latency not measured: speed is 1 / MACs kept")
    stats = result.statistics
    lines = [f"# Sweep of {result.name}", "", f"- Model: `{result.source}`",
             f"- Targets (MACs kept): {', '.join(f'{t:g}' for t in result.options.targets)}; methods: "
             f"{', '.join(result.options.methods)}",
             f"- Frontier: {result.quality} against speed-up; {timing}",
             f"- Shared statistics: {stats['calibration_walks']} calibration walk(s) and {stats['output_gain_runs']} "
             f"output-gain run(s) of the original for {len(result.points)} points ({stats['seconds']:.1f} s)",
             f"- Time: points {result.seconds['points']:.1f} s, timing run {result.seconds['timing']:.1f} s, in all "
             f"{result.seconds['total']:.1f} s ({result.executor} executor)"]
    if result.options.min_metric is not None:
        lines.append(f"- Picked (fastest with {result.quality} >= {result.options.min_metric:g}): {_picked(result)}")
    if any(p.on_fit_inputs for p in result.points):
        lines.append("- Measured on the calibration inputs the fit was made on, so optimistic; --eval measures on "
                     "held-out inputs")
    lines += ["", "| target | method | MACs kept | params kept | speed-up | metric | top-1 agreement | worst cosine "
              "| compress s | Pareto | file |", "|--:|---|--:|--:|--:|--:|--:|--:|--:|---|---|"]
    for point in result.points:
        if not point.ok:
            lines.append(f"| {point.target:g} | {point.method} | | | | | | | {point.compress_seconds:.1f} | | "
                         f"{point.error.replace('|', '/')} |")
            continue
        lines.append(
            f"| {point.target:g} | {point.method} | {point.macs_kept:.3f} | {point.params_kept:.3f} | "
            f"{_number(point.speedup, '.2f')} | {with_interval(point.metric, point.metric_ci95)} | "
            f"{with_interval(point.top1_agreement, point.top1_ci95)} | {_number(point.cosine, '.5f')} | "
            f"{point.compress_seconds:.1f} | {'yes' if point.pareto else ''} | {point.file or ''} |")
    return "\n".join(lines) + "\n"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
