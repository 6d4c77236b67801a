"""`onnx-lowrank sweep`: the accuracy / speed frontier of a model in one call, locally or on Ray.

A sweep compresses a model at several MAC targets with several methods (each point one
`compress` with the same settings otherwise), measuring the statistics every point shares only
once (inputs, the calibration walk's data spectra, output gains: `passes.shared`), times every
compressed model against the original in one interleaved run, and marks the Pareto points::

    from onnx_lowrank import Settings
    from onnx_lowrank.sweep import sweep

    result = sweep("model.onnx", Settings(calib="calib.npz", eval="eval.npz", metric="top1"),
                   targets=(0.7, 0.5, 0.3), methods=("auto",), output="frontier/")
    [(p.target, p.macs_kept, p.speedup, p.metric, p.pareto) for p in result.points]
    result.figure()   # the Pareto plot

Modules: `options` (what to sweep), `work` (the tasks), `executors` (local or Ray), `run`
(orchestration), `points` / `result` (the frontier), `files` / `plot` (what is written),
`fleet` (models.toml), `cli` (the subcommand).
"""

from onnx_lowrank.sweep.executors import LocalExecutor, RayExecutor
from onnx_lowrank.sweep.options import SweepModel, SweepOptions
from onnx_lowrank.sweep.points import SweepPoint
from onnx_lowrank.sweep.result import SweepResult
from onnx_lowrank.sweep.run import sweep, sweep_models

__all__ = ["LocalExecutor", "RayExecutor", "SweepModel", "SweepOptions", "SweepPoint", "SweepResult", "sweep",
           "sweep_models"]
