#!/usr/bin/env python3
"""Benchmark the time and memory of DATA-AWARE compression (calibration) on two CNNs.

Each run is one call, in a FRESH child process (this script with `--worker SPEC`):

    onnx_lowrank.api.compress(model, out, Settings(method="auto", target_macs=0.5, calib=CALIB.npz,
        calib_count=N, batch_size=B, input_shape=("NAME:Bx...",), sequential=True|False,
        validate=False))

The child reports the wall time of the call, its resident set just before the call (VmRSS) and
its peak resident set right after it returns (VmHWM of /proc/self/status; `ru_maxrss` is not
usable: Linux carries the parent's high-water mark into a child across fork + exec), and the
seconds of each compression pass (`workspace.timings`).

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
import hashlib
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from bench_common import export_torch, measured_compress, status_mib  # noqa: E402

DEFAULT_RUNS = "resnet50:64,resnet50:256,nudenet-320n:64,resnet50:256:independent"
#: The issue's goal: data-aware (sequential) compression of this ~3 M-parameter detector with this
#: many calibration inputs in under this many seconds on 2 cores.
GOAL = ("nudenet-320n", 64, 60.0)
#: scikit-image sample images that ship inside its wheel (no download).
IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "brick", "grass",
          "gravel", "clock", "hubble_deep_field", "immunohistochemistry", "retina")


# --------------------------------------------------------------------------------------------
# Worker: one compression in a fresh process


def worker(spec: dict) -> dict:
    workspace, row = measured_compress(spec)
    if workspace is not None:
        row.update(kept_macs=workspace.totals_after["macs"] / workspace.totals_before["macs"],
                   rewritten=len(workspace.rewritten))
    return row


def compress_in_child(model: pathlib.Path, out: pathlib.Path, settings: dict, timeout: float) -> dict:
    spec = {"model": str(model), "out": str(out), "settings": settings}
    start = time.perf_counter()
    with subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            peak = status_mib("VmHWM", proc.pid)        # the child's peak so far, read before killing it
            proc.kill()
            proc.communicate()
            return {"status": "timeout", "message": f"no result within {timeout:.0f} s (child killed; "
                    "peak MiB so far)", "seconds": time.perf_counter() - start, "peak_mib": peak}
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"status": "error", "message": f"worker exited {proc.returncode}",
                "traceback": stderr[-6000:], "seconds": time.perf_counter() - start}
    return json.loads(lines[-1])


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


def resnet50_onnx(cache: pathlib.Path) -> pathlib.Path:
    """`cache/resnet50-random.onnx`, exported once (seed 0) and reused afterwards."""
    path = cache / "resnet50-random.onnx"
    if path.exists():
        return path
    import torch

    torch.manual_seed(0)
    model = build_resnet50().eval()
    cache.mkdir(parents=True, exist_ok=True)
    return export_torch(model, torch.zeros(1, 3, 224, 224), path, "x", "logits")


# --------------------------------------------------------------------------------------------
# Calibration data


def natural_crops(count: int, size: int, seed: int) -> np.ndarray:
    """`count` square RGB crops [count, size, size, 3] uint8 of the scikit-image sample images:
    image chosen at random, side 40-100 % of its shorter edge, random position, flipped
    horizontally half the time, resized (bilinear) to `size`."""
    from bench_budget import _skimage_rgb
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = [_skimage_rgb(name) for name in IMAGES]
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        src = sources[int(rng.integers(len(sources)))]
        h, w = src.shape[:2]
        side = int(rng.uniform(0.4, 1.0) * min(h, w))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = np.ascontiguousarray(src[top:top + side, left:left + side])
        if rng.random() < 0.5:
            crop = np.ascontiguousarray(crop[:, ::-1])
        out[i] = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))
    return out


def imagenet_inputs(count: int, seed: int) -> np.ndarray:
    """224x224 crops, x/255 normalised with the ImageNet mean/std, NCHW float32."""
    from bench_budget import IMAGENET_MEAN, IMAGENET_STD

    x = (natural_crops(count, 224, seed).astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def unit_rgb_inputs(count: int, seed: int) -> np.ndarray:
    """320x320 crops, RGB x/255 in [0, 1], NCHW float32 (NudeNet's preprocessing)."""
    x = natural_crops(count, 320, seed).astype(np.float32) / 255.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------------------------
# Models and runs


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    locate: Callable[[pathlib.Path], pathlib.Path]     # model cache folder -> .onnx path
    input_name: str
    sample_shape: str                                   # one input without the batch axis, "3x224x224"
    batch: int
    inputs: Callable[[int, int], np.ndarray]            # (count, seed) -> calibration inputs
    data: str

    def input_shape(self, batch: int) -> tuple[str, ...]:
        """`Settings.input_shape` / `api.inspect`'s shapes at this batch size."""
        return (f"{self.input_name}:{batch}x{self.sample_shape}",)


MODELS = {
    "resnet50": ModelSpec(resnet50_onnx, "x", "3x224x224", 16, imagenet_inputs,
                          "224x224 crops, ImageNet mean/std"),
    "nudenet-320n": ModelSpec(lambda cache: cache / "nudenet-320n.onnx", "images", "3x320x320", 8,
                              unit_rgb_inputs, "320x320 crops, RGB in [0, 1]"),
}


def parse_runs(text: str) -> list[tuple[str, int, bool]]:
    """'resnet50:64,resnet50:256:independent' -> [(model, count, sequential), ...]."""
    runs = []
    for item in filter(None, text.split(",")):
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
    spec = MODELS[name]
    settings = dict(method="auto", target_macs=target, calib=str(calibration_file(name, count, workdir)),
                    calib_count=count, batch_size=spec.batch, input_shape=list(spec.input_shape(spec.batch)),
                    sequential=sequential, validate=False)
    out = workdir / f"{name}_{count}_{'seq' if sequential else 'ind'}.onnx"
    result = compress_in_child(model, out, settings, timeout)
    return {"model": name, "count": count, "sequential": sequential, "batch": spec.batch, **result}


# --------------------------------------------------------------------------------------------
# Report


def machine() -> dict:
    import onnxruntime as ort

    info = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "unknown")
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__, "onnxruntime": ort.__version__,
            "omp_threads": os.environ.get("OMP_NUM_THREADS", "unset"), "nice": os.nice(0)}


def package_provenance() -> str:
    """Where `onnx_lowrank` was imported from, and which of its files differ from git HEAD (now)."""
    import onnx_lowrank

    root = pathlib.Path(onnx_lowrank.__file__).parent
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip() or "unknown"
    changed, digest = [], hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        text = path.read_bytes()
        digest.update(rel.encode() + text)
        committed = subprocess.run(["git", "-C", str(REPO), "show", f"HEAD:{rel}"], capture_output=True,
                                   check=False).stdout
        if committed != text:
            changed.append(rel)
    state = f"uncommitted changes to {', '.join(changed)}" if changed else "identical to HEAD"
    return (f"`onnx_lowrank` from `{root}` (at the start of the run git HEAD was {head}; {state}; source "
            f"sha256 {digest.hexdigest()[:12]})")


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


def _snapshot(command: str) -> list[str]:
    """The line that makes the package snapshot a command's PYTHONPATH names (none without one)."""
    words = shlex.split(command)
    folder = next((w.split("=", 1)[1] for w in words if w.startswith("PYTHONPATH=")), None)
    if folder is None:
        return []
    return [f"rm -rf {folder} && mkdir -p {folder} && git archive HEAD onnx_lowrank | tar -x -C {folder}"]


def markdown(rows: list[dict], models: dict[str, dict], context: dict) -> str:
    host = context["machine"]
    lines = ["# Data-aware compression: time and memory", "",
             "Generated by `tools/bench_calibration.py`; command (from the repository root):", "",
             "```sh", *_snapshot(context["command"]), context["command"], "```", "",
             (f"Machine: {host['cpu']}, {host['cores']} cores, {host['platform']}, Python {host['python']}, "
              f"numpy {host['numpy']}, onnxruntime {host['onnxruntime']} (CPU provider, default threads), "
              f"OMP_NUM_THREADS={host['omp_threads']}, niceness {host['nice']}. **The machine was shared** with "
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
              "pass*: `workspace.timings`, passes taking at least 1 % of the call; *load + save* is the rest "
              "of the call (reading the model and the calibration file, writing the result). *MACs kept*: "
              "`workspace.totals_after` / `totals_before`. Params and MACs of the original model: "
              "`onnx_lowrank.api.inspect(path, [batch-1 shape]).totals_before` (Conv/Gemm/MatMul layers)."),
             "", "| model | params | MACs | calibration inputs (batch) | sequential? | wall s | peak MiB | "
             "RSS before MiB | MACs kept | seconds per pass |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        size = models[row["model"]]
        lead = (f"| {row['model']} | {size['params'] / 1e6:.1f} M | {size['macs'] / 1e9:.2f} G | "
                f"{row['count']} ({row['batch']}) | {'yes' if row['sequential'] else 'no'} |")
        if row["status"] != "ok":
            lines.append(f"{lead} **{row['status'].upper()}** after {row['seconds']:.0f} | "
                         f"{_mib(row.get('peak_mib'))} | {_mib(row.get('base_mib'))} | | {row['message']} |")
            continue
        lines.append(f"{lead} {row['seconds']:.1f} | {row['peak_mib']:.0f} | {row['base_mib']:.0f} | "
                     f"{row['kept_macs']:.3f} | {_passes(row)} |")
    found = summary(rows)
    if found:
        lines += ["", *found]
    lines += ["", "## Data", ""]
    for name, size in models.items():
        spec = MODELS[name]
        lines.append(f"- `{name}` (`{size['path']}`): {spec.data}, NCHW float32, batch {spec.batch}.")
    lines += ["", "The crops (seed 0) are taken from scikit-image's sample images "
              f"({', '.join(IMAGES)}): image chosen at random, side 40-100 % of its shorter edge, random "
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


def _load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def _command(argv: list[str]) -> str:
    """This run as a shell line: PYTHONPATH and OMP_NUM_THREADS if set, nice if niced."""
    env = [f"{key}={os.environ[key]}" for key in ("PYTHONPATH", "OMP_NUM_THREADS") if key in os.environ]
    nice = [f"nice -n {os.nice(0)}"] if os.nice(0) else []
    return " ".join([*env, *nice, "python tools/bench_calibration.py", shlex.join(argv)]).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="MODEL:COUNT[:independent],... (default: %(default)s)")
    parser.add_argument("--target", type=float, default=0.5, help="target_macs (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per run before it is killed")
    parser.add_argument("--out", default=str(REPO / "docs" / "bench_calibration.md"))
    parser.add_argument("--json", help="also write the raw rows here")
    parser.add_argument("--render", metavar="JSON", help="only rewrite --out from an earlier --json, run nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.render:
        saved = json.loads(pathlib.Path(args.render).read_text())
        pathlib.Path(args.out).write_text(markdown(saved["rows"], saved["models"], saved))
        return 0

    from fetch_models import default_cache_dir
    from onnx_lowrank import api

    started, load_before, provenance = time.perf_counter(), _load(), package_provenance()
    runs = parse_runs(args.runs)
    cache = default_cache_dir()
    models = {}
    for name in dict.fromkeys(name for name, _, _ in runs):
        path = MODELS[name].locate(cache)
        models[name] = {"path": str(path), **api.inspect(path, list(MODELS[name].input_shape(1))).totals_before}
    rows = []
    with tempfile.TemporaryDirectory(prefix="olr_calib_") as tmp:
        for name, count, sequential in runs:
            row = run_one(name, count, sequential, pathlib.Path(models[name]["path"]), pathlib.Path(tmp),
                          args.target, args.timeout)
            rows.append(row)
            print(f"{name} {count} {'sequential' if sequential else 'independent'}: {row['status']} "
                  f"{row['seconds']:.1f} s, peak {_mib(row.get('peak_mib'))} MiB (load {_load()})",
                  file=sys.stderr, flush=True)
    command = _command(sys.argv[1:] if argv is None else argv)
    context = {"machine": machine(), "provenance": provenance, "target": args.target,
               "load_before": load_before, "load_after": _load(), "total_s": time.perf_counter() - started,
               "command": command}
    text = markdown(rows, models, context)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(text)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"rows": rows, "models": models, **context}, indent=1))
    print(text)
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
