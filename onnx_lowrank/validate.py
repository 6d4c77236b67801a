"""The ``validate`` command: compare a candidate model file with the original file.

Feeds come from calibration data or random inputs; the numbers are `onnx_lowrank.compare`'s,
the latency `onnx_lowrank.timing`'s. Both files are the user's: onnxruntime failing on either
is bad input (exit 2).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence

import onnx

from onnx_lowrank.compare import ValidationResult, compare_models
from onnx_lowrank.errors import InputError
from onnx_lowrank.images import ImageOptions
from onnx_lowrank.inputs import (
    RANDOM_COUNT,
    input_specs,
    load_calibration,
    parse_input_shapes,
    random_feeds,
    resolve_shapes,
)
from onnx_lowrank.metrics import Metric, load_metric
from onnx_lowrank.pins import parse_input_values, with_values, without_pinned
from onnx_lowrank.runtime import ProviderChoice, make_session, resolve_provider
from onnx_lowrank.timing import compare_latency

__all__ = ["format_table", "validate_models"]



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


def _label(model: str | os.PathLike | onnx.ModelProto, which: str) -> str:
    return f"the {which} model" if isinstance(model, onnx.ModelProto) else f"the {which} model {os.fspath(model)}"


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
    input_values: Iterable[str] | None = None,
) -> ValidationResult:
    """Validate a candidate against the original: numerics, optional metric, latency.

    Feeds come from ``calib`` (see `onnx_lowrank.inputs.load_calibration`; ``count`` caps
    the samples) or, without it, ``count`` (default `inputs.RANDOM_COUNT`) random feeds from
    ``seed`` with the shapes of `onnx_lowrank.inputs.resolve_shapes`. Sessions are created
    once, from the paths (external data is found next to each model), as timing sessions when
    ``latency`` is asked for, and reused for it, measured on the first feed with
    `onnx_lowrank.timing.compare_latency`. Both models are the user's (`InputError` when
    onnxruntime fails on either).

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
        input_values: ``--input-value`` strings: inputs pinned to a value in every feed (`pins`).

    Raises:
        InputError: any bad input (paths, shapes, calibration data, provider, metric, a model
            onnxruntime cannot load or run).
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

    values = parse_input_values(input_values, specs)
    free = without_pinned(specs, values)
    if calib is not None:
        feeds = load_calibration(calib, free, pinned, count, batch_size, image_options)
    else:
        shapes = resolve_shapes(free, pinned)
        feeds = random_feeds(free, shapes, count or RANDOM_COUNT, seed)
    feeds = with_values(feeds, values, specs)

    s_orig, s_cand = (make_session(model, choice, threads, produced=False, label=_label(model, which),
                                   timing=latency)
                      for model, which in ((original_path, "original"), (candidate_path, "candidate")))
    result = compare_models(s_orig, s_cand, feeds, choice, metric_fn, threads)
    if latency:
        timing = compare_latency(s_orig, s_cand, feeds[0], choice, warmup, repeats, threads)
        result.latency_before = timing.before
        result.latency_after = timing.after
        result.speedup = timing.speedup
    return result


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
