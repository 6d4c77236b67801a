#!/usr/bin/env python3
"""What the exact element-wise folds (`onnx_lowrank.fold`) do to each zoo model, on the CPU provider.

For every model of ``models/zoo.toml`` (all by default): the canonical model and its folded copy
(nodes before/after, folds by rule), the largest relative L2 error of any output over random
feeds (pre-sigmoid where an output is a sigmoid, see ``benchlib.zoo.sigmoid_inputs``), and the
end-to-end latency of both, interleaved in one process (``benchlib.timing.interleaved``, medians).
Writes a Markdown table (``--out``, default docs/bench_fold.md).

Usage::

    OMP_NUM_THREADS=1 python tools/bench_fold.py [--models a,b] [--threads 1] [--repeats 200]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from benchlib import REPO, markdown, provenance, timing
from benchlib.zoo import sigmoid_inputs, with_outputs, zoo_feeds
from fetch_models import fetch, load_zoo

from onnx_lowrank import compare
from onnx_lowrank.fold import fold_elementwise
from onnx_lowrank.graph import canonicalize
from onnx_lowrank.model import load_model


def measure(name: str, entry: dict, threads: int, repeats: int) -> dict:
    """Fold one zoo model; its error and interleaved latency against the canonical original."""
    shapes = list(entry.get("input_shape", []))
    canonical = canonicalize(load_model(fetch(name)))
    folded, counts = fold_elementwise(canonical)
    row = {"model": name, "nodes_before": len(canonical.graph.node), "nodes_after": len(folded.graph.node),
           "output_affine": counts.output_affine, "input_affine": counts.input_affine,
           "hard_swish": counts.hard_swish}
    feeds = zoo_feeds(name, canonical, shapes, count=2)
    extra = sorted(set(sigmoid_inputs(canonical).values()))
    result = compare.compare_models(with_outputs(canonical, extra), with_outputs(folded, extra), feeds,
                                     provider="cpu", threads=threads)
    judged = [o for o in result.outputs if o.name in extra] + [
        o for o in result.outputs if o.name not in sigmoid_inputs(canonical)]
    row["max_rel_l2"] = max(o.rel_l2 for o in judged)
    if counts.total:
        latency = timing.interleaved(canonical, folded, feeds[0], threads, warmup=10, repeats=repeats)
        row.update(before_ms=latency.before.median_ms, after_ms=latency.after.median_ms, speedup=latency.speedup)
    return row


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    cells = [[r["model"], f"{r['nodes_before']} -> {r['nodes_after']}", f"{r['output_affine']} / {r['input_affine']}",
              str(r["hard_swish"]), f"{r['max_rel_l2']:.1e}",
              *([f"{r['before_ms']:.2f}", f"{r['after_ms']:.2f}", f"{r['speedup']:.2f}"] if "speedup" in r
                else ["-", "-", "nothing folded"])] for r in rows]
    return "\n".join(markdown.table(["model", "nodes before -> after", "affine folded (after conv / before conv)",
                                      "hard-swish fused", "max rel L2", "ms before", "ms after", "speed-up"],
                                     cells, "lllrrrrr"))


def main(argv=None) -> int:
    """Fold the zoo models, write docs/bench_fold.md; 1 when a fold changed an output by 1e-5 or more."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated zoo names (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200, help="interleaved timed runs per model")
    parser.add_argument("--out", default=str(REPO / "docs" / "bench_fold.md"))
    args = parser.parse_args(argv)
    zoo = load_zoo()
    names = args.models.split(",") if args.models else list(zoo)
    rows = []
    for name in names:
        rows.append(measure(name, zoo[name], args.threads, args.repeats))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = "\n".join([
        "# Exact element-wise folds on the zoo (CPU provider)", "",
        *markdown.generated_by("bench_fold.py", provenance.command_line("bench_fold.py",
                                                                          sys.argv[1:] if argv is None else argv)),
        f"Machine: {provenance.machine()}, {args.threads} intra-op thread(s). {provenance.package_provenance()}. "
        "Original = the canonical model (weights as initializers); "
        "folded = `onnx_lowrank.fold.fold_elementwise` of it, what `compress` starts from unless `--no-fold`. "
        "Error: largest relative L2 over the outputs (pre-sigmoid for sigmoid outputs) on 2 random feeds; "
        f"latency: medians of {args.repeats} interleaved runs of each, batch 1.", "",
        table(rows), ""])
    markdown.write(args.out, text)
    worst = max(r["max_rel_l2"] for r in rows)
    print(f"wrote {args.out}; largest error {worst:.1e}")
    return 0 if np.isfinite(worst) and worst < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
