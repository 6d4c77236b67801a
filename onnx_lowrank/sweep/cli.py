"""The `onnx-lowrank sweep` subcommand: parse, sweep, print the frontier, exit code.

Exit codes as for `compress`: 0 done; 1 `--min-metric` given and no point keeps it (the files
are written all the same); 2 bad input; 3 an internal error.
"""

from __future__ import annotations

import dataclasses
import json

from rich.console import Console
from rich.table import Table

from onnx_lowrank.config import Settings, load_config
from onnx_lowrank.errors import BoundError, InputError
from onnx_lowrank.intervals import with_interval
from onnx_lowrank.sweep.executors import EXECUTORS
from onnx_lowrank.sweep.fleet import load_models
from onnx_lowrank.sweep.options import (
    DEFAULT_METHODS,
    DEFAULT_TARGETS,
    KEEP,
    LATENCY_ON,
    SweepModel,
    SweepOptions,
    parse_list,
)
from onnx_lowrank.sweep.result import SweepResult
from onnx_lowrank.sweep.run import sweep_models

__all__ = ["add_parser", "run"]


def add_parser(commands, add_shape_option, add_validation_options) -> None:
    """Add the `sweep` subcommand to `commands` (the main parser's subparsers), with the shape
    and validation options `compress` has."""
    sweep = commands.add_parser("sweep", help="compress at several targets and methods: the accuracy / speed frontier")
    sweep.add_argument("model", help="the model, or a models.toml listing several (see onnx_lowrank.sweep.fleet)")
    sweep.add_argument("-o", "--output", metavar="DIR", help="folder for sweep.json, sweep.md, pareto.png and "
                                                            "the kept models (required)")
    sweep.add_argument("--targets", default=",".join(f"{t:g}" for t in DEFAULT_TARGETS),
                       help="fractions of the whole model's MACs to keep (default %(default)s)")
    sweep.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                       help="methods to sweep, each over every target (default %(default)s)")
    sweep.add_argument("--keep", choices=KEEP, default="pareto",
                       help="which compressed models to write (default pareto; best: the --min-metric pick)")
    sweep.add_argument("--min-metric", dest="pick_metric", type=float,
                       help="name the fastest point whose --metric is at least this; exit 1 when none is")
    sweep.add_argument("--executor", choices=EXECUTORS, default="local",
                       help="run the points here, or as Ray tasks (pip install 'onnx-lowrank[ray]')")
    sweep.add_argument("--ray-address", help="join the Ray cluster there (default: start a local one)")
    sweep.add_argument("--latency-on", choices=LATENCY_ON, default="driver",
                       help="time the models on this machine (default) or on a cluster worker with the "
                            "--provider's resource (a GPU for cuda/tensorrt)")
    add_shape_option(sweep)
    add_validation_options(sweep)
    sweep.add_argument("--eval", help="held-out inputs for the metric (default: the --calib inputs)")
    sweep.add_argument("--eval-count", type=int, help="validate on at most N of the --eval inputs")
    sweep.add_argument("--metric", help="task metric: top1, detection, ctc, textmap or module:function")
    sweep.add_argument("--latency-aware", action="store_true", default=None,
                       help="keep a chain only where it is measured faster than its layer on --provider")
    sweep.add_argument("--rank-multiple", type=int, help="ranks in steps of N (default 16)")
    sweep.add_argument("--seed", type=int, help="seed for random inputs and CP initialisation")
    sweep.add_argument("--max-memory", metavar="SIZE", help="memory each point may use, e.g. 8G")
    sweep.add_argument("--config", help="TOML file of compress settings every point shares (flags override it)")
    sweep.add_argument("--json", action="store_true", help="print sweep.json instead of a table")


def run(args, console: Console) -> int:
    """Run the `sweep` command line; returns the exit code."""
    if args.output is None:
        raise InputError("sweep: the following arguments are required: -o/--output")
    overrides = {field.name: getattr(args, field.name, None) for field in dataclasses.fields(Settings)}
    options = SweepOptions(parse_list(args.targets, "--targets", float), parse_list(args.methods, "--methods"),
                           args.keep, args.pick_metric, args.latency_on)
    fleet = args.model.endswith(".toml")
    models = (load_models(args.model, args.config, overrides) if fleet
              else [SweepModel(args.model, load_config(args.config, overrides))])
    if not args.json:
        console.print(f"sweeping {len(models)} model(s), {len(options.methods) * len(options.targets)} points each, "
                      f"on the {args.executor} executor", markup=False, highlight=False)
    results = sweep_models(models, options, args.output, args.executor, args.ray_address, nested=fleet)
    if args.json:
        print(json.dumps({"models": [r.to_dict() for r in results]} if fleet else results[0].to_dict(), indent=2))
    else:
        for result in results:
            _print(console, result)
        console.print(f"written to {args.output}", markup=False, highlight=False)
    missed = [r.name for r in results if options.min_metric is not None and r.best is None]
    if missed:
        raise BoundError(f"--min-metric {options.min_metric:g}: no point of {', '.join(missed)} keeps it")
    return 0


def _print(console: Console, result: SweepResult) -> None:
    """The frontier as a table, the pick and the costs."""
    table = Table(title=f"{result.name}: {result.quality} against speed-up", title_justify="left")
    for column in ("target", "method", "MACs kept", "params kept", "speed-up", result.quality, "compress s",
                   "Pareto", "file"):
        table.add_column(column, justify="left" if column in ("method", "file") else "right")
    for point in result.points:
        if not point.ok:
            table.add_row(f"{point.target:g}", point.method, "", "", "", "", f"{point.compress_seconds:.1f}", "",
                          point.error)
            continue
        interval = {"metric": point.metric_ci95, "top1_agreement": point.top1_ci95}.get(result.quality)
        table.add_row(f"{point.target:g}", point.method, f"{point.macs_kept:.3f}", f"{point.params_kept:.3f}",
                      "-" if point.speedup is None else f"{point.speedup:.2f}",
                      with_interval(getattr(point, result.quality), interval), f"{point.compress_seconds:.1f}",
                      "yes" if point.pareto else "", point.file or "")
    console.print(table)
    stats, seconds = result.statistics, result.seconds
    console.print(f"shared statistics: {stats['calibration_walks']} calibration walk(s), {stats['output_gain_runs']} "
                  f"output-gain run(s) for {len(result.points)} points ({stats['seconds']:.1f} s); points "
                  f"{seconds['points']:.1f} s, timing run {seconds['timing']:.1f} s"
                  + (f" on {result.provider} ({result.device})" if result.provider else "")
                  + f"; in all {seconds['total']:.1f} s", markup=False, highlight=False)
    if result.options.min_metric is not None:
        best = result.best
        console.print(f"picked: {best.label}, x{best.speed:.2f} at {result.quality} "
                      f"{getattr(best, result.quality):.4f}" if best is not None else
                      f"picked: none keeps {result.quality} >= {result.options.min_metric:g}",
                      markup=False, highlight=False)
