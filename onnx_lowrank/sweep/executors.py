"""Where a sweep's work runs: in this process, or as tasks on a Ray cluster.

Both executors take the same calls: `put` a value every task reads, `submit` a function with
arguments (values, `put` handles or handles of earlier tasks), `get` results. The local one runs
a task when its result is first asked for, so a sweep holds only the results it is using; the
Ray one submits at once and lets the cluster schedule, passing values between tasks through its
object store (`ray.put`, task results as arguments), never through the file system.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Callable, Sequence

from onnx_lowrank.errors import InputError

__all__ = ["EXECUTORS", "LocalExecutor", "RayExecutor", "make_executor"]

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
#: What `--executor ray` says when Ray is not installed.
RAY_MISSING = "--executor ray needs Ray: pip install 'onnx-lowrank[ray]'"
#: The environment variables that set BLAS threads, in OpenBLAS's order of precedence.
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class _Deferred:
    """A call run the first time its result is asked for (arguments that are deferred first)."""

    def __init__(self, fn: Callable, args: tuple):
        self.fn, self.args = fn, args
        self.done, self.value = False, None

    def result(self):
        if not self.done:
            args = [arg.result() if isinstance(arg, _Deferred) else arg for arg in self.args]
            self.value, self.done, self.fn, self.args = self.fn(*args), True, None, ()
        return self.value


class LocalExecutor:
    """Every task in this process, one after the other, when its result is first needed."""

    name = "local"

    def put(self, value):
        """`value` itself: tasks here share this process's memory."""
        return value

    def submit(self, fn: Callable, *args, gpus: int = 0) -> _Deferred:
        """`fn(*args)`, run when `get` asks for it (`gpus` is a scheduling hint for clusters)."""
        return _Deferred(fn, args)

    def get(self, handles: Sequence) -> list:
        """The results of `handles`, in order."""
        return [handle.result() if isinstance(handle, _Deferred) else handle for handle in handles]

    def close(self) -> None:
        """Nothing to release."""


class RayExecutor:
    """Tasks on a Ray cluster: a local one started for the sweep, or an existing one at `address`.

    The workers import this very `onnx_lowrank` package, shipped with the job (Ray's runtime
    environment `py_modules`), so a cluster needs only the dependencies installed; each task takes
    one CPU (and `gpus` GPUs when asked). A task's exception comes back as itself.

    The workers' BLAS uses as many threads as this process's (`blas_threads`): a different count
    sums in a different order, and the fits would differ from the local executor's in the last
    bits (Ray's default for a one-CPU task is one thread).
    """

    name = "ray"

    def __init__(self, address: str | None = None, cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise InputError(RAY_MISSING) from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            package = str(pathlib.Path(__file__).resolve().parent.parent)
            try:
                threads = str(blas_threads())
                # "local": a new cluster even where another one's address is on file (/tmp/ray)
                ray.init(address=address or "local", num_cpus=cpus if address is None else None,
                         include_dashboard=False,
                         log_to_driver=False, runtime_env={"py_modules": [package], "env_vars": {
                             name: threads for name in BLAS_THREAD_VARIABLES}})
            except ConnectionError as exc:
                raise InputError(f"--ray-address {address}: cannot join a Ray cluster there ({exc})") from None
        log.info("Ray cluster: %s", ray.cluster_resources())
        self._remote: dict[Callable, object] = {}

    def put(self, value):
        """A handle to `value` in the object store, read by every task that takes it."""
        return self.ray.put(value)

    def submit(self, fn: Callable, *args, gpus: int = 0):
        """`fn(*args)` as a Ray task taking one CPU and `gpus` GPUs; returns its object reference."""
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(fn)
        return self._remote[fn].options(num_cpus=1, num_gpus=gpus).remote(*args)

    def get(self, handles: Sequence) -> list:
        """The results of `handles`, in order; a task's exception is raised as itself."""
        try:
            return self.ray.get(list(handles))
        except self.ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, Exception) else exc) from None

    def close(self) -> None:
        """Shut down the local cluster this executor started (a joined cluster stays up)."""
        if self.started:
            self.ray.shutdown()


def blas_threads() -> int:
    """The threads numpy's BLAS uses in this process: the first of `BLAS_THREAD_VARIABLES` set,
    else one per CPU this process may run on."""
    for name in BLAS_THREAD_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_executor(name: str, address: str | None = None):
    """The executor called `name` (`EXECUTORS`); `address` (Ray only) joins an existing cluster."""
    if name not in EXECUTORS:
        raise InputError(f"unknown executor '{name}'; expected one of {', '.join(EXECUTORS)}")
    if name == "local":
        if address is not None:
            raise InputError("--ray-address needs --executor ray")
        return LocalExecutor()
    return RayExecutor(address)
