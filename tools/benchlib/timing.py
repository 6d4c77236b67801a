"""CPU latency for the benchmarks: two models timed interleaved, and a model's kernel-time profile.

Every end-to-end comparison goes through `interleaved`, i.e. the package's own
`compare_latency` (after warm-up, the timed runs alternate between the two models, AB BA AB ...,
so drifts in clock speed and background load hit both alike; speed-up = median before / median
after), on the CPU provider with `threads` intra-op threads.
"""

from __future__ import annotations

import json
import pathlib
import tempfile

import numpy as np

from benchlib.inference import session

#: A quick interleaved timing: about this many seconds of runs, within these run counts per
#: model, after this many warm-up runs ...
QUICK = dict(seconds=5, runs=(30, 300), warmup=5)
#: ... and a longer one, to re-time a case measured slower than the original.
LONG = dict(seconds=15, runs=(50, 400), warmup=10)
#: Ops whose kernel time a factorization can shorten (unless depthwise), as the profile names them.
DENSE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul")


def interleaved(before, after, feed: dict, threads: int | None, warmup: int, repeats: int):
    """`onnx_lowrank.timing.compare_latency` of two models (paths or protos) on the CPU provider."""
    from onnx_lowrank.timing import compare_latency

    return compare_latency(before, after, feed, provider="cpu", warmup=warmup, repeats=repeats, threads=threads)


def sized(before: pathlib.Path, after: pathlib.Path, feed: dict, threads: int, *, seconds: float,
          runs: tuple[int, int], warmup: int):
    """`interleaved`, sized to about `seconds` of runs (at least `runs[0]`, at most `runs[1]` per
    model) from a 10-run probe (`QUICK`, `LONG`). Returns its `LatencyComparison`."""
    probe = interleaved(before, after, feed, threads, warmup=5, repeats=10)
    repeats = int(np.clip(1000 * seconds / (probe.before.median_ms + probe.after.median_ms), *runs))
    return interleaved(before, after, feed, threads, warmup=warmup, repeats=repeats)


def time_shares(path: pathlib.Path, feed: dict[str, np.ndarray], threads: int, runs: int = 30) -> dict[str, float]:
    """Shares of the model's kernel time (onnxruntime CPU profile over `runs` runs) by kind:
    `dense` (`DENSE_OPS` with more than one input channel per group: what a factorization can
    shorten), `depthwise` and `other` (activations, element-wise, resizes, layout reorders...)."""
    prefix = str(pathlib.Path(tempfile.gettempdir()) / "olr_bench_profile")
    runner = session(path, threads, enable_profiling=True, profile_file_prefix=prefix)
    for _ in range(runs):
        runner.run(None, feed)
    profile = pathlib.Path(runner.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    shares = {"dense": 0.0, "depthwise": 0.0, "other": 0.0}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        args = event["args"]
        kind = "other"
        if args.get("op_name") in DENSE_OPS:
            shapes = [next(iter(t.values())) for t in args.get("input_type_shape", [])]
            per_group = shapes[1][1] if len(shapes) > 1 and len(shapes[1]) > 2 else None
            kind = "depthwise" if per_group == 1 and shapes[0][1] > 1 else "dense"
        shares[kind] += float(event["dur"])
    total = sum(shares.values()) or 1.0
    return {k: v / total for k, v in shares.items()}
