"""User code named on the command line: ``"module:function"`` or ``"path/to/file.py:function"``.

Task metrics (`--metric`) and input pipelines (`--calib` / `--eval`) are functions of the user's
own code; this module imports them with one set of rules and errors.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from onnx_lowrank.errors import InputError

__all__ = ["is_callable_spec", "load_callable"]


def is_callable_spec(text: str) -> bool:
    """Whether `text` reads as ``module:function`` or ``file.py:function`` (not a Windows drive)."""
    module, sep, attr = str(text).rpartition(":")
    return bool(sep and module and attr and attr.isidentifier() and len(module) > 1)


def load_callable(spec: str, what: str, expected: str) -> Callable:
    """The function ``spec`` names; `what` names its use in errors (e.g. "metric"), `expected`
    describes its signature. Raises `InputError` for anything that does not import or call."""
    text = str(spec).strip()
    module_name, _, attr = text.rpartition(":")
    try:
        module = _import_file(Path(module_name), what) if module_name.endswith(".py") \
            else importlib.import_module(module_name)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module
        raise InputError(f"cannot import {what} module '{module_name}': {type(exc).__name__}: {exc}") from None
    if not hasattr(module, attr):
        raise InputError(f"{what} module '{module_name}' has no attribute '{attr}'")
    function = getattr(module, attr)
    if not callable(function):
        raise InputError(f"{what} '{text}' is a {type(function).__name__}, expected a callable {expected}")
    return function


def _import_file(path: Path, what: str):
    if not path.is_file():
        raise InputError(f"{path}: no such file (the {what} module)")
    module_name = f"onnx_lowrank_user_{what.replace(' ', '_')}_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"cannot import {what} file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module
