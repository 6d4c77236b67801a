"""Helpers the benchmark scripts share: reading a child's memory and rebuilding its Settings."""

from __future__ import annotations


def status_mib(key: str, pid: int | str = "self") -> float:
    """A field of /proc/PID/status in MiB: VmRSS (resident now) or VmHWM (peak resident).

    (`resource.getrusage(...).ru_maxrss` is not usable in a child process: Linux carries the
    parent's high-water mark across fork + exec.)
    """
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def settings_from(fields: dict):
    """`onnx_lowrank.config.Settings` from a JSON object (lists back to tuples)."""
    from onnx_lowrank.config import Settings

    return Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def measured_compress(spec: dict):
    """`onnx_lowrank.api.compress(spec["model"], spec["out"], settings_from(spec["settings"]))`, measured.

    Returns `(workspace, row)`; `workspace` is None when the call raised. `row`: `status` ("ok";
    "unreachable" or "input-error" for the tool's `InputError`; "error" for anything else, with
    `traceback`), `message`, `seconds` (wall time of the call), `base_mib` (resident set before),
    `peak_mib` (peak resident set after) and, when it succeeded, `timings` (seconds per pass).
    """
    import time
    import traceback

    from onnx_lowrank import api
    from onnx_lowrank.errors import InputError

    settings = settings_from(spec["settings"])
    row = {"base_mib": status_mib("VmRSS")}
    start = time.perf_counter()
    workspace = None
    try:
        workspace = api.compress(spec["model"], spec["out"], settings)
    except InputError as exc:
        row.update(status="unreachable" if "unreachable" in str(exc) else "input-error", message=str(exc))
    except Exception as exc:  # noqa: BLE001 - a bug to report
        row.update(status="error", message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    row.update(seconds=time.perf_counter() - start, peak_mib=status_mib("VmHWM"))
    if workspace is not None:
        timings: dict[str, float] = {}
        for name, elapsed, *_ in workspace.timings:          # PassManager: (pass, seconds, result)
            timings[str(name)] = timings.get(str(name), 0.0) + float(elapsed)
        row.update(status="ok", timings=timings)
    return workspace, row


def export_torch(model, example, path, input_name: str, output_name: str):
    """Export a torch module to ONNX at `path` (TorchScript exporter, opset 17, dynamic batch,
    IR version at most 10 for onnxruntime), checked, written to a temporary name and renamed into
    place so an interrupted export leaves no partial model. Returns `path`."""
    import os
    import pathlib

    import onnx
    import torch

    path = pathlib.Path(path)
    tmp = path.with_suffix(".onnx.tmp")
    torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=17,
                      input_names=[input_name], output_names=[output_name],
                      dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, do_constant_folding=True)
    proto = onnx.load(str(tmp))
    proto.ir_version = min(proto.ir_version, 10)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return path
