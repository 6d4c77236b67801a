#!/usr/bin/env python3
"""Peak memory and wall time of data-aware `compress` as calibration count and model size grow.

Three sweeps, each case one `compress --method auto --target-macs T --calib ...` (data-aware,
sequential, output-weighted: the default) in a fresh child process (`benchlib.child`), peak
resident set from /proc:

* **vgg**: a VGG16-shaped classifier (13 3x3 convolutions 64..512 channels, 5 max-pools, a dense
  head `MatMul (s/32)²·512 x 64` after an NHWC flatten as tf2onnx exports Keras, then 64 x 10),
  random He-initialised weights, built with onnx helpers; random images as calibration inputs,
  16 / 64 / 256 / 1024 of them (`--vgg-counts`), at `--vgg-size` (240 gives the 25088-wide head
  of the issue's model). `--vgg-targets` adds the targets of the full-size check.
* **transformer**: synthetic encoders (hidden 1024, MLP 4096, attention and residuals; MatMul
  layers with constant weights), 100 MB to 2.5 GB of float32 weights, saved with external data;
  a few calibration sequences of 128 tokens.
* **zoo**: the cached zoo models (`tools/fetch_models.py`) with random inputs of their zoo shapes.

Writes docs/bench_scale.md and docs/bench_scale.png (peak memory and time against calibration
count and against weight bytes). Usage::

    python tools/bench_scale.py [--sweeps vgg,transformer,zoo] [--vgg-size 240] [--vgg-counts 16,64,256,1024]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from benchlib import REPO  # noqa: E402
from benchlib.child import compress_in_child  # noqa: E402
from benchlib.cli import log, names, numbers, work_folder  # noqa: E402
from benchlib.markdown import generated_by, publish, pyplot, save_figure, table  # noqa: E402
from benchlib.provenance import command_line, machine, package_provenance  # noqa: E402
from benchlib.zoo import zoo_feeds  # noqa: E402

VGG_CHANNELS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
TRANSFORMER_SIZES_MB = (100, 500, 1000, 2500)
HIDDEN, MLP, SEQUENCE = 1024, 4096, 128
TIMEOUT_S = 3600
#: Calibration images per run of the VGG16-shaped model.
VGG_BATCH = 16


def vgg16(path: pathlib.Path, size: int, seed: int = 0, classes: int = 10) -> pathlib.Path:
    """A VGG16-shaped model with NHWC input `[N, size, size, 3]` (random He-initialised weights)."""
    rng = np.random.default_rng(seed)
    inits, nodes, current, channels = [], [helper.make_node("Transpose", ["input"], ["x0"], perm=[0, 3, 1, 2])], "x0", 3
    for index, out in enumerate(VGG_CHANNELS):
        if out == "M":
            nodes.append(helper.make_node("MaxPool", [current], [f"p{index}"], kernel_shape=[2, 2], strides=[2, 2]))
            current = f"p{index}"
            continue
        weight = rng.standard_normal((out, channels, 3, 3)) * math.sqrt(2 / (9 * channels))
        inits += [numpy_helper.from_array(weight.astype(np.float32), f"w{index}"),
                  numpy_helper.from_array(np.zeros(out, np.float32), f"b{index}")]
        nodes += [helper.make_node("Conv", [current, f"w{index}", f"b{index}"], [f"c{index}"], name=f"conv{index}",
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{index}"], [f"r{index}"])]
        current, channels = f"r{index}", out
    width = (size // 32) ** 2 * 512
    inits += [numpy_helper.from_array(np.array([-1, width], np.int64), "flat"),
              numpy_helper.from_array((rng.standard_normal((width, 64)) * math.sqrt(2 / width)).astype(np.float32), "d0"),
              numpy_helper.from_array((rng.standard_normal((64, classes)) / 8).astype(np.float32), "d1")]
    nodes += [helper.make_node("Transpose", [current], ["nhwc"], perm=[0, 2, 3, 1]),
              helper.make_node("Reshape", ["nhwc", "flat"], ["features"]),
              helper.make_node("MatMul", ["features", "d0"], ["h"], name="dense0"),
              helper.make_node("Relu", ["h"], ["hr"]),
              helper.make_node("MatMul", ["hr", "d1"], ["logits"], name="dense1"),
              helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    graph = helper.make_graph(nodes, "vgg16", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                             ["N", size, size, 3])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def encoder(path: pathlib.Path, megabytes: int, seed: int = 0) -> pathlib.Path:
    """A transformer encoder of about `megabytes` MB of float32 weights, saved with external data.

    Per layer: q, k, v, o projections (HIDDEN x HIDDEN), softmax attention over the sequence, a
    residual, an MLP HIDDEN -> MLP -> HIDDEN with ReLU and a residual; input `[N, SEQUENCE, HIDDEN]`.
    """
    per_layer = 4 * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * MLP)
    layers = max(1, round(megabytes * 1e6 / per_layer))
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    scale = numpy_helper.from_array(np.array(1 / math.sqrt(HIDDEN), np.float32), "scale")
    inits.append(scale)

    def weight(name: str, rows: int, cols: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal((rows, cols)) / math.sqrt(rows)).astype(np.float32),
                                             name))
        return name

    for i in range(layers):
        q, k, v, a, o, r, h, m, y = (f"l{i}_{s}" for s in "qkvaorhmy")
        nodes += [helper.make_node("MatMul", [x, weight(f"wq{i}", HIDDEN, HIDDEN)], [q], name=f"q{i}"),
                  helper.make_node("MatMul", [x, weight(f"wk{i}", HIDDEN, HIDDEN)], [k], name=f"k{i}"),
                  helper.make_node("MatMul", [x, weight(f"wv{i}", HIDDEN, HIDDEN)], [v], name=f"v{i}"),
                  helper.make_node("Transpose", [k], [k + "t"], perm=[0, 2, 1]),
                  helper.make_node("MatMul", [q, k + "t"], [a + "s"]),
                  helper.make_node("Mul", [a + "s", "scale"], [a + "m"]),
                  helper.make_node("Softmax", [a + "m"], [a], axis=-1),
                  helper.make_node("MatMul", [a, v], [a + "v"]),
                  helper.make_node("MatMul", [a + "v", weight(f"wo{i}", HIDDEN, HIDDEN)], [o], name=f"o{i}"),
                  helper.make_node("Add", [x, o], [r]),
                  helper.make_node("MatMul", [r, weight(f"w1{i}", HIDDEN, MLP)], [h], name=f"mlp_in{i}"),
                  helper.make_node("Relu", [h], [h + "r"]),
                  helper.make_node("MatMul", [h + "r", weight(f"w2{i}", MLP, HIDDEN)], [m], name=f"mlp_out{i}"),
                  helper.make_node("Add", [r, m], [y])]
        x = y
    graph = helper.make_graph(nodes, "encoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                               ["N", SEQUENCE, HIDDEN])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", SEQUENCE, HIDDEN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return path


def weight_bytes(path: pathlib.Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)


def case(label: str, model: pathlib.Path, calib: pathlib.Path, count: int, target: float, shapes: list[str],
         work: pathlib.Path, max_memory: str | None = None) -> dict:
    """One data-aware `compress` in a child; the batch is the pinned shapes' first dimension."""
    settings = {"method": "auto", "target_macs": target, "calib": str(calib), "calib_count": count,
                "validate": False, "input_shape": shapes, "max_memory": max_memory}
    log(f"{label}: {model.name}, {count} calibration inputs, target {target}")
    row = compress_in_child(model, work / f"{model.stem}_{count}_{target}.onnx", settings, timeout=TIMEOUT_S)
    row.update(label=label, model=model.stem, count=count, target=target, weights=weight_bytes(model),
               max_memory=max_memory or "default")
    log(f"  {row['status']}: {row.get('seconds', 0):.1f} s ({row.get('cpu_seconds', 0):.0f} CPU s), "
        f"peak {row.get('peak_mib', float('nan')):.0f} MiB"
        + (f" ({row.get('message')})" if row["status"] != "ok" else ""))
    return row


def vgg_rows(work: pathlib.Path, size: int, counts: list[int], targets: list[float],
             max_memory: str | None = None) -> list[dict]:
    model = vgg16(work / f"vgg16_{size}.onnx", size)
    rows = []
    for count in counts:
        calib = work / f"vgg_calib_{count}.npz"
        np.savez(calib, input=np.random.default_rng(count).random((count, size, size, 3), dtype=np.float32))
        for target in (targets if count == counts[-1] else targets[:1]):
            rows.append(case("vgg", model, calib, count, target, [f"input:{VGG_BATCH}x{size}x{size}x3"], work,
                             max_memory))
        calib.unlink()
    return rows


def transformer_rows(work: pathlib.Path, sizes: list[int], count: int = 8,
                     max_memory: str | None = None) -> list[dict]:
    rows = []
    for megabytes in sizes:
        model = encoder(work / f"encoder_{megabytes}mb.onnx", megabytes)
        calib = work / "encoder_calib.npz"
        np.savez(calib, x=np.random.default_rng(1).standard_normal((count, SEQUENCE, HIDDEN)).astype(np.float32))
        rows.append(case("transformer", model, calib, count, 0.5, [f"x:1x{SEQUENCE}x{HIDDEN}"], work, max_memory))
        for stale in work.glob(f"encoder_{megabytes}mb*"):
            stale.unlink()
    return rows


def zoo_rows(work: pathlib.Path, count: int = 16) -> list[dict]:
    import tomllib

    from fetch_models import default_cache_dir

    rows = []
    for entry in tomllib.loads((REPO / "models" / "zoo.toml").read_text())["model"]:
        path = default_cache_dir() / f"{entry['name']}.onnx"
        if not path.exists() or entry["task"] == "audio":      # audio models: inputs not batched on axis 0
            continue
        shapes = list(entry.get("input_shape", []))
        feeds = zoo_feeds(entry["name"], onnx.load(str(path), load_external_data=False), shapes, count, seed=3)
        calib = work / f"{entry['name']}_calib.npz"
        np.savez(calib, **{name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]})
        rows.append(case("zoo", path, calib, count, 0.7, shapes, work))
    return rows


def _cell(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if row.get("status") == "ok" and key in row else row.get("status", "?")


def markdown_text(rows: list[dict], command: str) -> str:
    lines = ["# Scale: memory and time of data-aware compression", "", *generated_by("bench_scale.py", command),
             f"Machine: {machine()}. {package_provenance()}", "",
             "Each row is one `compress --method auto --target-macs T --calib ...` (data-aware, sequential, "
             "output-weighted: the defaults; no validation) in a fresh child process. *peak MiB*: the child's "
             "peak resident set (VmHWM), whole process (Python, onnxruntime, the model). *weights MiB*: float32 "
             "weight bytes of the model. *max memory*: `--max-memory` (default: half the available memory). "
             "*CPU s*: CPU time of all the child's threads (on an otherwise idle 2-core machine the wall time is at "
             "least half of it). *budget ok*: peak below weights + 2 GiB.", ""]
    body = []
    for row in rows:
        weights = row["weights"] / 2**20
        ok = row.get("status") == "ok" and row["peak_mib"] < weights + 2048
        body.append([row["label"], row["model"], str(row["count"]), f"{row['target']:g}",
                     row.get("max_memory", "default"), f"{weights:,.0f}", _cell(row, "peak_mib", ",.0f"), _cell(row, "seconds", ".1f"),
                     _cell(row, "cpu_seconds", ".1f"),
                     "yes" if ok else "**no**"])
    lines += table(["sweep", "model", "calib inputs", "target", "max memory", "weights MiB", "peak MiB", "seconds",
                    "CPU s", "budget ok"], body, "llrrlrrrrl")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path) -> None:
    plt = pyplot()
    fig, (by_count, by_size) = plt.subplots(1, 2, figsize=(10, 4))
    vgg = [r for r in rows if r["label"] == "vgg" and r.get("status") == "ok" and r["target"] == rows[0]["target"]]
    big = [r for r in rows if r["label"] == "transformer" and r.get("status") == "ok"]
    for axes, data, x, xlabel in ((by_count, vgg, "count", "calibration inputs (VGG16-shaped)"),
                                  (by_size, big, "weights", "weight bytes (MiB, transformer encoders)")):
        xs = [r[x] / (2**20 if x == "weights" else 1) for r in data]
        axes.plot(xs, [r["peak_mib"] for r in data], "o-", label="peak MiB")
        twin = axes.twinx()
        twin.plot(xs, [r["seconds"] for r in data], "s--", color="tab:orange", label="seconds")
        axes.set_xlabel(xlabel)
        axes.set_ylabel("peak resident MiB")
        twin.set_ylabel("seconds")
        axes.grid(alpha=0.3)
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", default="vgg,transformer,zoo")
    parser.add_argument("--vgg-size", type=int, default=240)
    parser.add_argument("--vgg-counts", default="16,64,256,1024")
    parser.add_argument("--vgg-targets", default="0.5,0.25")
    parser.add_argument("--transformer-mb", default=",".join(map(str, TRANSFORMER_SIZES_MB)))
    parser.add_argument("--out", default=str(REPO / "docs" / "bench_scale.md"))
    parser.add_argument("--keep", help="keep the work folder here")
    parser.add_argument("--max-memory", help="compress's --max-memory for every case (default: its own default)")
    args = parser.parse_args(argv)
    sweeps = names(args.sweeps)
    rows: list[dict] = []
    with work_folder(args.keep, "olr_scale_") as work:
        if "vgg" in sweeps:
            rows += vgg_rows(work, args.vgg_size, [int(c) for c in numbers(args.vgg_counts)], numbers(args.vgg_targets),
                             args.max_memory)
        if "transformer" in sweeps:
            rows += transformer_rows(work, [int(m) for m in numbers(args.transformer_mb)], max_memory=args.max_memory)
        if "zoo" in sweeps:
            rows += zoo_rows(work)
    out = pathlib.Path(args.out)
    publish(out, markdown_text(rows, command_line("bench_scale.py", sys.argv[1:] if argv is None else argv)))
    if any(r["label"] in ("vgg", "transformer") for r in rows):
        plot(rows, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
