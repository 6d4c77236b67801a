"""The `onnx-lowrank` command: parse, run, print, exit code.

Exit codes: 0 success; 1 the result failed a bound the user asked for; 2 bad input or usage
(one line on stderr, no traceback); 3 an internal error (a bug: `--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from onnx_lowrank import __version__, api
from onnx_lowrank.config import GAIN_NOISES, Settings, load_config, parse_tiles
from onnx_lowrank.errors import BoundError, InputError, InternalError
from onnx_lowrank.fold import FoldCounts
from onnx_lowrank.intervals import with_interval
from onnx_lowrank.methods import method_names
from onnx_lowrank.passes import default_pipeline
from onnx_lowrank.passes.prepare import CALIB_CAP, NO_INPUTS
from onnx_lowrank.report import (
    REUSED_CALIBRATION_NOTE,
    bound_text,
    compression_report,
    reused_calibration,
)
from onnx_lowrank.runtime import CONV_ALGO_SEARCHES, resolve_provider
from onnx_lowrank.sweep import cli as sweep_cli

__all__ = ["main"]

IMAGE_KEYS = ("batch_size", "resize", "mean", "std", "layout", "channel_order")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as InputError (exit 2, one line)."""

    def error(self, message):
        raise InputError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnx-lowrank", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"onnx-lowrank {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each pass")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    inspect = commands.add_parser("inspect", help="list the layers of a model with their costs")
    inspect.add_argument("model")
    _add_shape_option(inspect)
    inspect.add_argument("--json", action="store_true", help="print the JSON contract instead of a table")

    compress = commands.add_parser("compress", help="factorize layers and rewrite them into chains")
    compress.add_argument("model")
    compress.add_argument("-o", "--output", help="where to write the compressed model (required)")
    compress.add_argument("--method", choices=(*method_names(), "auto"),
                          help="factorization (default tucker2); auto picks per layer for a budget")
    ranks = compress.add_mutually_exclusive_group()
    ranks.add_argument("--rank", type=int, help="keep N components per mode (capped at full rank)")
    ranks.add_argument("--rank-ratio", type=float, help="keep this fraction of each full rank (default 0.5)")
    ranks.add_argument("--energy", type=float, help="smallest ranks keeping this fraction of the spectral energy")
    ranks.add_argument("--vbmf", action="store_true", default=None,
                       help="ranks from empirical variational Bayesian matrix factorization")
    ranks.add_argument("--target-macs", type=float, help="keep this fraction of the whole model's MACs")
    ranks.add_argument("--target-params", type=float, help="keep this fraction of the whole model's parameters")
    ranks.add_argument("--target-latency", type=float,
                       help="keep this fraction of the compressible layers' latency measured on --provider")
    compress.add_argument("--rank-multiple", type=int,
                          help="automatic ranks are multiples of N (default 16: onnxruntime's CPU conv block)")
    compress.add_argument("--jobs", type=int,
                          help="factorize layers in N processes (weight-only and --no-sequential fits; a "
                               "sequential fit needs each layer's chain before the next layer's statistics)")
    compress.add_argument("--latency-aware", action="store_true", default=None,
                          help="keep a chain only where it is measured faster than its layer on --provider")
    compress.add_argument("--latency-margin", type=float,
                          help="how much faster (relative) a chain must be to count (default 0.05)")
    compress.add_argument("--require-speedup", action="store_true", default=None,
                          help="exit 1 when the compressed model is not measured faster end to end")
    compress.add_argument("--tiles", type=parse_tiles, help="tile grid AxB for tiled-svd (default 2x2)")
    compress.add_argument("--keep-structure", action="store_true", default=None,
                          help="keep the graph: replace each weight by its low-rank reconstruction")
    compress.add_argument("--no-fold", dest="fold", action="store_false", default=None,
                          help="keep per-channel Mul/Add/Sub/Div and hard-swish chains as separate nodes "
                               "(by default they are folded into the convolutions, exactly)")
    compress.add_argument("--layers", help="only layers whose name matches this regular expression")
    compress.add_argument("--skip", help="leave out layers whose name matches this regular expression")
    _add_shape_option(compress)
    _add_validation_options(compress)
    fitting = compress.add_argument_group("data-aware fitting (with --calib)")
    fitting.add_argument("--eval", help="held-out inputs for validation (default: the --calib inputs)")
    fitting.add_argument("--eval-count", type=int, help="validate on at most N of the --eval inputs (default: all)")
    fitting.add_argument("--no-data-aware", dest="data_aware", action="store_false", default=None,
                         help="factorize weights only; use --calib for validation alone")
    fitting.add_argument("--no-sequential", dest="sequential", action="store_false", default=None,
                         help="fit every layer to the original model's inputs, not the compressed one's")
    fitting.add_argument("--no-refit", dest="refit", action="store_false", default=None,
                         help="keep the last factor of each chain as factorized")
    fitting.add_argument("--no-bias-correction", dest="bias_correction", action="store_false", default=None,
                         help="keep the original bias")
    fitting.add_argument("--no-output-weighting", dest="output_weighting", action="store_false", default=None,
                         help="budgets: weigh every layer's output error alike, not by its effect on the "
                              "model's outputs")
    fitting.add_argument("--gain-noise", choices=GAIN_NOISES,
                         help="budgets: perturb each layer's output by white noise (default) or by its truncation "
                              "error at the rank keeping half its MACs to measure its output gain")
    fitting.add_argument("--fit-aware-budget", action="store_true", default=None,
                         help="budgets: fit once at the planned ranks, then plan again on each layer's error "
                              "curve as the sequential fit sees it (one more fit)")
    fitting.add_argument("--activation-aware", action="store_true", default=None,
                         help="fit layers followed by ReLU, Clip, hard-swish, sigmoid-gated and similar units "
                              "to their response after the activation (Zhang et al. 2016)")
    fitting.add_argument("--refine-blocks", action="store_true", default=None,
                         help="after the fit, refine the chains block by block (2-3 layers between "
                              "single-tensor cuts) by gradient steps to the original blocks' outputs")
    fitting.add_argument("--augment", type=int, metavar="N",
                         help="follow each image calibration batch by N flipped, shifted, contrast-changed and "
                              "noisy copies (label-free augmentation of the fit's inputs)")
    guard = compress.add_argument_group("error guard (roll back layers until the bound holds)")
    guard.add_argument("--max-error", type=float, help="largest relative output error of one layer")
    guard.add_argument("--min-cosine", type=float, help="smallest cosine of any model output with the original")
    guard.add_argument("--min-metric", type=float, help="smallest task metric (needs --metric)")
    guard.add_argument("--metric", help="task metric: top1, detection, ctc, textmap or module:function")
    compress.add_argument("--no-validate", dest="validate", action="store_false", default=None,
                          help="do not run the models in onnxruntime to compare them")
    compress.add_argument("--seed", type=int, help="seed for random inputs and CP initialisation")
    compress.add_argument("--config", help="TOML file of settings (flags override it)")
    compress.add_argument("--json", action="store_true", help="print the report JSON instead of tables")
    compress.add_argument("--report", metavar="DIR",
                          help="write report.json, report.md and PNG plots into DIR")
    compress.add_argument("--max-memory", metavar="SIZE",
                          help="memory the run may use, e.g. 8G (default: half of the memory available at start); "
                               "statistics of wide layers switch to sample space to fit it")
    compress.add_argument("--print-pipeline", action="store_true",
                          help="print the passes these settings run (what each needs and provides) and exit")

    validate = commands.add_parser("validate", help="compare a candidate model with the original")
    validate.add_argument("original")
    validate.add_argument("candidate")
    _add_shape_option(validate)
    _add_validation_options(validate)
    validate.add_argument("--metric", help="task metric: top1, detection, ctc, textmap or module:function")
    validate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sweep_cli.add_parser(commands, _add_shape_option, _add_validation_options)
    return parser


def _add_shape_option(parser):
    parser.add_argument("--input-shape", action="append", metavar="NAME:1x3x224x224",
                        help="pin a dynamic input's shape (repeatable)")
    parser.add_argument("--input-value", action="append", metavar="NAME:VALUE",
                        help="pin an input to a value in every feed, e.g. sr:16000 (repeatable); decides "
                             "the If branches the totals count")


def _add_validation_options(parser):
    parser.add_argument("--calib", help="inputs: an .npz keyed by input name, or a folder of images")
    parser.add_argument("--calib-count", type=int,
                        help=f"use at most N calibration inputs (default: all of them up to {CALIB_CAP})")
    parser.add_argument("--batch-size", type=int, help="samples per run when the batch axis is free")
    images = parser.add_argument_group("image folders (--calib DIR)")
    images.add_argument("--resize", type=int, help="short side before the centre crop (default: max(H, W))")
    images.add_argument("--mean", help="per-channel mean after scaling to [0, 1], e.g. 0.485,0.456,0.406")
    images.add_argument("--std", help="per-channel std, e.g. 0.229,0.224,0.225")
    images.add_argument("--layout", choices=("auto", "NCHW", "NHWC"), help="input layout (default auto)")
    images.add_argument("--channel-order", choices=("RGB", "BGR"), help="channel order (default RGB)")
    parser.add_argument("--provider", choices=("auto", "cuda", "tensorrt", "cpu"),
                        help="onnxruntime provider (auto: CUDA when it works, else CPU)")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    parser.add_argument("--cudnn-conv-algo-search", choices=CONV_ALGO_SEARCHES,
                        help="cuDNN's convolution algorithm search in CUDA timing sessions (default EXHAUSTIVE)")
    parser.add_argument("--no-latency", dest="latency", action="store_false", default=None,
                        help="skip the latency measurement")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `onnx-lowrank` console script; returns the exit code."""
    console = Console(width=None if sys.stdout.isatty() else 200)
    errors = Console(stderr=True, width=None if sys.stderr.isatty() else 400)
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    if debug and not faulthandler.is_enabled():
        # A native crash (onnxruntime, LAPACK) then prints the Python stack it happened in.
        faulthandler.enable(file=sys.__stderr__)
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        with _terminations_unwind():
            return {"inspect": _inspect, "compress": _compress, "validate": _validate,
                    "sweep": sweep_cli.run}[args.command](args, console)
    except InputError as exc:
        errors.print(f"onnx-lowrank: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except BoundError as exc:
        errors.print(f"onnx-lowrank: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 1
    except InternalError as exc:
        if debug:
            raise
        errors.print(f"onnx-lowrank: internal error: {exc} (rerun with --debug for the traceback)", markup=False,
                     highlight=False, soft_wrap=True)
        return 3
    except KeyboardInterrupt:
        errors.print("onnx-lowrank: interrupted", markup=False)
        return 130
    except Terminated as exc:
        errors.print(f"onnx-lowrank: stopped by {signal.Signals(exc.signum).name}", markup=False)
        return 128 + exc.signum
    except Exception as exc:  # noqa: BLE001 - one line for users, the traceback under --debug
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        errors.print(f"onnx-lowrank: internal error: {type(exc).__name__}: {first} "
                     "(rerun with --debug for the traceback)", markup=False, highlight=False,
                     soft_wrap=True)
        return 3


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: raised where the run is, so that its cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _terminations_unwind() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Terminated` instead of ending the process on the spot, so a
    stopped run still deletes its temporary files (activations spilled to disk can take tens of
    GB) and leaves no half-written output. Only the main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated(signum)

    previous = {number: signal.signal(number, stop) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _inspect(args, console: Console) -> int:
    found = api.inspect(args.model, args.input_shape, args.input_value)
    layers, totals = found.layers, found.totals
    if args.json:
        counting = {"counting": found.counting} if found.counting else {}
        print(json.dumps({"layers": [layer.to_dict() for layer in layers],
                          "totals": {"macs": totals["macs"], "params": totals["params"]}, **counting}, indent=2))
        return 0
    table = Table(title=f"{args.model}: {len(layers)} layers", title_justify="left")
    for column in ("layer", "op", "weight", "groups", "output", "MACs", "% MACs", "params", "status"):
        table.add_column(column, justify="right" if column in ("MACs", "% MACs", "params", "groups") else "left")
    for layer in layers:
        share = f"{100 * layer.macs * layer.runs / totals['macs']:.1f}" if layer.macs and totals["macs"] else "-"
        table.add_row(layer.name, layer.op, _dims(layer.weight.shape if layer.weight is not None else None),
                      str(layer.conv.group) if layer.conv else "", _dims(layer.output_shape),
                      _count(layer.macs), share, _count(layer.params),
                      ("candidate" if layer.candidate else f"skip: {layer.skip_reason}")
                      + (f" (in {layer.scope})" if layer.scope else ""))
    console.print(table)
    candidates = [layer for layer in layers if layer.candidate]
    covered = sum((layer.macs or 0) * layer.runs for layer in candidates)
    console.print(f"total: {_count(totals['macs'])} MACs, {_count(totals['params'])} params; "
                  f"{len(candidates)} candidates hold {_share(covered, totals['macs'])} of the MACs")
    if found.counting:
        console.print(f"control flow counted: {found.counting}", markup=False, highlight=False)
    return 0


def _settings(args) -> Settings:
    """The settings of a `compress` command line: the --config file, then every flag given,
    one flag per `Settings` field (same name, dashes for underscores)."""
    overrides = {field.name: getattr(args, field.name, None) for field in dataclasses.fields(Settings)}
    return load_config(args.config, overrides)


def _compress(args, console: Console) -> int:
    settings = _settings(args)
    if args.print_pipeline:
        console.print(default_pipeline(settings).describe(), markup=False, highlight=False)
        return 0
    if args.output is None:
        raise InputError("compress: the following arguments are required: -o/--output")
    quiet = args.json or not console.is_terminal
    try:
        if quiet:
            result = api.compress(args.model, args.output, settings)
        else:
            with _progress(console) as tracker:
                result = api.compress(args.model, args.output, settings, tracker=tracker)
    except BoundError as exc:
        if exc.result is not None:
            _show(console, args, compression_report(exc.result, args.model, args.output), settings.guarded)
        raise
    _show(console, args, compression_report(result, args.model, args.output), settings.guarded)
    return 0


def _show(console: Console, args, report: dict, guarded: bool) -> None:
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_compression(console, report, guarded)


def _print_compression(console: Console, report: dict, guarded: bool) -> None:
    table = Table(title=f"{report['input']} -> {report['output']}", title_justify="left")
    timed = any(row.get("latency_ms_before") is not None for row in report["layers"])
    columns = ["layer", "method", "ranks", "MACs before", "MACs after", "weight err", "output err"]
    columns += ["ms before", "ms after"] if timed else []
    for column in (*columns, "status"):
        table.add_column(column, justify="left" if column in ("layer", "method", "ranks", "status") else "right")
    for row in report["layers"]:
        status = f"{row['status']}: {row['reason']}" if row["reason"] else row["status"]
        cells = [row["name"], row["method"] or "", str(row["ranks"] or ""), _count(row["macs_before"]),
                 _count(row["macs_after"]), _number(row["weight_rel_error"]), _number(row["output_rel_error"])]
        if timed:
            cells += [_number(row.get("latency_ms_before")), _number(row.get("latency_ms_after"))]
        table.add_row(*cells, status)
    console.print(table)
    totals = report["totals"]
    console.print(f"MACs {_count(totals['macs_before'])} -> {_count(totals['macs_after'])} "
                  f"({_share(totals['macs_after'], totals['macs_before'])}); params "
                  f"{_count(totals['params_before'])} -> {_count(totals['params_after'])} "
                  f"({_share(totals['params_after'], totals['params_before'])})")
    if totals.get("counting"):
        console.print(f"control flow counted: {totals['counting']}", markup=False, highlight=False)
    if report.get("inputs") not in (None, NO_INPUTS):
        console.print(f"inputs: {report['inputs']}", markup=False, highlight=False)
    folded = report.get("folded") or {}
    if any(folded.values()):
        console.print(f"folded exactly: {FoldCounts.from_report(folded).describe()} (--no-fold keeps them)")
    if report["validation"] is not None:
        _print_validation_summary(console, report["validation"])
    elif guarded and reused_calibration(report["settings"]):
        console.print(f"guard bounds {REUSED_CALIBRATION_NOTE}")


def _print_validation_summary(console: Console, validation: dict) -> None:
    parts = [f"provider {validation['provider']}, {validation['inputs']} samples"]
    for output in validation["outputs"]:
        before = output.get("before_activation")
        text = f"{output['name']}: cosine {_number(output['cosine'], '.6f')}, rel L2 {_number(output['rel_l2'], '.2e')}"
        if before is not None:
            text += f" (before the {before['activation']}: rel L2 {_number(before['rel_l2'], '.2e')}, the one to gate on)"
        parts.append(text)
    if validation.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {with_interval(validation['top1_agreement'], validation.get('top1_ci95'))}")
    if validation.get("metric") is not None:
        parts.append(f"metric {with_interval(validation['metric'], validation.get('metric_ci95'))}"
                     + bound_text(validation.get("metric_bound")))
    latency = validation.get("latency_ms")
    if latency:
        parts.append(f"latency median {latency['before']['median']:.3f} -> "
                     f"{latency['after']['median']:.3f} ms (x{validation['speedup']:.2f})")
    console.print("; ".join(parts), markup=False, highlight=False)
    if validation.get("on_fit_inputs"):
        console.print(f"validation {REUSED_CALIBRATION_NOTE}")


def _validate(args, console: Console) -> int:
    from onnx_lowrank import validate

    settings = load_config(None, {key: getattr(args, key) for key in IMAGE_KEYS})
    result = validate.validate_models(
        args.original, args.candidate, calib=args.calib,
        input_shapes=args.input_shape, input_values=args.input_value,
        provider=resolve_provider(args.provider or "auto", conv_algo_search=args.cudnn_conv_algo_search or "EXHAUSTIVE"),
        count=args.calib_count, metric=args.metric,
        latency=args.latency is not False, threads=args.threads,
        batch_size=settings.batch_size, image_options=settings.image_options())
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        console.print(validate.format_table(result))
    return 0


class _progress:
    """A rich progress bar with ETA for the passes that iterate over layers."""

    def __init__(self, console: Console):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=console, transient=True)

    def __enter__(self):
        self.progress.start()
        return self.track

    def __exit__(self, *exc):
        self.progress.stop()

    def track(self, items, total, description):
        return self.progress.track(items, total=total, description=description)


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape) if shape is not None else "?"


def _count(value) -> str:
    if value is None:
        return "?"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.2f}{suffix}"
    return str(value)


def _number(value, spec: str = ".3g") -> str:
    return "" if value is None else format(value, spec)


def _share(part, whole) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


if __name__ == "__main__":
    sys.exit(main())
