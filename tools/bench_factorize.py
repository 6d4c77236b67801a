"""Time the factorizations and print a Markdown table (seconds, peak memory, error).

Cases: each method on one random 512x512x3x3 kernel (ResNet-50's largest 3x3 conv), and
Tucker-2 and channel SVD over a synthetic set of kernels with ResNet-50's 53 conv shapes
(23.5 M parameters) at half the channels per mode. Random Gaussian kernels have flat spectra,
so the errors are pessimistic; the timings are what this measures. Each case runs twice:
once for the time, once under tracemalloc for the peak of numpy allocations.

Usage: python tools/bench_factorize.py [--seed N] [--skip-resnet]
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
from benchlib import provenance

from onnx_lowrank import factorize


def resnet50_conv_shapes() -> list[tuple[int, int, int, int]]:
    """The [T, S, kh, kw] of ResNet-50's convolutions (torchvision v1.5 layout), in order."""
    shapes = [(64, 3, 7, 7)]
    in_channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out_channels = 4 * width
        for block in range(blocks):
            shapes += [(width, in_channels, 1, 1), (width, width, 3, 3), (out_channels, width, 1, 1)]
            if block == 0:
                shapes.append((out_channels, in_channels, 1, 1))
            in_channels = out_channels
    return shapes


def measure(run: Callable[[], object]) -> tuple[float, float, object]:
    """Seconds of one run, and the tracemalloc peak (MiB) of a second run."""
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak, result


def main() -> None:
    """Run the cases and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-resnet", action="store_true", help="only the 512x512x3x3 cases")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    kernel = (rng.standard_normal((512, 512, 3, 3)) * 0.02).astype(np.float32)
    cases: list[tuple[str, str, str, Callable[[], object]]] = [
        ("channel SVD", "512x512x3x3", "r=256", lambda: factorize.channel_svd(kernel, 256)),
        ("spatial SVD", "512x512x3x3", "r=256", lambda: factorize.spatial_svd(kernel, 256)),
        ("tiled SVD 2x2", "512x512x3x3", "r=128", lambda: factorize.tiled_svd(kernel, (2, 2), 128)),
        ("Tucker-2 (HOSVD)", "512x512x3x3", "(256, 256)", lambda: factorize.tucker2(kernel, (256, 256))),
        (
            "Tucker-2 (HOOI x5)",
            "512x512x3x3",
            "(256, 256)",
            lambda: factorize.tucker2(kernel, (256, 256), n_iter_max=5),
        ),
        ("CP", "512x512x3x3", "R=256", lambda: factorize.cp(kernel, 256)),
        ("CP-depthwise", "512x512x3x3", "R=256", lambda: factorize.cp_depthwise(kernel, 256)),
    ]
    if not args.skip_resnet:
        shapes = resnet50_conv_shapes()
        kernels = [(rng.standard_normal(shape) * 0.02).astype(np.float32) for shape in shapes]
        n_params = sum(k.size for k in kernels)
        label = f"ResNet-50 convs ({len(kernels)}, {n_params / 1e6:.1f} M params)"
        cases += [
            (
                "Tucker-2 (HOSVD)",
                label,
                "(T/2, S/2)",
                lambda: [factorize.tucker2(k, (max(1, k.shape[0] // 2), max(1, k.shape[1] // 2))) for k in kernels],
            ),
            (
                "channel SVD",
                label,
                "half full rank",
                lambda: [factorize.channel_svd(k, max(1, min(k.shape[0], k[0].size) // 2)) for k in kernels],
            ),
        ]
    print(f"{provenance.machine()}\n")
    print("| method | kernel(s) | ranks | seconds | peak MiB (tracemalloc) | rel. error |")
    print("|---|---|---|---:|---:|---:|")
    for name, target, ranks, run in cases:
        seconds, peak, result = measure(run)
        results = result if isinstance(result, list) else [result]
        error = max(r.rel_error for r in results)
        extra = f" ({results[0].n_iter} sweeps, {results[0].stop_reason})" if hasattr(results[0], "stop_reason") else ""
        print(f"| {name} | {target} | {ranks} | {seconds:.2f} | {peak:.0f} | {error:.3f}{extra} |", flush=True)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"\nProcess peak RSS: {peak_rss:.0f} MiB. rel. error: the worst over the kernels.")


if __name__ == "__main__":
    main()
