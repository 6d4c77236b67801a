"""What a benchmark document says about where its numbers come from: the machine and versions,
the load, the command line that made it, and which commit the measured `onnx_lowrank` equals.

The package is edited (and committed) concurrently in the working tree; benchmarking a clean
snapshot (`git archive HEAD onnx_lowrank | tar -x -C DIR` and `PYTHONPATH=DIR`) and naming the
commit keeps the numbers attributable.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import platform
import shlex
import subprocess

from benchlib import REPO

#: Environment variables that change what a benchmark measures, shown in its command line.
COMMAND_ENV = ("PYTHONPATH", "OMP_NUM_THREADS")


def machine() -> str:
    """`CPU (N cores, ISA), platform, Python X, numpy Y, onnxruntime Z`; N: the cores this process may use."""
    import numpy as np
    import onnxruntime as ort

    cpu, isa = platform.processor() or platform.machine(), ""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name"))
        flags = next(ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags"))
        isa = ", AVX-512" if "avx512f" in flags else (", AVX2" if "avx2" in flags else "")
    except (OSError, StopIteration):
        pass
    return (f"{cpu} ({len(os.sched_getaffinity(0))} cores{isa}), {platform.platform()}, "
            f"Python {platform.python_version()}, "
            f"numpy {np.__version__}, onnxruntime {ort.__version__}")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, "0.81, 1.45, 1.56"."""
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def command_line(script: str, argv: list[str]) -> str:
    """This run as a shell line from the repository root: the `COMMAND_ENV` variables that are
    set, `nice` when niced, then `python tools/SCRIPT ARGS`."""
    env = [f"{key}={os.environ[key]}" for key in COMMAND_ENV if key in os.environ]
    nice = [f"nice -n {os.nice(0)}"] if os.nice(0) else []
    return " ".join([*env, *nice, f"python tools/{script}", shlex.join(argv)]).strip()


def snapshot_command(command: str) -> str | None:
    """The line that makes the package snapshot `command`'s PYTHONPATH names (None without one,
    or when it names this repository itself)."""
    folder = next((w.split("=", 1)[1] for w in shlex.split(command) if w.startswith("PYTHONPATH=")), None)
    if folder is None or pathlib.Path(folder).resolve() == REPO:
        return None
    return f"rm -rf {folder} && mkdir -p {folder} && git archive HEAD onnx_lowrank | tar -x -C {folder}"


def _blob_id(data: bytes) -> str:
    """The git object id of a file with these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def package_provenance(history: int = 30) -> str:
    """Which `onnx_lowrank` is measured: its folder, and the commit (HEAD or one of the `history`
    before it) whose onnx_lowrank/*.py files it equals, or the files that differ from HEAD."""
    import onnx_lowrank

    pkg = pathlib.Path(onnx_lowrank.__file__).resolve().parent
    mine = {f"onnx_lowrank/{f.relative_to(pkg).as_posix()}": _blob_id(f.read_bytes()) for f in pkg.rglob("*.py")}

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout

    def differences(commit: str) -> list[str]:
        tracked = {}
        for line in git("ls-tree", "-r", commit, "onnx_lowrank").splitlines():
            meta, name = line.split("\t", 1)
            if name.endswith(".py"):
                tracked[name] = meta.split()[2]
        return sorted(n for n in tracked.keys() | mine.keys() if tracked.get(n) != mine.get(n))

    where = f"onnx_lowrank imported from `{pkg}`"
    try:
        commits = git("rev-list", f"--max-count={history}", "HEAD").split()
        head_diff = differences(commits[0])
        if not head_diff:
            return f"{where}: its .py files are identical to commit {commits[0][:7]} (HEAD)"
        for commit in commits[1:]:
            if not differences(commit):
                return f"{where}: its .py files are identical to commit {commit[:7]} (HEAD is now {commits[0][:7]})"
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"{where} (git comparison failed: {exc})"
    return f"{where}: matches no recent commit; differs from HEAD {commits[0][:7]} in {', '.join(head_diff)}"
