#!/usr/bin/env python3
"""Benchmark the time and memory of DATA-AWARE compression (calibration) on two CNNs.

Each run is one call, in a FRESH child process (`benchlib.child`):

    onnx_lowrank.api.compress(model, out, Settings(method="auto", target_macs=0.5, calib=CALIB.npz,
        calib_count=N, batch_size=B, input_shape=("NAME:Bx...",), sequential=True|False,
        validate=False))

The child reports the wall time of the call, its resident set just before the call (VmRSS) and
its peak resident set right after it returns (VmHWM of /proc/self/status; `ru_maxrss` is not
usable: Linux carries the parent's high-water mark into a child across fork + exec), and the
seconds of each compression pass (`CompressionResult.timings`).

Models:

* `resnet50`: the ResNet-50 architecture (Bottleneck blocks [3, 4, 6, 3], widths 64..2048,
  batch norm, 1000-class fc), written in plain torch below, RANDOMLY initialised
  (`torch.manual_seed(0)`; torchvision's initialisation, random batch-norm statistics: see
  `build_resnet50`), exported once with torch.onnx (opset 17, dynamic batch, batch norm folded)
  to `<model cache>/resnet50-random.onnx`. The weights are random: the run measures time and
  memory, not accuracy. Calibration: 224x224 crops of scikit-image's sample images (random
  position, scale and horizontal flip, seeded), ImageNet mean/std, NCHW float32; batch 16.
* `nudenet-320n`: the NudeNet 3 YOLOv8n detector of `models/zoo.toml` (fetched with
  `tools/fetch_models.py`). Calibration: 320x320 crops of the same images, RGB in [0, 1]; batch 8.

A run is `MODEL:COUNT` (sequential, the default with calibration data) or
`MODEL:COUNT:independent` (`sequential=False`). Runs that take longer than `--timeout` seconds
are killed and reported as such.

Benchmark a snapshot of the package, not a working tree that others are editing:

    rm -rf /tmp/olr_calib && mkdir -p /tmp/olr_calib && git archive HEAD onnx_lowrank | tar -x -C /tmp/olr_calib
    PYTHONPATH=/tmp/olr_calib OMP_NUM_THREADS=2 nice -n 10 python tools/bench_calibration.py

Usage:
    python tools/bench_calibration.py [--runs resnet50:64,resnet50:256,nudenet-320n:64,...]
        [--target 0.5] [--timeout 1200] [--out docs/bench_calibration.md] [--json FILE]
    python tools/bench_calibration.py --render FILE.json [--out docs/bench_calibration.md]

Needs numpy, onnx, onnxruntime, scikit-image, Pillow and torch==2.13.0 (tool-only dependencies).
"""


from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Callable

import numpy as np
from benchlib import REPO, cli, markdown, provenance
from benchlib import datasets as ds
from benchlib.child import compress_in_child
from benchlib.torch_export import export_torch
from fetch_models import default_cache_dir, fetch

DEFAULT_RUNS = "resnet50:64,resnet50:256,nudenet-320n:64,resnet50:256:independent"
#: The issue's goal: data-aware (sequential) compression of this ~3 M-parameter detector with this
#: many calibration inputs in under this many seconds on 2 cores.
GOAL = ("nudenet-320n", 64, 60.0)


# --------------------------------------------------------------------------------------------
# ResNet-50 (random weights)


def build_resnet50():
    """ResNet-50 v1.5 (stride on the 3x3 conv) as torchvision's `resnet50(weights=None)`, but with
    random batch-norm statistics and affine parameters.

    With torchvision's batch-norm initialisation (weight 1, bias 0, mean 0, variance 1) every
    folded convolution bias of a given width would be the same zero vector, which torch.onnx
    shares between the convolutions through `Identity` nodes (onnx_lowrank up to be3dc66 skipped
    such layers: "bias computed at run time, not a constant"). A trained network has distinct
    biases, and so has this one.
    """
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, inplanes: int, planes: int, stride: int):
            super().__init__()
            width, out = planes, planes * 4
            self.conv1, self.bn1 = nn.Conv2d(inplanes, width, 1, bias=False), nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or inplanes != out:
                self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                                nn.BatchNorm2d(out))

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            return self.relu(y + (x if self.downsample is None else self.downsample(x)))

    def stage(inplanes: int, planes: int, blocks: int, stride: int):
        layers = [Bottleneck(inplanes, planes, stride)]
        layers += [Bottleneck(planes * 4, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    model = nn.Sequential(
        nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
        stage(64, 64, 3, 1), stage(256, 128, 4, 2), stage(512, 256, 6, 2), stage(1024, 512, 3, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):     # statistics as after training, all distinct
            nn.init.uniform_(module.weight, 0.5, 1.0)
            nn.init.normal_(module.bias, 0.0, 0.1)
            nn.init.normal_(module.running_mean, 0.0, 0.1)
            nn.init.uniform_(module.running_var, 0.5, 1.5)
    return model


def resnet50_onnx() -> pathlib.Path:
    """`<model cache>/resnet50-random.onnx`, exported once (seed 0) and reused afterwards."""
    cache = default_cache_dir()
    path = cache / "resnet50-random.onnx"
    if path.exists():
        return path
    import torch

    torch.manual_seed(0)
    model = build_resnet50().eval()
    cache.mkdir(parents=True, exist_ok=True)
    return export_torch(model, torch.zeros(1, 3, 224, 224), path, "x", "logits")


# --------------------------------------------------------------------------------------------
# Models and runs


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model of the time-and-memory runs: where it comes from and its calibration inputs."""

    locate: Callable[[], pathlib.Path]                  # the .onnx path (built or fetched when missing)
    input_name: str
    sample_shape: str                                   # one input without the batch axis, "3x224x224"
    batch: int
    inputs: Callable[[int, int], np.ndarray]            # (count, seed) -> calibration inputs
    data: str

    def input_shape(self, batch: int) -> tuple[str, ...]:
        """`Settings.input_shape` / `api.inspect`'s shapes at this batch size."""
        return (f"{self.input_name}:{batch}x{self.sample_shape}",)


MODELS = {
    "resnet50": ModelSpec(resnet50_onnx, "x", "3x224x224", 16, ds.imagenet_inputs,
                          "224x224 crops, ImageNet mean/std"),
    "nudenet-320n": ModelSpec(lambda: fetch("nudenet-320n"), "images", "3x320x320", 8,
                              ds.unit_rgb_inputs, "320x320 crops, RGB in [0, 1]"),
}


def parse_runs(text: str) -> list[tuple[str, int, bool]]:
    """'resnet50:64,resnet50:256:independent' -> [(model, count, sequential), ...]."""
    runs = []
    for item in cli.names(text):
        name, count, *mode = item.split(":")
        if name not in MODELS or mode not in ([], ["independent"]):
            raise SystemExit(f"bad run {item!r}: expected MODEL:COUNT[:independent] with MODEL in {', '.join(MODELS)}")
        runs.append((name, int(count), not mode))
    return runs


def calibration_file(name: str, count: int, workdir: pathlib.Path) -> pathlib.Path:
    """The run's .npz (keyed by the model's input name), `count` samples, seed 0."""
    spec = MODELS[name]
    path = workdir / f"{name}_calib_{count}.npz"
    if not path.exists():
        np.savez(path, **{spec.input_name: spec.inputs(count, 0)})
    return path


def run_one(name: str, count: int, sequential: bool, model: pathlib.Path, workdir: pathlib.Path,
            target: float, timeout: float) -> dict:
    """One data-aware compression of `count` calibration inputs in a child process."""
    spec = MODELS[name]
    settings = dict(method="auto", target_macs=target, calib=str(calibration_file(name, count, workdir)),
                    calib_count=count, batch_size=spec.batch, input_shape=list(spec.input_shape(spec.batch)),
                    sequential=sequential, validate=False)
    out = workdir / f"{name}_{count}_{'seq' if sequential else 'ind'}.onnx"
    row = {"model": name, "count": count, "sequential": sequential, "batch": spec.batch,
           **compress_in_child(model, out, settings, timeout)}
    if row["status"] == "ok":
        row["kept_macs"] = row["totals_after"]["macs"] / row["totals_before"]["macs"]
    return row


# --------------------------------------------------------------------------------------------
# Report


def _mib(value) -> str:
    return f"{value:.0f}" if isinstance(value, (int, float)) else ""


def _passes(row: dict) -> str:
    """Seconds per pass (those >= 1 % of the call), then what ran outside the passes."""
    timings = row.get("timings") or {}
    shown = [f"{name} {s:.1f}" for name, s in timings.items() if s >= 0.01 * row["seconds"]]
    outside = row["seconds"] - sum(timings.values())
    return ", ".join(shown + [f"load + save {outside:.1f}"])


def summary(rows: list[dict]) -> list[str]:
    """The goal's run against its time limit, and how time and peak memory grow with the count."""
    lines = []
    name, count, limit = GOAL
    for row in rows:
        if (row["model"], row["count"], row["sequential"], row["status"]) == (name, count, True, "ok"):
            verdict = "met" if row["seconds"] < limit else "**missed**"
            lines.append(f"- Goal: `{name}` with {count} calibration inputs, sequential, in under {limit:.0f} s "
                         f"on 2 cores: {verdict} ({row['seconds']:.0f} s on the shared machine).")
    for model in dict.fromkeys(r["model"] for r in rows):
        done = sorted((r for r in rows if r["model"] == model and r["sequential"] and r["status"] == "ok"),
                      key=lambda r: r["count"])
        if len(done) < 2 or done[0]["count"] == done[-1]["count"]:
            continue
        low, high = done[0], done[-1]
        extra = high["count"] - low["count"]
        lines.append(f"- `{model}`, sequential, {low['count']} -> {high['count']} calibration inputs: peak "
                     f"{low['peak_mib']:.0f} -> {high['peak_mib']:.0f} MiB "
                     f"({(high['peak_mib'] - low['peak_mib']) / extra:+.1f} MiB per extra input), wall "
                     f"{low['seconds']:.0f} -> {high['seconds']:.0f} s "
                     f"({(high['seconds'] - low['seconds']) / extra:+.2f} s per extra input).")
    return lines


def _cells(row: dict, models: dict[str, dict]) -> list[str]:
    size = models[row["model"]]
    lead = [row["model"], f"{size['params'] / 1e6:.1f} M", f"{size['macs'] / 1e9:.2f} G",
            f"{row['count']} ({row['batch']})", "yes" if row["sequential"] else "no"]
    if row["status"] != "ok":
        return [*lead, f"**{row['status'].upper()}** after {row['seconds']:.0f}", _mib(row.get("peak_mib")),
                _mib(row.get("base_mib")), "", row["message"]]
    return [*lead, f"{row['seconds']:.1f}", f"{row['peak_mib']:.0f}", f"{row['base_mib']:.0f}",
            f"{row['kept_macs']:.3f}", _passes(row)]


def markdown_text(rows: list[dict], models: dict[str, dict], context: dict) -> str:
    """The benchmark document: one row per run, the goal, the data."""
    lines = ["# Data-aware compression: time and memory", "", *markdown.generated_by("bench_calibration.py",
                                                                                   context["command"]),
             (f"Machine: {context['machine']} (CPU provider, default threads). **The machine was shared** with "
              f"other benchmarks: load average (1, 5, 15 min) {context['load_before']} at the start, "
              f"{context['load_after']} at the end, so the wall times are upper bounds of what 2 idle cores "
              f"take. {context['provenance']}. Total run time {context['total_s'] / 60:.1f} min."), "",
             ("Each run is one `onnx_lowrank.api.compress(model, out, Settings(method=\"auto\", "
              f"target_macs={context['target']:g}, calib=CALIB.npz, calib_count=N, batch_size=B, "
              "input_shape=(\"NAME:Bx...\",), sequential=True|False, validate=False))` in a fresh child "
              "process (the input shape pinned at the calibration batch size; nudenet-320n needs it, its "
              "height and width are dynamic). *wall s*: the wall time "
              "of that call (loading the model and the .npz, every pass, saving). *peak MiB*: the child's "
              "peak resident set (VmHWM of /proc/self/status right after the call; includes Python, numpy, "
              "onnx and onnxruntime); *RSS before*: its resident set just before the call. *seconds per "
              "pass*: `CompressionResult.timings`, passes taking at least 1 % of the call; *load + save* is the "
              "rest of the call (reading the model and the calibration file, writing the result). *MACs kept*: "
              "`totals_after` / `totals_before` of the `CompressionResult`. Params and MACs of the original "
              "model: `onnx_lowrank.api.inspect(path, [batch-1 shape]).totals` (Conv/Gemm/MatMul layers)."), "",
             *markdown.table(["model", "params", "MACs", "calibration inputs (batch)", "sequential?", "wall s",
                              "peak MiB", "RSS before MiB", "MACs kept", "seconds per pass"],
                             [_cells(row, models) for row in rows])]
    found = summary(rows)
    if found:
        lines += ["", *found]
    lines += ["", "## Data", ""]
    for name, size in models.items():
        spec = MODELS[name]
        lines.append(f"- `{name}` (`{size['path']}`): {spec.data}, NCHW float32, batch {spec.batch}.")
    lines += ["", "The crops (seed 0) are taken from scikit-image's sample images "
              f"({', '.join(ds.CROP_IMAGES)}): image chosen at random, side 40-100 % of its shorter edge, random "
              "position, horizontal flip half the time, bilinear resize. ResNet-50 has RANDOM weights "
              "(`torch.manual_seed(0)`; convolutions initialised as torchvision does, Kaiming normal fan-out; "
              "batch-norm weight U(0.5, 1), bias N(0, 0.1), running mean N(0, 0.1), running variance "
              "U(0.5, 1.5); exported with torch.onnx, batch norm folded into the convolutions): the runs "
              "measure time and memory only, and say nothing about accuracy. The batch-norm parameters are "
              "random, not torchvision's (1, 0, 0, 1), so that the folded biases differ as in a trained network: "
              "with equal biases torch.onnx shares them between convolutions through `Identity` nodes, and "
              "onnx_lowrank up to be3dc66 skipped 46 of the 53 convolutions (\"bias computed at run time, not a "
              "constant\"), leaving 10.5 % of the MACs as candidates."]
    failed = [r for r in rows if r["status"] == "error"]
    if failed:
        lines += ["", "## Errors", ""]
        for row in failed:
            mode = "sequential" if row["sequential"] else "independent"
            lines += [f"`{row['model']}`, {row['count']} inputs, {mode}:", "", "```",
                      row.get("traceback", row["message"]).strip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the runs (or only render an earlier --json), write docs/bench_calibration.md; 1 if any failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="MODEL:COUNT[:independent],... (default: %(default)s)")
    parser.add_argument("--target", type=float, default=0.5, help="target_macs (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per run before it is killed")
    parser.add_argument("--out", default=str(REPO / "docs" / "bench_calibration.md"))
    parser.add_argument("--json", help="also write the raw rows here")
    parser.add_argument("--render", metavar="JSON", help="only rewrite --out from an earlier --json, run nothing")
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads(pathlib.Path(args.render).read_text())
        markdown.write(args.out, markdown_text(saved["rows"], saved["models"], saved))
        return 0

    from onnx_lowrank import api

    started, load_before, package = time.perf_counter(), provenance.load_average(), provenance.package_provenance()
    runs = parse_runs(args.runs)
    models = {}
    for name in dict.fromkeys(name for name, _, _ in runs):
        path = MODELS[name].locate()
        models[name] = {"path": str(path), **api.inspect(path, list(MODELS[name].input_shape(1))).totals}
    rows = []
    with cli.work_folder(None, "olr_calib_") as workdir:
        for name, count, sequential in runs:
            row = run_one(name, count, sequential, pathlib.Path(models[name]["path"]), workdir,
                          args.target, args.timeout)
            rows.append(row)
            cli.log(f"{name} {count} {'sequential' if sequential else 'independent'}: {row['status']} "
                    f"{row['seconds']:.1f} s, peak {_mib(row.get('peak_mib'))} MiB (load {provenance.load_average()})")
    context = {"machine": provenance.machine(), "provenance": package, "target": args.target,
               "load_before": load_before, "load_after": provenance.load_average(),
               "total_s": time.perf_counter() - started,
               "command": provenance.command_line("bench_calibration.py", sys.argv[1:] if argv is None else argv)}
    if args.json:
        markdown.write(args.json, json.dumps({"rows": rows, "models": models, **context}, indent=1))
    markdown.publish(args.out, markdown_text(rows, models, context))
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
