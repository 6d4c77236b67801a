"""onnxruntime on the CPU for the benchmarks: a session, and a model run over a list of feeds.

The numbers the benchmarks score are computed here, always the same way: the CPU provider,
`threads` intra-op threads, one inter-op thread, warnings silenced.
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnxruntime as ort


def session(model: str | pathlib.Path | bytes, threads: int | None = None, log_severity: int = 3,
            **options) -> ort.InferenceSession:
    """A CPU session of `model` (a path or serialized bytes).

    `threads`: intra-op threads (None: onnxruntime's default); `options`: further
    `SessionOptions` attributes (e.g. `enable_profiling=True`, `graph_optimization_level=...`).
    """
    settings = ort.SessionOptions()
    if threads is not None:
        settings.intra_op_num_threads = threads
    settings.inter_op_num_threads = 1
    settings.log_severity_level = log_severity
    for name, value in options.items():
        setattr(settings, name, value)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, settings, providers=["CPUExecutionProvider"])


def run_model(model: str | pathlib.Path, feeds: list[dict[str, np.ndarray]], threads: int | None = 1,
              outputs: list[str] | None = None, stack: bool = False) -> dict[str, np.ndarray]:
    """The model's outputs (`outputs`, default all) over `feeds`, in one session.

    Each output's per-feed arrays are concatenated on the batch axis, or with `stack` stacked on
    a new axis 0 (one entry per feed: for models whose outputs have no batch axis).
    """
    runner = session(model, threads)
    names = outputs or [o.name for o in runner.get_outputs()]
    collected: dict[str, list] = {n: [] for n in names}
    for feed in feeds:
        for name, value in zip(names, runner.run(names, feed)):
            collected[name].append(value)
    return {name: np.stack(values) if stack else np.concatenate(values) for name, values in collected.items()}
