"""One `onnx_lowrank.api.compress` call in a fresh child process, measured.

The parent calls `compress_in_child(model, out, settings)`; the child (`python -P -m
benchlib.child SPEC`) runs the call once and prints one JSON row: its status, wall time, resident
set before and peak after, seconds per pass and a summary of the `CompressionResult`. A fresh
process gives the call's peak memory alone, and a crash or a hang cannot take the benchmark down.

Memory is read from /proc/PID/status (VmRSS now, VmHWM the peak resident set).
`resource.getrusage(...).ru_maxrss` is recorded as `ru_maxrss_mib` to show that it is not
usable: Linux carries the parent's high-water mark into a child across (v)fork + exec, so in the
child it starts at the benchmark parent's own peak.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

from benchlib import TOOLS


def status_mib(key: str, pid: int | str = "self") -> float:
    """A field of /proc/PID/status in MiB: VmRSS (resident now) or VmHWM (peak resident)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def summary(result) -> dict:
    """The JSON parts of a `CompressionResult`: totals, per-layer decisions (the report
    contract's objects), validation (or None), rewritten layers and folded nodes."""
    return {"totals_before": result.totals_before, "totals_after": result.totals_after,
            "layers": [layer.to_dict() for layer in result.layers],
            "validation": result.validation.to_dict() if result.validation is not None else None,
            "rewritten": len(result.rewritten), "folded_nodes": result.folds.total}


def measured_compress(spec: dict) -> dict:
    """`compress(spec["model"], spec["out"], Settings(**spec["settings"]))` in this process, measured.

    The row: `status` ("ok"; "unreachable" or "input-error" for the tool's `InputError`; "error"
    for anything else, with `traceback`), `message`, `seconds` (wall time of the call),
    `cpu_seconds` (CPU time of the process, all its threads), `base_mib` (resident set before), `peak_mib` (peak resident set after), `ru_maxrss_mib`,
    and when it succeeded `timings` (seconds per pass) and the `summary` of the result.
    """
    import resource
    import traceback

    from onnx_lowrank import api
    from onnx_lowrank.config import Settings
    from onnx_lowrank.errors import InputError

    settings = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["settings"].items()})
    row = {"base_mib": status_mib("VmRSS")}
    start, cpu_start = time.perf_counter(), time.process_time()
    result = None
    try:
        result = api.compress(spec["model"], spec["out"], settings)
    except InputError as exc:
        row.update(status="unreachable" if "unreachable" in str(exc) else "input-error", message=str(exc))
    except Exception as exc:  # noqa: BLE001 - a bug to report
        row.update(status="error", message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    row.update(seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start,
               peak_mib=status_mib("VmHWM"),
               ru_maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)   # KiB on Linux
    if result is not None:
        timings: dict[str, float] = {}
        for timing in result.timings:
            timings[timing.name] = timings.get(timing.name, 0.0) + timing.seconds
        row.update(status="ok", timings=timings, **summary(result))
    return row


def compress_in_child(model: pathlib.Path, out: pathlib.Path, settings: dict, timeout: float | None = None,
                      env: dict | None = None) -> dict:
    """`measured_compress` of `settings` (a JSON object of `Settings` fields) in a fresh process.

    `env`: the child's environment (default: this one's). A child still running after `timeout`
    seconds is killed: status "timeout", with the peak memory it had reached. A child that dies
    gives status "error" with the end of its stderr.
    """
    import onnx_lowrank

    spec = json.dumps({"model": str(model), "out": str(out), "settings": settings})
    env = dict(os.environ if env is None else env)
    # The child imports this process's benchlib and onnx_lowrank (which may be a snapshot named by
    # PYTHONPATH); -P keeps the current folder from shadowing them.
    package_root = pathlib.Path(onnx_lowrank.__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(TOOLS), str(package_root), env.get("PYTHONPATH"))))
    start = time.perf_counter()
    with subprocess.Popen([sys.executable, "-P", "-m", "benchlib.child", spec], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env) as proc:
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


if __name__ == "__main__":
    print(json.dumps(measured_compress(json.loads(sys.argv[1])), default=str), flush=True)
