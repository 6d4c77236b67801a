"""The factorization methods: one module each, listed once in `BUILTIN_METHODS`.

The CLI's `--method` choices, `auto`'s candidates and the report all derive from the methods
available here: the built-in tuple, then methods registered with `register_method`, then those
of installed packages that declare an entry point in the group `onnx_lowrank.methods` (the
entry point names a `Method` instance or class)::

    [project.entry-points."onnx_lowrank.methods"]
    my-method = "my_package.lowrank:MyMethod"

Adding a built-in method is one module defining a `Method` subclass and one line below.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging

from onnx_lowrank.errors import InputError
from onnx_lowrank.methods.base import ConvMethod, Method, RankedMethod
from onnx_lowrank.methods.cp import CP, CPDepthwise
from onnx_lowrank.methods.spatial_svd import SpatialSVD
from onnx_lowrank.methods.svd import ChannelSVD
from onnx_lowrank.methods.tiled_svd import TiledSVD
from onnx_lowrank.methods.tucker2 import Tucker2
from onnx_lowrank.methods.versatile import ChannelVersatile, SpatialVersatile

__all__ = ["BUILTIN_METHODS", "ENTRY_POINT_GROUP", "ConvMethod", "Method", "MethodSet", "RankedMethod",
           "auto_candidates", "available", "method_names", "register_method"]

log = logging.getLogger(__name__)

BUILTIN_METHODS: tuple[Method, ...] = (
    ChannelSVD(),
    SpatialSVD(),
    TiledSVD(),
    Tucker2(),
    CP(),
    CPDepthwise(),
    SpatialVersatile(),
    ChannelVersatile(),
)
ENTRY_POINT_GROUP = "onnx_lowrank.methods"

_registered: dict[str, Method] = {}


def register_method(method: Method | type[Method]) -> Method:
    """Make a third-party `Method` (an instance, or a class taking no arguments) available to
    `compress`, `Settings(method=...)` and the CLI, under its `name`; returns the instance."""
    instance = method() if isinstance(method, type) else method
    if not isinstance(instance, Method):
        raise TypeError(f"register_method expects a onnx_lowrank.methods.Method, found {type(instance).__name__}")
    if instance.name in {m.name for m in BUILTIN_METHODS} or instance.name == "auto":
        raise ValueError(f"method name '{instance.name}' is taken by a built-in method")
    _registered[instance.name] = instance
    return instance


@functools.cache
def _entry_point_methods() -> tuple[Method, ...]:
    """The methods installed packages declare in `ENTRY_POINT_GROUP` (read once per process).

    An entry point that fails to load is logged and left out, so one broken plug-in does not
    stop the tool.
    """
    found = []
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
            method = loaded() if isinstance(loaded, type) else loaded
        except Exception as exc:  # noqa: BLE001 - a plug-in's import error is the plug-in's
            log.warning("method entry point '%s' (%s) cannot be loaded: %s", entry.name, entry.value, exc)
            continue
        if not isinstance(method, Method):
            log.warning("method entry point '%s' (%s) is not a Method", entry.name, entry.value)
            continue
        found.append(method)
    return tuple(found)


def available() -> dict[str, Method]:
    """Every method by name: built-in, registered, then entry points (the first of a name wins)."""
    methods: dict[str, Method] = {}
    for method in (*BUILTIN_METHODS, *_registered.values(), *_entry_point_methods()):
        methods.setdefault(method.name, method)
    return methods


def method_names() -> tuple[str, ...]:
    """The `--method` names (without "auto")."""
    return tuple(available())


def auto_candidates() -> tuple[str, ...]:
    """The methods `--method auto` chooses from (`Method.in_auto`)."""
    return tuple(name for name, method in available().items() if method.in_auto)


class MethodSet:
    """The methods of one run, configured by its `Settings` (`Method.configure`)."""

    def __init__(self, settings):
        known = available()
        self._methods = {name: method.configure(settings) for name, method in known.items()}

    def __getitem__(self, name: str) -> Method:
        try:
            return self._methods[name]
        except KeyError:
            raise InputError(f"unknown method '{name}'; expected auto or one of {', '.join(self._methods)}") from None

    def serving(self, name: str, layer) -> Method:
        """The method that factorizes `layer` when `name` is asked for (`Method.resolve`)."""
        return self[self[name].resolve(layer)]

    def serving_each(self, names, layer) -> list[Method]:
        """The distinct methods that factorize `layer` for `names`, in order: `auto`'s SVD,
        spatial SVD and Tucker-2 are all the SVD for a Gemm/MatMul, whose spectra are one."""
        return list({m.name: m for m in (self.serving(name, layer) for name in names)}.values())
