"""Per-layer decisions -> ``report.json``, ``report.md`` and PNG plots.

The report dict is the "Report contract" of ``design.md`` (built by
:func:`compression_report`)::

    {"tool_version": str, "input": str, "output": str, "settings": {...},
     "totals": {"macs_before": int, "macs_after": int, "params_before": int, "params_after": int},
     "layers": [{"name": str, "op": str, "method": str|null, "ranks": [int]|null,
                 "status": "rewritten"|"skipped"|"rolled_back", "reason": str|null,
                 "macs_before": int, "macs_after": int, "params_before": int, "params_after": int,
                 "weight_rel_error": float|null, "output_rel_error": float|null}],
     "folded": {"output_affine": int, "input_affine": int, "hard_swish": int},  (optional)
     "validation": null | {"provider": str, "inputs": int,
                           "outputs": [{"name": str, "rel_l2": float, "max_abs": float,
                                        "cosine": float}],
                           "top1_agreement": float|null,
                           "latency_ms": null | {"before": {"median": float, "p90": float},
                                                 "after": {"median": float, "p90": float}},
                           "speedup": float|null}}

:func:`validate_report` checks that shape by hand (no jsonschema) and names the first offending
path; :func:`write_report` validates, then writes every file atomically (temporary file in the
same folder + ``os.replace``); the PNG plots are drawn by `plots`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from onnx_lowrank.files import atomic_write_bytes
from onnx_lowrank import plots
from onnx_lowrank.fold import FoldCounts
from onnx_lowrank.intervals import bound_check, with_interval
from onnx_lowrank.plots import CURVE_PLOT_LAYERS, STATUSES

__all__ = [
    "REUSED_CALIBRATION_NOTE", "bound_text", "STATUSES", "ReportCurves", "compression_report", "markdown_report",
    "report_curves", "reused_calibration", "validate_report", "write_report",
]

logger = logging.getLogger(__name__)



@dataclasses.dataclass
class ReportCurves:
    """Per-layer curves behind the optional plots of :func:`write_report`.

    Attributes:
        spectra: layer name -> singular values (1-D, any order; sorted descending when drawn).
        error_curves: layer name -> ``(ranks, relative_errors)``, two 1-D arrays of equal length.
        chosen: layer name -> the rank that was chosen (marked on the error curve and spectrum).
        units: what the spectra measure: "weight", or the output error on calibration inputs.
    """

    spectra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    error_curves: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    chosen: dict[str, int] = dataclasses.field(default_factory=dict)
    units: str = "weight"


# --------------------------------------------------------------------------------------------
# Validation


_TOTALS_KEYS = ("macs_before", "macs_after", "params_before", "params_after")
_LAYER_COUNTS = ("macs_before", "macs_after", "params_before", "params_after")


def validate_report(report: dict) -> None:
    """Check `report` against the report contract of ``design.md``.

    Required keys must be present with the contract's types: ``int`` (not ``bool``, not
    negative) for MACs, parameters and ``validation.inputs``; finite ``float`` (an ``int`` is
    accepted as a JSON number) or ``None`` for errors; ``status`` one of :data:`STATUSES`;
    ``ranks`` a list of positive ints or ``None``; ``validation`` ``None`` or an object with
    ``provider``, ``inputs``, ``outputs``, ``top1_agreement``, ``latency_ms`` and ``speedup``.
    The validation numbers (``rel_l2``, ``max_abs``, ``cosine``, ``speedup``) may be ``None``,
    which is how :mod:`onnx_lowrank.compare` writes a non-finite value so the JSON stays
    standard; ``latency_ms`` may be ``None`` when latency was not measured. Extra keys
    (``"metric"``, ``"subgraph"``, ...) are allowed anywhere.

    Raises:
        ValueError: naming the first offending path, what was expected and what was found,
            e.g. ``layers[3].status: expected one of rewritten, skipped, rolled_back,
            found 'done'``.
    """
    _object(report, "report")
    for key in ("tool_version", "input", "output"):
        _string(_field(report, key, ""), key)
    _object(_field(report, "settings", ""), "settings")
    totals = _object(_field(report, "totals", ""), "totals")
    for key in _TOTALS_KEYS:
        _count(_field(totals, key, "totals"), f"totals.{key}")
    layers = _field(report, "layers", "")
    _array(layers, "layers")
    for index, layer in enumerate(layers):
        _check_layer(layer, f"layers[{index}]")
    folded = report.get("folded")
    if folded is not None:
        _object(folded, "folded")
        for key, count in folded.items():
            _count(count, f"folded.{key}")
    validation = _field(report, "validation", "")
    if validation is not None:
        _check_validation(validation, "validation")


def _check_layer(layer: Any, path: str) -> None:
    _object(layer, path)
    _string(_field(layer, "name", path), f"{path}.name")
    _string(_field(layer, "op", path), f"{path}.op")
    _optional(_string, _field(layer, "method", path), f"{path}.method")
    ranks = _field(layer, "ranks", path)
    if ranks is not None:
        _array(ranks, f"{path}.ranks", "a list of ints or null")
        for index, rank in enumerate(ranks):
            _count(rank, f"{path}.ranks[{index}]", minimum=1)
    status = _field(layer, "status", path)
    if not isinstance(status, str) or status not in STATUSES:
        raise ValueError(f"{path}.status: expected one of {', '.join(STATUSES)}, "
                         f"found {_found(status)}")
    _optional(_string, _field(layer, "reason", path), f"{path}.reason")
    for key in _LAYER_COUNTS:
        _count(_field(layer, key, path), f"{path}.{key}")
    for key in ("weight_rel_error", "output_rel_error"):
        _optional(_number, _field(layer, key, path), f"{path}.{key}")


def _check_validation(validation: Any, path: str) -> None:
    _object(validation, path, "an object or null")
    _string(_field(validation, "provider", path), f"{path}.provider")
    _count(_field(validation, "inputs", path), f"{path}.inputs")
    outputs = _field(validation, "outputs", path)
    _array(outputs, f"{path}.outputs")
    for index, output in enumerate(outputs):
        where = f"{path}.outputs[{index}]"
        _object(output, where)
        _string(_field(output, "name", where), f"{where}.name")
        for key in ("rel_l2", "max_abs", "cosine"):
            _optional(_number, _field(output, key, where), f"{where}.{key}")
    _optional(_number, _field(validation, "top1_agreement", path), f"{path}.top1_agreement")
    for key in ("top1_ci95", "metric_ci95"):
        interval = validation.get(key)
        if interval is not None:
            _array(interval, f"{path}.{key}")
            if len(interval) != 2:
                raise ValueError(f"{path}.{key}: expected [low, high], found {_found(interval)}")
            for index, bound in enumerate(interval):
                _number(bound, f"{path}.{key}[{index}]")
    latency = _field(validation, "latency_ms", path)
    if latency is not None:
        _object(latency, f"{path}.latency_ms", "an object or null")
        for side in ("before", "after"):
            stats = _object(_field(latency, side, f"{path}.latency_ms"), f"{path}.latency_ms.{side}")
            for key in ("median", "p90"):
                _number(_field(stats, key, f"{path}.latency_ms.{side}"),
                        f"{path}.latency_ms.{side}.{key}")
    _optional(_number, _field(validation, "speedup", path), f"{path}.speedup")


def _found(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}" if not isinstance(value, str) else text


def _field(mapping: Mapping, key: str, path: str) -> Any:
    if key not in mapping:
        where = f"{path}.{key}" if path else key
        raise ValueError(f"{where}: missing required key")
    return mapping[key]


def _object(value: Any, path: str, expected: str = "an object") -> Mapping:
    if not isinstance(value, Mapping):
        raise ValueError(  # noqa: TRY004 (the contract: ValueError)
            f"{path}: expected {expected}, found {_found(value)}")
    return value


def _array(value: Any, path: str, expected: str = "a list") -> None:
    if not isinstance(value, list | tuple):
        raise ValueError(  # noqa: TRY004 (the contract: ValueError)
            f"{path}: expected {expected}, found {_found(value)}")


def _string(value: Any, path: str) -> None:
    if not isinstance(value, str):
        raise ValueError(  # noqa: TRY004 (the contract: ValueError)
            f"{path}: expected str, found {_found(value)}")


def _count(value: Any, path: str, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(  # noqa: TRY004 (the contract: ValueError)
            f"{path}: expected int, found {_found(value)}")
    if value < minimum:
        raise ValueError(f"{path}: expected an int >= {minimum}, found {value}")


def _number(value: Any, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(  # noqa: TRY004 (the contract: ValueError)
            f"{path}: expected float, found {_found(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{path}: expected a finite float (JSON has no NaN/inf; use null), "
                         f"found {value}")


def _optional(check, value: Any, path: str) -> None:
    if value is not None:
        try:
            check(value, path)
        except ValueError as exc:
            raise ValueError(str(exc).replace(": expected ", ": expected null or ", 1)) from None


# --------------------------------------------------------------------------------------------
# Writing


def write_report(report: dict, folder: str | os.PathLike,
                 curves: ReportCurves | None = None) -> list[pathlib.Path]:
    """Validate `report` and write it to `folder` as JSON, Markdown and PNG plots.

    Files (each written atomically: a temporary file in `folder`, then ``os.replace``):

    * ``report.json``: the report, ``indent=2``, standard JSON (no NaN);
    * ``report.md``: input/output/settings, a totals table (before, after, after/before for
      MACs and parameters), the validation summary (or "not validated") and a per-layer table,
      rewritten layers first by MACs saved, then rolled-back, then skipped layers;
    * ``macs_per_layer.png``: MACs before vs after, horizontal bars, the
      :data:`MACS_PLOT_LAYERS` layers with the most MACs before;
    * with `curves`: ``spectra.png`` (singular values / the largest one, log scale) when
      ``curves.spectra`` is not empty and ``error_vs_rank.png`` (relative error vs rank, chosen
      rank marked) when ``curves.error_curves`` is not empty, each for up to
      :data:`CURVE_PLOT_LAYERS` layers, the ones with the most MACs before.

    `folder` is created if needed. Files of a previous report in the same folder that this call
    does not write (e.g. ``spectra.png`` when `curves` is None now) are left as they are.

    Returns:
        The paths written, in the order above.

    Raises:
        ValueError: `report` breaks the contract (see :func:`validate_report`) or a curve is
            malformed (not 1-D, ranks and errors of different lengths).
    """
    validate_report(report)
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    written.append(atomic_write_bytes(folder / "report.json", text.encode("utf-8")))
    written.append(atomic_write_bytes(folder / "report.md", markdown_report(report).encode("utf-8")))
    written.append(plots.save(plots.macs_figure(report["layers"]), folder / "macs_per_layer.png"))
    if curves is not None:
        sizes = {layer["name"]: layer["macs_before"] for layer in report["layers"]}
        if curves.spectra:
            written.append(plots.save(plots.spectra_figure(curves, sizes), folder / "spectra.png"))
        if curves.error_curves:
            written.append(plots.save(plots.error_figure(curves, sizes), folder / "error_vs_rank.png"))
    logger.info("report written to %s (%d files)", folder, len(written))
    return written


# --------------------------------------------------------------------------------------------
# Markdown


def markdown_report(report: dict) -> str:
    """The ``report.md`` text of a (valid) report dict."""
    lines = ["# onnx-lowrank compression report", "",
             f"- Input: `{report['input']}`",
             f"- Output: `{report['output']}`",
             f"- Tool version: {report['tool_version']}", ""]
    settings = report["settings"]
    if settings:
        lines += ["<details><summary>Settings</summary>", "",
                  "| setting | value |", "|---|---|"]
        lines += [f"| {_cell(key)} | {_cell(_setting(value))} |" for key, value in settings.items()]
        lines += ["", "</details>", ""]
    totals = report["totals"]
    lines += ["## Totals", "", "| | before | after | after / before |", "|---|--:|--:|--:|"]
    for title, key in (("MACs", "macs"), ("Parameters", "params")):
        before, after = totals[f"{key}_before"], totals[f"{key}_after"]
        lines.append(f"| {title} | {before:,} | {after:,} | {_ratio(after, before)} |")
    folded = report.get("folded") or {}
    if any(folded.values()):
        lines += ["", f"Folded exactly before factorizing: {FoldCounts.from_report(folded).describe()}."]
    lines += ["", "## Validation", ""]
    lines += _validation_lines(report["validation"])
    lines += ["", "## Layers", ""]
    lines += _layer_lines(report["layers"])
    return "\n".join(lines) + "\n"


def reused_calibration(settings: Mapping) -> bool:
    """Whether a report's validation ran on the calibration inputs its data-aware fit was made on
    (``--calib`` without ``--eval``): numbers there are optimistic, held-out inputs are not."""
    return bool(settings.get("calib")) and bool(settings.get("data_aware", True)) and not settings.get("eval")


#: What the CLI and report.md add when `reused_calibration` holds (``validation.on_fit_inputs``).
REUSED_CALIBRATION_NOTE = ("measured on the calibration inputs the fit was made on, so optimistic; "
                           "--eval measures on held-out inputs")


def bound_text(check: dict | None) -> str:
    """What report.md and the CLI say of a --min-metric bound (`intervals.bound_check`)."""
    if check is None:
        return ""
    text = f"; --min-metric {check['bound']:g} {'met' if check['met'] else 'missed'}"
    return text + (", but its 95 % interval straddles the bound: more inputs would tell" if check["straddles"] else "")


def _validation_lines(validation: dict | None) -> list[str]:
    if validation is None:
        return ["Not validated."]
    lines = [f"Provider `{validation['provider']}`, {validation['inputs']} samples"
             + (f" ({REUSED_CALIBRATION_NOTE})." if validation.get("on_fit_inputs") else "."), ""]
    if validation["outputs"]:
        lines += ["| output | cosine | rel L2 | max abs | rel L2 before the activation |", "|---|--:|--:|--:|--:|"]
        for output in validation["outputs"]:
            before = output.get("before_activation")
            lines.append(f"| {_cell(output['name'])} | {_float(output['cosine'], '.6f')} | "
                         f"{_float(output['rel_l2'], '.3e')} | {_float(output['max_abs'], '.3e')} | "
                         + (f"{_float(before['rel_l2'], '.3e')} ({before['activation']} input "
                            f"`{_cell(before['tensor'])}`) |" if before else "- |"))
        lines.append("")
    lines.append(f"- Top-1 agreement: {with_interval(validation['top1_agreement'], validation.get('top1_ci95'))}")
    if "metric" in validation:
        lines.append(f"- Metric: {with_interval(validation['metric'], validation.get('metric_ci95'))}"
                     + bound_text(validation.get("metric_bound")))
    latency = validation["latency_ms"]
    if latency is None:
        lines.append("- Latency: not measured")
    else:
        lines += ["", "| latency (ms) | median | p90 |", "|---|--:|--:|"]
        for side in ("before", "after"):
            lines.append(f"| {side} | {latency[side]['median']:.4g} | {latency[side]['p90']:.4g} |")
        lines += ["", f"Speed-up (median before / after): {_float(validation['speedup'], '.3f', 'x')}"]
    return lines


_STATUS_ORDER = {"rewritten": 0, "rolled_back": 1, "skipped": 2}


def _layer_order(layers: Sequence[dict]) -> list[dict]:
    """Rewritten layers by MACs saved (most first), then rolled back, then skipped (as found)."""
    def key(item):
        index, layer = item
        saved = layer["macs_before"] - layer["macs_after"] if layer["status"] == "rewritten" else 0
        return _STATUS_ORDER[layer["status"]], -saved, index
    return [layer for _, layer in sorted(enumerate(layers), key=key)]


def _layer_lines(layers: Sequence[dict]) -> list[str]:
    if not layers:
        return ["No layers found."]
    counts = {status: sum(layer["status"] == status for layer in layers) for status in STATUSES}
    lines = [", ".join(f"{counts[s]} {s.replace('_', ' ')}" for s in STATUSES) + ".", "",
             ("| layer | op | method | ranks | status | MACs before | MACs after | MACs saved "
              "| params before | params after | weight rel err | output rel err | reason |"),
             "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    for layer in _layer_order(layers):
        ranks = "×".join(str(r) for r in layer["ranks"]) if layer["ranks"] else ""
        saved = layer["macs_before"] - layer["macs_after"]
        lines.append(
            f"| {_cell(layer['name'])} | {_cell(layer['op'])} | {_cell(layer['method'] or '')} "
            f"| {ranks} | {layer['status'].replace('_', ' ')} | {layer['macs_before']:,} "
            f"| {layer['macs_after']:,} | {saved:,} | {layer['params_before']:,} "
            f"| {layer['params_after']:,} | {_float(layer['weight_rel_error'], '.3e', empty='')} "
            f"| {_float(layer['output_rel_error'], '.3e', empty='')} "
            f"| {_cell(layer['reason'] or '')} |")
    return lines


def _cell(value: Any) -> str:
    """A Markdown table cell: one line, pipes escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _setting(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _float(value: float | None, spec: str, suffix: str = "", empty: str = "n/a") -> str:
    return empty if value is None else f"{format(value, spec)}{suffix}"


def _ratio(after: int, before: int) -> str:
    if before == 0:
        return "n/a"
    share = after / before
    text = f"{share:.1%}"
    if after > 0 and after < before:
        text += f" ({before / after:.2f}x fewer)"
    return text


def compression_report(result, input_path: str, output_path: str) -> dict:
    """The report contract of design.md for a `CompressionResult`.

    Beyond the contract, ``validation.on_fit_inputs`` tells a pipeline reading the JSON what the
    CLI and report.md say in words: the numbers were measured on the calibration inputs the
    data-aware fit was made on (`reused_calibration`), so they are optimistic; ``inputs`` says
    how many samples were loaded from where (and when the default cap cut the calibration set)."""
    from onnx_lowrank import __version__

    before = result.totals_before
    after = result.totals_after or result.totals_before
    settings = result.settings.to_dict()
    validation = None
    if result.validation is not None:
        validation = {**result.validation.to_dict(), "on_fit_inputs": reused_calibration(settings)}
        if result.settings.min_metric is not None:
            validation["metric_bound"] = bound_check(validation["metric"], validation["metric_ci95"],
                                                     result.settings.min_metric)
    return {"tool_version": __version__, "input": str(input_path), "output": str(output_path),
            "settings": settings,
            "totals": {"macs_before": before["macs"], "macs_after": after["macs"],
                       "params_before": before["params"], "params_after": after["params"],
                       **({"counting": result.counting} if result.counting else {})},
            "layers": [layer.to_dict() for layer in result.layers],
            "folded": dataclasses.asdict(result.folds),
            "inputs": next((t.result.summary for t in result.timings if t.name == "inputs"), None),
            "validation": validation}


def report_curves(workspace, count: int = CURVE_PLOT_LAYERS) -> ReportCurves:
    """Spectra and relative-error-versus-rank curves of the `count` largest factorized layers.

    The spectrum is the one the ranks were chosen from: the budget's (output-error spectra on
    the calibration inputs in a data-aware run, `Workspace.curves`), else the weight's spectrum
    of the first factorized mode. The error at rank r is the relative Frobenius error of
    truncating it there, `sqrt(Σ_{i>r} σ_i² / Σ σ_i²)` (Eckart–Young), groups pooled.
    """
    from onnx_lowrank import ranks
    from onnx_lowrank.methods import MethodSet

    settings = workspace.settings
    methods = MethodSet(settings)
    measured = bool(workspace.spectra)
    curves = ReportCurves(units="output error on the calibration inputs" if measured else "weight")
    factorized = [d for d in workspace.decisions.values() if d.ranks and d.method and methods[d.method].ranked]
    for decision in sorted(factorized, key=lambda d: -(d.layer.macs or 0))[:count]:
        layer = decision.layer
        spectrum = workspace.curves.get(layer.name, {}).get(decision.method)
        if spectrum is None:
            spectrum = methods[decision.method].spectra(layer)[0]
        grid = np.arange(1, min(spectrum.shape) + 1)
        curves.spectra[layer.name] = np.sqrt(spectrum.pooled_energy())
        curves.error_curves[layer.name] = (grid, np.sqrt(ranks.svd_error_curve(spectrum, grid)))
        curves.chosen[layer.name] = int(decision.ranks[0])
    return curves
