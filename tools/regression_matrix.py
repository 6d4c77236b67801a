#!/usr/bin/env python3
"""A fixed matrix of `compress` runs whose outputs must not move across a restructuring.

"A redesign moves no number": before a refactor, snapshot the outputs of every compressed model
of the matrix (zoo and bundled model x every method at ``--rank-ratio 0.5`` and ``--method auto
--target-macs 0.5`` x with and without ``--calib``), then snapshot again after and compare::

    python tools/regression_matrix.py snapshot BEFORE_DIR [--models digits,ppocrv4-rec] [--jobs 2]
    python tools/regression_matrix.py snapshot AFTER_DIR ...
    python tools/regression_matrix.py compare BEFORE_DIR AFTER_DIR [--tolerance 1e-6]

Each run goes through the command line in a child process (`onnx-lowrank compress ... --no-validate`),
so the script depends on nothing inside the package and survives any reorganisation of it. The
compressed model is then run in onnxruntime (CPU, one thread) on fixed evaluation inputs, and
its outputs are saved (``DIR/<case>.npz``) with the exit code and the error line of a run that
failed (``DIR/index.json``). `compare` reports, per case, the largest relative L2 distance of
any output, and any case whose exit code changed; it exits 1 when a case is over the tolerance.
Calibration inputs are random (seeded) and shaped like the evaluation inputs: the matrix checks
that the numbers stay put, not that they are good.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from benchlib import datasets as ds
from benchlib.inference import run_model
from fetch_models import default_cache_dir, load_zoo

METHODS = ("svd", "spatial-svd", "tiled-svd", "tucker2", "cp", "cp-depthwise", "versatile", "versatile-channel")
CALIB_COUNT = 4
EVAL_COUNT = 2
#: Scalar integer inputs that select a branch need a value the model accepts.
SCALAR_VALUES = {"sr": 16000}
RUN_TIMEOUT_S = 1200


def configurations() -> list[tuple[str, list[str]]]:
    """(label, compress flags) of every configuration of the matrix, without --calib."""
    rows = [(method, ["--method", method] + ([] if method.startswith("versatile") else ["--rank-ratio", "0.5"]))
            for method in METHODS]
    rows.append(("auto-0.5", ["--method", "auto", "--target-macs", "0.5"]))
    return rows


def models(cache: pathlib.Path, names: list[str] | None) -> dict[str, tuple[pathlib.Path, list[str]]]:
    """name -> (path, --input-shape pins): the bundled digits model and every cached zoo model."""
    found = {"digits": (ds.DIGITS_MODEL, ["input:1x1x8x8"])}
    for name, entry in load_zoo().items():
        path = cache / f"{name}.onnx"
        if path.exists():
            found[name] = (path, list(entry["input_shape"]))
    if names:
        missing = sorted(set(names) - found.keys())
        if missing:
            raise SystemExit(f"regression_matrix: not available: {', '.join(missing)} (fetch them first)")
        found = {name: found[name] for name in names}
    return found


def _samples(path: pathlib.Path, pins: list[str], count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """`count` feeds of the model's inputs at their pinned shapes: uniform [0, 1) floats,
    SCALAR_VALUES for named scalars, ones for other integers (valid token ids and masks)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    pinned = {item.split(":")[0]: [int(d) for d in item.split(":")[1].split("x")] for item in pins}
    rng = np.random.default_rng(seed)
    feeds = [{} for _ in range(count)]
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        dims = pinned.get(value.name) or [d.dim_value or 1 for d in tensor.shape.dim]
        for feed in feeds:
            if not dims:
                feed[value.name] = np.array(SCALAR_VALUES.get(value.name, 0), dtype=dtype)
            elif np.issubdtype(dtype, np.floating):
                feed[value.name] = rng.random(dims).astype(dtype)
            else:
                feed[value.name] = np.ones(dims, dtype)
    return feeds


def _save_feeds(path: pathlib.Path, feeds: list[dict[str, np.ndarray]]) -> None:
    np.savez(path, **{f"{index}/{name}": value for index, feed in enumerate(feeds) for name, value in feed.items()})


def _load_feeds(path: pathlib.Path) -> list[dict[str, np.ndarray]]:
    archive = np.load(path)
    feeds: dict[int, dict[str, np.ndarray]] = {}
    for key in archive.files:
        index, name = key.split("/", 1)
        feeds.setdefault(int(index), {})[name] = archive[key]
    return [feeds[i] for i in sorted(feeds)]


def _calibration_file(path: pathlib.Path, feeds: list[dict[str, np.ndarray]]) -> None:
    """The CLI's .npz: per input, the samples stacked on axis 0 (scalars as a vector)."""
    np.savez(path, **{name: np.stack([f[name] for f in feeds]) if feeds[0][name].ndim == 0
                      else np.concatenate([f[name] for f in feeds]) for name in feeds[0]})


def _case(spec: dict) -> dict:
    out_dir = pathlib.Path(spec["out_dir"])
    with tempfile.TemporaryDirectory() as tmp:
        output = pathlib.Path(tmp) / "small.onnx"
        command = [sys.executable, "-m", "onnx_lowrank", "compress", spec["model"], "-o", str(output),
                   "--no-validate", *spec["flags"]]
        for pin in spec["pins"]:
            command += ["--input-shape", pin]
        if spec["calib"]:
            command += ["--calib", spec["calib"], "--calib-count", str(CALIB_COUNT)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)
            code, error = done.returncode, (done.stderr.strip().splitlines() or [""])[-1]
        except subprocess.TimeoutExpired:
            code, error = -1, f"timed out after {RUN_TIMEOUT_S} s"
        row = {"case": spec["case"], "exit": code, "error": error if code else None}
        if code == 0:
            outputs = run_model(output, _load_feeds(pathlib.Path(spec["eval"])), stack=True)
            np.savez(out_dir / f"{spec['case']}.npz", **outputs)
    return row


def snapshot(out_dir: pathlib.Path, names: list[str] | None, jobs: int, cache: pathlib.Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, (path, pins) in models(cache, names).items():
        eval_path, calib_path = out_dir / f"{name}.eval.npz", out_dir / f"{name}.calib.npz"
        evaluation = _samples(path, pins, EVAL_COUNT, seed=1)
        _save_feeds(eval_path, evaluation)
        _calibration_file(calib_path, _samples(path, pins, CALIB_COUNT, seed=2))
        np.savez(out_dir / f"{name}.original.npz", **run_model(path, evaluation, stack=True))
        for label, flags in configurations():
            for calib in (False, True):
                specs.append({"case": f"{name}.{label}{'.calib' if calib else ''}", "model": str(path),
                              "pins": pins, "flags": flags, "calib": str(calib_path) if calib else None,
                              "eval": str(eval_path), "out_dir": str(out_dir)})
    rows = []
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        for row in pool.map(_case, specs):
            rows.append(row)
            print(f"{row['case']}: exit {row['exit']}" + (f" ({row['error']})" if row["error"] else ""), flush=True)
    (out_dir / "index.json").write_text(json.dumps(rows, indent=1))


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    norm = np.linalg.norm(a)
    return float(np.linalg.norm(a - b) / norm) if norm > 0 else float(np.linalg.norm(b))


def compare(before: pathlib.Path, after: pathlib.Path, tolerance: float) -> int:
    old = {row["case"]: row for row in json.loads((before / "index.json").read_text())}
    new = {row["case"]: row for row in json.loads((after / "index.json").read_text())}
    worst, bad = 0.0, 0
    for case in sorted(old.keys() & new.keys()):
        a, b = old[case], new[case]
        if a["exit"] != b["exit"]:
            print(f"{case}: exit {a['exit']} -> {b['exit']} ({b['error'] or a['error']})")
            bad += 1
            continue
        if a["exit"] != 0:
            continue
        x, y = np.load(before / f"{case}.npz"), np.load(after / f"{case}.npz")
        distance = max(_rel_l2(x[k], y[k]) for k in x.files)
        worst = max(worst, distance)
        if distance > tolerance:
            print(f"{case}: relative L2 {distance:.3g} > {tolerance:g}")
            bad += 1
    missing = sorted(old.keys() ^ new.keys())
    if missing:
        print(f"cases in one snapshot only: {', '.join(missing)}")
    print(f"{len(old.keys() & new.keys())} cases compared, {bad} moved; largest relative L2 {worst:.3g}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    take = commands.add_parser("snapshot")
    take.add_argument("out_dir", type=pathlib.Path)
    take.add_argument("--models", help="comma-separated names (default: digits and every cached zoo model)")
    take.add_argument("--jobs", type=int, default=2)
    take.add_argument("--cache-dir", type=pathlib.Path, default=default_cache_dir())
    check = commands.add_parser("compare")
    check.add_argument("before", type=pathlib.Path)
    check.add_argument("after", type=pathlib.Path)
    check.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args(argv)
    if args.command == "snapshot":
        snapshot(args.out_dir, args.models.split(",") if args.models else None, args.jobs, args.cache_dir)
        return 0
    return compare(args.before, args.after, args.tolerance)


if __name__ == "__main__":
    sys.exit(main())
