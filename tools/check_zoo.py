#!/usr/bin/env python3
"""Check onnx-lowrank on the real pretrained models of ``models/zoo.toml``, at full rank.

For each zoo model (all by default) and each method (svd, spatial-svd, tiled-svd, tucker2, cp,
cp-depthwise):

1. ``onnx_lowrank.api.inspect`` with the zoo's ``input_shape`` hints: layer count, candidates,
   total MACs and parameters, histogram of skip reasons. The MACs of every main-graph layer are
   checked against an independent count from the shapes one onnxruntime run actually produces.
2. The compression passes (canonicalize, find layers, factorize at ``RankRatio(1.0)`` with MAC
   savings NOT required, rewrite, count), so every candidate is rewritten at full rank (tiled-svd
   skips, with a reason, layers whose channels the 2x2 tiles do not divide). The rewritten model's
   MACs are checked the same independent way.
3. Original and rewritten model in onnxruntime (CPU) on ``--feeds`` random inputs; per output the
   relative L2 error ``||a-b|| / ||a||`` (``onnx_lowrank.compare.compare_models``), plus each
   rewritten layer's own output error on its original inputs (``passes.layer_output_errors``),
   which points at the layer when the end-to-end error is too high.
4. Each step timed.

Full rank is exact for svd, spatial-svd, tiled-svd and tucker2 up to float32 rounding; CP at
rank ``max(T/g, S/g)`` is not exact in general, so its error is only reported.

Usage::

    python tools/check_zoo.py [--models a,b] [--methods svd,tucker2] [--out FILE.md]
                              [--feeds 2] [--cp-time-limit 25] [--threads 2]

Inputs that random feeds would make meaningless are fixed per model in ``FEED_OVERRIDES``
(silero's sample rate ``sr`` = 16000, BERT's attention mask all ones and token types zero).
Exit status: 0 when every run finished without an exception and every exact method stayed
under ``--tolerance``; 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import math
import pathlib
import sys
import time
import traceback

import numpy as np
import onnx
import onnxruntime as ort
from benchlib.inference import session
from benchlib.zoo import sigmoid_inputs, with_outputs, zoo_feeds
from fetch_models import fetch, load_zoo

from onnx_lowrank import api, compare, factorize
from onnx_lowrank.config import Settings
from onnx_lowrank.graph import canonicalize, find_layers
from onnx_lowrank.shapes import infer_shapes
from onnx_lowrank.methods import MethodSet, method_names
from onnx_lowrank.model import load_model
from onnx_lowrank.passes import (
    CanonicalizePass, CountPass, FactorizePass, FindLayersPass, Pipeline, RewritePass, Workspace,
)
from onnx_lowrank.passes.guard import layer_output_errors
from onnx_lowrank.ranks import RankRatio

EXACT_METHODS = ("svd", "spatial-svd", "tiled-svd", "tucker2")
COSTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass
class Row:
    model: str
    method: str
    layers: int = 0
    candidates: int = 0
    rewritten: int = 0
    macs_before: int = 0
    macs_after: int | None = None
    params_before: int = 0
    params_after: int | None = None
    max_rel_l2: float | None = None
    worst_output: str = ""
    pre_sigmoid: float | None = None
    worst_layer: str = ""
    worst_layer_error: float | None = None
    t_inspect: float = 0.0
    t_rewrite: float = 0.0
    t_validate: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)
    failed: bool = False


def independent_macs(model: onnx.ModelProto, feed: dict) -> dict[str, int]:
    """MACs of every main-graph Conv/ConvTranspose/Gemm/MatMul from the shapes onnxruntime produces."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    nodes = [n for n in model.graph.node if n.op_type in COSTED and n.domain in ("", "ai.onnx")]
    wanted = list(dict.fromkeys(name for node in nodes for name in (*node.input[:2], node.output[0])
                                if name in produced))
    probe = session(with_outputs(model, wanted).SerializeToString(), log_severity=4,
                    graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    feed = {k: v for k, v in feed.items() if k in {i.name for i in probe.get_inputs()}}
    shapes = dict(zip(wanted, (v.shape for v in probe.run(wanted, feed))))
    shapes.update(inits)
    macs = {}
    for node in nodes:
        a, w, y = (shapes.get(t) for t in (*node.input[:2], node.output[0]))
        if node.op_type == "Conv":
            macs[node.name] = math.prod(y) * math.prod(w[1:])
        elif node.op_type == "ConvTranspose":
            macs[node.name] = math.prod(a) * math.prod(w[1:])
        elif node.op_type == "Gemm":
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            macs[node.name] = math.prod(y) * (a[0] if trans_a else a[-1])
        else:
            macs[node.name] = math.prod(y) * (a[-1] if len(a) > 1 else a[0])
    return macs


def check_macs(row: Row, layers, model: onnx.ModelProto, feed: dict, which: str) -> None:
    try:
        truth = independent_macs(model, feed)
    except Exception as exc:  # noqa: BLE001 - reported, the rest of the check goes on
        row.notes.append(f"independent MAC count of the {which} model failed: {str(exc).splitlines()[0]}")
        return
    for layer in layers:
        if layer.subgraph is not None or layer.name not in truth:
            continue
        if (layer.macs or 0) != truth[layer.name]:
            row.notes.append(f"MACs of {which} {layer.name}: tool {layer.macs}, onnxruntime shapes {truth[layer.name]}")
            row.failed = True


def inspect_step(row: Row, path: pathlib.Path, shapes: list[str], feed: dict) -> api.InspectResult:
    """`api.inspect` of the model; its layers' MACs checked against `independent_macs`."""
    start = time.perf_counter()
    inspected = api.inspect(str(path), shapes)
    row.t_inspect = time.perf_counter() - start
    row.layers = len(inspected.layers)
    row.candidates = sum(layer.candidate for layer in inspected.layers)
    row.macs_before = inspected.totals["macs"]
    row.params_before = inspected.totals["params"]
    check_macs(row, inspected.layers, canonicalize(load_model(path)), feed, "original")
    return inspected


def skip_histogram(layers) -> collections.Counter:
    return collections.Counter(layer.skip_reason or "candidate" for layer in layers)


def rewrite_step(row: Row, model: onnx.ModelProto, method: str, shapes: list[str]) -> Workspace:
    """Every candidate factorized at full rank (`RankRatio(1.0)`, MAC savings not required) and rewritten."""
    settings = Settings(method=method, input_shape=tuple(shapes))
    ws = Workspace(original=model, model=model, settings=settings)
    start = time.perf_counter()
    Pipeline([CanonicalizePass(), FindLayersPass(),
              FactorizePass(MethodSet(settings), method, RankRatio(1.0), require_savings=False),
              RewritePass(), CountPass()]).run(ws)
    row.t_rewrite = time.perf_counter() - start
    row.rewritten = len(ws.rewritten)
    if ws.rewritten:
        row.macs_after = ws.totals_after["macs"]
        row.params_after = ws.totals_after["params"]
    else:
        row.macs_after, row.params_after = row.macs_before, row.params_before
    dropped = collections.Counter(
        d.reason for d in ws.decisions.values() if d.layer.candidate and d.status != "rewritten")
    for reason, count in dropped.items():
        row.notes.append(f"{count} candidate(s) not rewritten: {reason}")
    planned = sum((d.macs_after if d.status == "rewritten" else (d.layer.macs or 0))
                  for d in ws.decisions.values())
    if ws.rewritten and planned != row.macs_after:
        row.notes.append(f"planned MACs {planned:,} differ from the counted {row.macs_after:,}")
        row.failed = True
    return ws


def validate_step(row: Row, ws: Workspace, feeds: list[dict], threads: int, tolerance: float) -> None:
    start = time.perf_counter()
    result = compare.compare_models(ws.original, ws.model, feeds, provider="cpu", threads=threads)
    worst = max(result.outputs, key=lambda o: o.rel_l2 if np.isfinite(o.rel_l2) else np.inf)
    row.max_rel_l2 = worst.rel_l2
    row.worst_output = worst.name
    judged = row.max_rel_l2
    pre = sigmoid_inputs(ws.canonical)
    if pre and ws.rewritten:
        extra = sorted(set(pre.values()))
        both = compare.compare_models(with_outputs(ws.canonical, extra), with_outputs(ws.model, extra),
                                      feeds, provider="cpu", threads=threads)
        errors = {o.name: o.rel_l2 for o in both.outputs}
        row.pre_sigmoid = max(errors[n] for n in extra)
        judged = max([errors[n] for n in extra]
                     + [o.rel_l2 for o in result.outputs if o.name not in pre])
    if ws.rewritten:
        try:
            own = layer_output_errors(ws, feeds[:1], "cpu", threads)
            name = max(own, key=lambda n: own[n] if np.isfinite(own[n]) else np.inf)
            row.worst_layer, row.worst_layer_error = name, own[name]
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            row.notes.append(f"per-layer errors failed: {str(exc).splitlines()[0]}")
    row.t_validate = time.perf_counter() - start
    if row.method in EXACT_METHODS and not (judged <= tolerance):
        row.failed = True
        row.notes.append(f"output error {judged:.3g} over {tolerance:g}")


def check(name: str, entry: dict, methods: list[str], n_feeds: int, threads: int, tolerance: float,
          log) -> list[Row]:
    path = fetch(name)
    shapes = list(entry["input_shape"])
    model = load_model(path)
    feeds = zoo_feeds(name, model, shapes, n_feeds)
    rows = []
    histogram = None
    for method in methods:
        row = Row(name, method)
        rows.append(row)
        try:
            inspected = inspect_step(row, path, shapes, feeds[0])
            if histogram is None:
                histogram = skip_histogram(inspected.layers)
                log(f"## {name}: {row.layers} layers, {row.candidates} candidates, "
                    f"{row.macs_before:,} MACs, {row.params_before:,} params")
                for reason, count in histogram.most_common():
                    log(f"    {count:4d}  {reason}")
            ws = rewrite_step(row, model, method, shapes)
            if ws.rewritten:
                check_macs(row, _chain_layers(ws), ws.model, feeds[0], "rewritten")
            validate_step(row, ws, feeds, threads, tolerance)
        except Exception as exc:  # noqa: BLE001 - a failure is a result here
            row.failed = True
            row.notes.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            log(traceback.format_exc())
        log(f"  {name} {method}: {row.rewritten}/{row.candidates} rewritten, MACs {row.macs_before:,} -> "
            f"{row.macs_after if row.macs_after is None else format(row.macs_after, ',')}, "
            f"rel L2 {_fmt(row.max_rel_l2)} (pre-sigmoid {_fmt(row.pre_sigmoid)}), worst layer {row.worst_layer} {_fmt(row.worst_layer_error)}, "
            f"{row.t_inspect:.1f}+{row.t_rewrite:.1f}+{row.t_validate:.1f} s"
            + ("".join(f"\n      - {n}" for n in row.notes)))
    return rows


def _chain_layers(ws: Workspace):
    """Every layer of the rewritten model as CountPass finds them (for the independent MAC check)."""
    model = ws.model
    need = {t for n in model.graph.node if n.op_type in COSTED for t in (*n.input[:2], n.output[0])}
    return find_layers(model, infer_shapes(model, ws.pinned, need=need))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2e}"


def table(rows: list[Row]) -> str:
    lines = [("| model | method | rewritten / candidates (layers) | MACs before | MACs after (full rank) "
              "| params before | params after | max output rel L2 (output) | pre-sigmoid rel L2 "
              "| worst layer own rel L2 | s inspect / rewrite / validate | notes |"),
             "|---|---|---|---:|---:|---:|---:|---|---|---|---|---|"]
    for r in rows:
        after = "-" if r.macs_after is None else f"{r.macs_after:,}"
        p_after = "-" if r.params_after is None else f"{r.params_after:,}"
        notes = "; ".join(r.notes).replace("|", "/")
        status = "**FAIL** " if r.failed else ""
        lines.append(
            f"| {r.model} | {r.method} | {r.rewritten} / {r.candidates} ({r.layers}) | {r.macs_before:,} | {after} "
            f"| {r.params_before:,} | {p_after} | {_fmt(r.max_rel_l2)} ({r.worst_output}) "
            f"| {_fmt(r.pre_sigmoid)} | {_fmt(r.worst_layer_error)} {r.worst_layer} "
            f"| {r.t_inspect:.1f} / {r.t_rewrite:.1f} / {r.t_validate:.1f} | {status}{notes} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated zoo names (default: all)")
    parser.add_argument("--methods", default=",".join(method_names()), help="comma-separated methods")
    parser.add_argument("--out", help="write the Markdown table here too")
    parser.add_argument("--feeds", type=int, default=2, help="random inputs per model (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="max output rel L2 for the exact methods (default 1e-4)")
    parser.add_argument("--cp-time-limit", type=float, default=None,
                        help="seconds per layer for CP-ALS (default: the package's own)")
    args = parser.parse_args(argv)

    zoo = load_zoo()
    names = args.models.split(",") if args.models else list(zoo)
    unknown = [n for n in names if n not in zoo]
    methods = args.methods.split(",")
    bad = [m for m in methods if m not in method_names()]
    if unknown or bad:
        parser.error(f"unknown model(s) {unknown} or method(s) {bad}")
    if args.cp_time_limit is not None:
        for fn in ("cp", "cp_depthwise"):
            setattr(factorize, fn, functools.partial(getattr(factorize, fn), time_limit_s=args.cp_time_limit))

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    rows = []
    for name in names:
        rows += check(name, zoo[name], methods, args.feeds, args.threads, args.tolerance, log)
    text = table(rows)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
