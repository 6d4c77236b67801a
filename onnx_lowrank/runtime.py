"""The one place onnxruntime is configured: providers, sessions, IR lowering and its logging.

- Providers (`resolve_provider`): ``auto`` is CUDA only when a probe session really runs on it,
  after pip's CUDA libraries are loaded (``onnxruntime.preload_dlls()``); otherwise CPU, with the
  probe's one-line reason (e.g. which library is missing) logged once. Provider options are built
  in `execution_providers` and nowhere else.
- Sessions (`make_session`) know whose model they run: onnxruntime failing on the user's model is
  `InputError` (exit 2), on a model the tool produced `InternalError` (exit 3, onnxruntime's
  error kept as ``__cause__`` for ``--debug``).
- A model with a newer IR version than onnxruntime reads (onnx 1.23 writes 14, onnxruntime 1.31
  reads 13) is loaded with it lowered in memory; nothing is written beside the user's file.
- onnxruntime's own logging is kept to errors, and sessions log nothing: their failures come
  back as exceptions, turned into one line here.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import io
import logging
import os
import pathlib
import platform
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import NoReturn

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from onnx_lowrank.errors import InputError, InternalError
from onnx_lowrank.serialize import save_with_external_data

__all__ = [
    "CONV_ALGO_SEARCHES", "CPU", "CUDA", "ENV_CACHE", "PROVIDERS", "TENSORRT", "ModelLike",
    "ProviderChoice", "Session", "cache_root", "execution_providers", "make_session",
    "probe_reason", "provider_name", "resolve_provider", "runtime_max_ir_version",
]

logger = logging.getLogger(__name__)

#: Values accepted by ``--provider``.
PROVIDERS = ("auto", "cuda", "tensorrt", "cpu")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
_NAMES = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT}
#: cuDNN convolution algorithm searches of the CUDA provider, most thorough first.
CONV_ALGO_SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
#: The tool's cache folder's environment variable (the models, latency.json, TensorRT engines).
ENV_CACHE = "ONNX_LOWRANK_CACHE"
_DEFAULT_CACHE_ROOT = "~/.cache/onnx-lowrank"

# onnxruntime log severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
_SESSION_LOG_SEVERITY = 4
_DEFAULT_LOG_SEVERITY = 3
#: Protobuf cannot serialise a message of 2 GiB or more: bigger models go by path.
_PROTO_LIMIT = 2**31 - 1
_IR_LIMIT = re.compile(r"max supported IR version: (\d+)")
_EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"

ModelLike = onnx.ModelProto | str | os.PathLike | bytes | ort.InferenceSession


def cache_root() -> pathlib.Path:
    """``$ONNX_LOWRANK_CACHE`` when set, else ``~/.cache/onnx-lowrank``."""
    env = os.environ.get(ENV_CACHE)
    return pathlib.Path(env or _DEFAULT_CACHE_ROOT).expanduser()


@functools.cache
def _quiet_default_logger() -> None:
    ort.set_default_logger_severity(_DEFAULT_LOG_SEVERITY)


# --------------------------------------------------------------------------------------------
# Providers


@dataclasses.dataclass(frozen=True)
class ProviderChoice:
    """Which onnxruntime execution providers a session asks for.

    Attributes:
        requested: what the user asked for (``auto``, ``cuda``, ``tensorrt``, ``cpu``).
        providers: the providers passed to ``InferenceSession``, preferred first, CPU last.
        reason: why ``auto`` fell back to CPU (``None`` when it did not).
        conv_algo_search: cuDNN's convolution algorithm search in timing sessions on CUDA, one
            of `CONV_ALGO_SEARCHES` (``EXHAUSTIVE``: every algorithm is tried on the first run).
    """

    requested: str
    providers: tuple[str, ...]
    reason: str | None = None
    conv_algo_search: str = "EXHAUSTIVE"

    def __post_init__(self):
        if self.conv_algo_search not in CONV_ALGO_SEARCHES:
            raise InputError(f"cudnn_conv_algo_search must be one of {', '.join(CONV_ALGO_SEARCHES)}, "
                             f"found '{self.conv_algo_search}'")

    @property
    def name(self) -> str:
        """The preferred provider, e.g. ``"CUDAExecutionProvider"``."""
        return self.providers[0]

    @property
    def on_gpu(self) -> bool:
        """True when the preferred provider runs on a CUDA device."""
        return self.name in (CUDA, TENSORRT)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ORT_PREFIX = re.compile(r"^\S+ \S+ \[[EWIVF]:onnxruntime:[^\]]*\] ")
_LOADER = re.compile(r"Failed to load library (\S+) with error: (.*)")
_PRELOAD = re.compile(r"^Failed to load (\S+): ")
_NOT_FOUND = re.compile(r"(\S+?): cannot open shared object file")


def probe_reason(captured: str, fallback: str) -> str:
    """One readable line out of what onnxruntime wrote while a provider was tried.

    A provider library that cannot be loaded because a library it needs is missing gives
    ``"cannot load libonnxruntime_providers_cuda.so: libcublasLt.so.13 is missing"``, followed
    by the other missing CUDA libraries `onnxruntime.preload_dlls` reported, if any, and how to
    install them. Otherwise the first loader error, failure to create the provider or other line,
    else `fallback`.
    """
    lines = [_ORT_PREFIX.sub("", _ANSI.sub("", ln)).strip() for ln in captured.splitlines()]
    lines = [ln for ln in lines if ln]
    preload_missing = [m.group(1) for m in map(_PRELOAD.match, lines) if m]
    for line in lines:
        loader = _LOADER.search(line)
        if not loader:
            continue
        library, error = pathlib.Path(loader.group(1)).name, loader.group(2).strip()
        missing = _NOT_FOUND.match(error)
        if not missing:
            return f"cannot load {library}: {error}"[:300]
        name = missing.group(1)
        others = [m for m in dict.fromkeys(preload_missing) if m != name]
        also = f" (also missing: {', '.join(others)})" if others else ""
        hint = "; pip install 'onnx-lowrank[cuda]' brings the CUDA libraries" if name.startswith(
            ("libcu", "libnvrtc", "libnvJitLink")) else ""
        return f"cannot load {library}: {name} is missing{also}{hint}"
    for line in lines:
        if "Failed to create" in line or "Require" in line:
            return line[:300]
    return lines[0][:300] if lines else fallback


class _Captured:
    text = ""


@contextlib.contextmanager
def _capture_fd2():
    """Send file descriptor 2 to a temporary file; its text is in ``.text`` on exit.

    onnxruntime logs provider load failures from C++ straight to fd 2, past Python's
    ``sys.stderr`` and past its own severity settings for some messages.
    """
    captured = _Captured()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield captured
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.text = tmp.read().decode("utf-8", errors="replace")


@functools.cache
def _preload_cuda_libraries() -> str:
    """Load pip's CUDA/cuDNN libraries with ``onnxruntime.preload_dlls()`` once; what it printed.

    ``preload_dlls(cuda=True, cudnn=True, msvc=True, directory=None)`` looks in the ``nvidia``
    site-packages first, then the default library paths, and prints ``Failed to load NAME: ...``
    for each library it cannot load (cuDNN's are optional). Older onnxruntime has no such function.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return ""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            preload()
        except Exception as exc:  # noqa: BLE001 - a failed preload leaves the probe to report
            return f"onnxruntime.preload_dlls failed: {exc}"
    return printed.getvalue()


def _probe_model(ir_version: int = 8) -> bytes:
    """A one-node float model, ``y = relu(x)`` on 4 values, to try a provider or an IR version with."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = ir_version
    return model.SerializeToString()


_PROBE_LOCK = threading.Lock()


@functools.cache
def _probe(provider: str) -> tuple[bool, str]:
    """Whether a session on ``provider`` really runs here, and why not. Cached per process."""
    available = ort.get_available_providers()
    if provider not in available:
        return False, f"this onnxruntime build has no {provider} (it has: {', '.join(available)})"
    providers = [provider, CUDA, CPU] if provider == TENSORRT else [provider, CPU]
    options = ort.SessionOptions()
    options.log_severity_level = _DEFAULT_LOG_SEVERITY
    _quiet_default_logger()
    # onnxruntime's Python layer also print()s "EP Error ... Falling back" to stdout.
    stdout = io.StringIO()
    with _PROBE_LOCK, _capture_fd2() as captured, contextlib.redirect_stdout(stdout):
        preloaded = _preload_cuda_libraries()
        try:
            session = ort.InferenceSession(_probe_model(), options, providers=providers)
            used = session.get_providers()[0]
            if used == provider:
                x = np.array([-1.0, 0.0, 1.0, 2.0], dtype=np.float32)
                y = session.run(None, {"x": x})[0]
                if not np.array_equal(y, np.maximum(x, 0)):
                    return False, f"a test run on {provider} gave wrong results"
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot use it"
            used, error = None, f"{type(exc).__name__}: {_first_line(exc)}"
        else:
            error = None
    if used == provider:
        logger.debug("%s works here", provider)
        return True, ""
    fallback = error or f"the session fell back to {used}"
    reason = probe_reason("\n".join((captured.text, stdout.getvalue(), preloaded)), fallback)
    logger.debug("%s does not work here: %s", provider, reason)
    return False, reason


def _nvidia_driver_present() -> bool:
    """Whether the NVIDIA driver's CUDA library loads (loading it does not touch the GPU)."""
    try:
        ctypes.CDLL("nvcuda.dll" if platform.system() == "Windows" else "libcuda.so.1")
    except OSError:
        return False
    return True


@functools.cache
def _report_fallback(reason: str) -> None:
    """Say once per process why ``auto`` runs on CPU: a warning where a GPU driver is installed."""
    level = logging.WARNING if _nvidia_driver_present() else logging.INFO
    logger.log(level, "--provider auto runs on CPU: CUDA cannot be used here (%s)", reason)


def resolve_provider(requested: str | ProviderChoice = "auto",
                     conv_algo_search: str = "EXHAUSTIVE") -> ProviderChoice:
    """The providers to run on for ``--provider auto|cuda|tensorrt|cpu``.

    ``auto`` is CUDA when a probe session on ``CUDAExecutionProvider`` is created and runs
    with CUDA as its first provider (the answer is cached per process; onnxruntime's messages
    are kept off the terminal), else CPU with the probe's reason. ``auto`` never picks
    TensorRT, whose engine builds take minutes; ask for it. onnxruntime's names are taken too;
    a `ProviderChoice` is returned as is.

    Raises:
        InputError: an unknown name or algorithm search, or ``cuda``/``tensorrt`` requested
            where onnxruntime cannot use it (the message says why).
    """
    if isinstance(requested, ProviderChoice):
        return requested
    name = {v: k for k, v in _NAMES.items()}.get(str(requested).strip(), str(requested).strip().lower())
    if name == "cpu":
        return ProviderChoice("cpu", (CPU,), conv_algo_search=conv_algo_search)
    if name == "auto":
        ok, reason = _probe(CUDA)
        if ok:
            return ProviderChoice("auto", (CUDA, CPU), conv_algo_search=conv_algo_search)
        _report_fallback(reason)
        return ProviderChoice("auto", (CPU,), reason=reason, conv_algo_search=conv_algo_search)
    if name in ("cuda", "tensorrt"):
        ok, reason = _probe(_NAMES[name])
        if not ok:
            label = "CUDA" if name == "cuda" else "TensorRT"
            raise InputError(f"{label} was requested but onnxruntime cannot use it here: {reason}")
        providers = (CUDA, CPU) if name == "cuda" else (TENSORRT, CUDA, CPU)
        return ProviderChoice(name, providers, conv_algo_search=conv_algo_search)
    raise InputError(f"unknown provider '{requested}'; expected one of {', '.join(PROVIDERS)}")


def provider_name(provider: str | ProviderChoice) -> str:
    """The onnxruntime provider name of `provider`: ``auto`` is resolved (a probe), ``cpu``,
    ``cuda``, ``tensorrt`` and onnxruntime's own names are not.

    Raises:
        InputError: an unknown name.
    """
    if isinstance(provider, ProviderChoice):
        return provider.name
    name = str(provider).strip()
    if name.endswith("ExecutionProvider"):
        return name
    if name.lower() == "auto":
        return resolve_provider("auto").name
    if name.lower() in _NAMES:
        return _NAMES[name.lower()]
    raise InputError(f"unknown provider '{provider}'; expected one of {', '.join(PROVIDERS)}")


# --------------------------------------------------------------------------------------------
# Session settings


def _tensorrt_cache() -> pathlib.Path | None:
    folder = cache_root() / "tensorrt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        logger.warning("TensorRT engine cache %s cannot be made (%s); engines are rebuilt each run",
                       folder, exc)
        return None
    return folder


def execution_providers(choice: ProviderChoice, timing: bool = False) -> list[str | tuple[str, dict]]:
    """The ``providers`` argument of ``InferenceSession`` for `choice`, options included.

    - CPU: the bare name (no options).
    - CUDA: ``cudnn_conv_algo_search`` is ``choice.conv_algo_search`` in timing sessions (whose
      warm-up runs the search) and ``HEURISTIC`` in others, which only need the numbers.
    - TensorRT: ``trt_engine_cache_enable`` and ``trt_timing_cache_enable`` with both caches in
      `cache_root()`/``tensorrt`` (engine builds take minutes; cached ones load in seconds),
      then CUDA as above for the nodes TensorRT does not take.
    """
    search = choice.conv_algo_search if timing else "HEURISTIC"
    providers: list[str | tuple[str, dict]] = []
    for name in choice.providers:
        if name == CUDA:
            providers.append((CUDA, {"cudnn_conv_algo_search": search}))
        elif name == TENSORRT:
            folder = _tensorrt_cache()
            options = {} if folder is None else {
                "trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder),
                "trt_timing_cache_enable": True, "trt_timing_cache_path": str(folder)}
            providers.append((TENSORRT, options))
        else:
            providers.append(name)
    return providers


def _session_options(threads: int | None, optimize: bool, timing: bool = False) -> ort.SessionOptions:
    """Session options; a timing session's idle intra-op threads sleep instead of spinning.

    Timings interleave several sessions in one process, each with its own thread pool: spinning
    threads of the session that just ran take cores from the next one (digits CNN, 4 sessions
    of 2 threads on 2 cores: medians 14 to 28 times apart, against 1.2 run alone; without
    spinning the interleaved medians match the lone ones within 5 %).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = _SESSION_LOG_SEVERITY
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    if timing:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


# --------------------------------------------------------------------------------------------
# Sessions


def _fail(produced: bool, message: str, exc: BaseException) -> NoReturn:
    """Raise `InternalError` caused by onnxruntime's exception for a model the tool produced,
    else `InputError` alone (the user's file is at fault; the message says how)."""
    if produced:
        raise InternalError(message) from exc
    raise InputError(message) from None


class Session:
    """An onnxruntime session that knows whose model it runs.

    ``run`` turns onnxruntime's failures into one line naming the model and the input shapes:
    `InputError` for the user's model, `InternalError` for one the tool produced. Everything else
    (``get_inputs``, ``io_binding``, ...) is the ``InferenceSession``'s.

    Attributes:
        inner: the ``onnxruntime.InferenceSession``.
        label: how messages name the model, e.g. ``"the candidate model"``.
        produced: whether the tool produced the model.
    """

    def __init__(self, inner: ort.InferenceSession, label: str, produced: bool):
        self.inner = inner
        self.label = label
        self.produced = produced

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    @property
    def provider(self) -> str:
        """The provider that actually runs the session (``get_providers()[0]``)."""
        return self.inner.get_providers()[0]

    def run(self, output_names: Sequence[str] | None, feed: Mapping[str, np.ndarray],
            what: str = "its input") -> list:
        """``InferenceSession.run``; `what` names the feed in an error, e.g. ``"input 3"``."""
        try:
            return self.inner.run(output_names, feed if isinstance(feed, dict) else dict(feed))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind types
            shapes = ", ".join(f"{k} {tuple(np.shape(v))} {np.asarray(v).dtype}" for k, v in feed.items())
            _fail(self.produced, f"{self.label} failed on {what} ({shapes}): {_first_line(exc)}", exc)


def make_session(model: ModelLike | Session, provider: str | ProviderChoice = "auto",
                 threads: int | None = None, *, produced: bool, label: str | None = None,
                 timing: bool = False, optimize: bool = True) -> Session:
    """An onnxruntime `Session` on `provider`.

    Args:
        model: a ``ModelProto``, a path (external data is found next to it), serialised bytes,
            an ``InferenceSession`` (wrapped) or a `Session` (returned as is). A ``ModelProto``
            of 2 GiB or more is written with external data to a temporary folder and loaded by
            path (`serialize.save_with_external_data`: the model itself is left as it is).
        provider: ``auto|cuda|tensorrt|cpu`` or a `ProviderChoice`.
        threads: intra-op threads (``None``: onnxruntime's default).
        produced: True when the tool produced the model (its failures are `InternalError`),
            False for the user's model (`InputError`). Every call site says which.
        label: how errors name the model (default: its path, else "the model").
        timing: a session for timing (see `execution_providers`).
        optimize: all graph optimisations (``ORT_ENABLE_ALL``), else none (``ORT_DISABLE_ALL``).

    A model whose IR version is newer than this onnxruntime accepts is loaded with the IR
    version lowered to the newest it accepts (logged); the operators are unchanged.

    Raises:
        InputError: the path does not exist, or onnxruntime cannot load the user's model.
        InternalError: onnxruntime cannot load a model the tool produced.
    """
    if isinstance(model, Session):
        return model
    name = label or (os.fspath(model) if isinstance(model, str | os.PathLike) else "the model")
    name += " (produced by onnx-lowrank)" if produced else ""
    if isinstance(model, ort.InferenceSession):
        return Session(model, name, produced)
    choice = resolve_provider(provider)
    _quiet_default_logger()
    if choice.on_gpu:
        _preload_cuda_libraries()
    options = _session_options(threads, optimize, timing)

    def load(source: str | bytes) -> Session:
        return Session(_load(source, options, execution_providers(choice, timing), name, produced), name, produced)

    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() >= _PROTO_LIMIT:
            with tempfile.TemporaryDirectory(prefix="onnx_lowrank_") as tmp:
                path = os.path.join(tmp, "model.onnx")
                save_with_external_data(model, path, min(model.ir_version, runtime_max_ir_version()))
                return load(path)
        return load(_lowered(model, runtime_max_ir_version()).SerializeToString())
    if isinstance(model, bytes):
        return load(model)
    if not os.path.isfile(model):
        raise InputError(f"{os.fspath(model)}: no such file")
    return load(os.fspath(model))


def _load(source: str | bytes, options: ort.SessionOptions, providers: list, label: str,
          produced: bool) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind types
        limit = _IR_LIMIT.search(str(exc))
        if not limit:
            _fail(produced, f"onnxruntime cannot load {label}: {_first_line(exc)}", exc)
    ir_max = int(limit.group(1))
    logger.info("loading %s with IR version lowered to %d", label, ir_max)
    if isinstance(source, bytes):
        proto = onnx.load_from_string(source)
    else:
        # The weights stay where they are: onnxruntime reads external data from the model's
        # folder while the (small) graph comes from memory. Nothing is written anywhere.
        proto = onnx.load(source, load_external_data=False)
        options.add_session_config_entry(_EXTERNAL_FOLDER, os.path.dirname(os.path.abspath(source)))
    return _load(_lowered(proto, ir_max).SerializeToString(), options, providers, label, produced)


def _lowered(model: onnx.ModelProto, ir_max: int) -> onnx.ModelProto:
    """`model` with its IR version at most `ir_max` (a copy only when it must change)."""
    if model.ir_version <= ir_max:
        return model
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    lowered.ir_version = ir_max
    return lowered


@functools.cache
def runtime_max_ir_version() -> int:
    """The highest ONNX IR version the installed onnxruntime loads, probed once with a tiny model."""
    options = ort.SessionOptions()
    options.log_severity_level = _SESSION_LOG_SEVERITY
    for version in range(onnx.IR_VERSION, 6, -1):
        try:
            ort.InferenceSession(_probe_model(version), options, providers=[CPU])
        except Exception:  # noqa: BLE001 - any refusal means "not this version"
            continue
        return version
    return onnx.IR_VERSION


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
