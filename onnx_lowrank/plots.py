"""The report's plots: MACs per layer, spectra and error-versus-rank curves, as PNG.

Plots are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas, so nothing
depends on (or changes) the user's pyplot backend and no window can open; matplotlib is imported
only when a plot is drawn.
"""

from __future__ import annotations

import io
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from onnx_lowrank.files import atomic_write_bytes

__all__ = ["CURVE_PLOT_LAYERS", "MACS_PLOT_LAYERS", "STATUSES", "bare_figure", "error_figure", "macs_figure", "save",
           "spectra_figure"]

STATUSES = ("rewritten", "skipped", "rolled_back")
"""The allowed values of a layer's ``status``."""

MACS_PLOT_LAYERS = 30  # bars in macs_per_layer.png: more stop being readable at README width
CURVE_PLOT_LAYERS = 6  # lines in spectra.png / error_vs_rank.png: tab10 colours stay distinct
DPI = 120


def bare_figure(width: float, height: float):
    """A bare Agg-backed figure: no pyplot, no global backend change, no window."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def save(figure, path: pathlib.Path) -> pathlib.Path:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return atomic_write_bytes(path, buffer.getvalue())


def _short(name: str, width: int = 40) -> str:
    """Shorten a long layer name in the middle, keeping both ends readable."""
    if len(name) <= width:
        return name
    keep = (width - 1) // 2
    return f"{name[:keep]}…{name[-(width - 1 - keep):]}"


def macs_figure(layers: Sequence[dict]):
    from matplotlib.ticker import EngFormatter

    shown = sorted(layers, key=lambda layer: -layer["macs_before"])[:MACS_PLOT_LAYERS]
    count = len(shown)
    figure = bare_figure(8.0, max(2.5, 0.24 * count + 1.4))
    axes = figure.add_subplot()
    title = "MACs per layer, before vs after"
    if len(layers) > count:
        title += f" ({count} largest of {len(layers)})"
    axes.set_title(title)
    axes.set_xlabel("MACs")
    if not shown:
        axes.text(0.5, 0.5, "no layers", ha="center", va="center", transform=axes.transAxes)
        axes.set_yticks([])
        return figure
    positions = np.arange(count)
    height = 0.4
    colours = {"rewritten": "tab:blue", "rolled_back": "tab:orange", "skipped": "tab:gray"}
    axes.barh(positions - height / 2, [layer["macs_before"] for layer in shown], height,
              color="lightgray", edgecolor="gray", label="before")
    axes.barh(positions + height / 2, [layer["macs_after"] for layer in shown], height,
              color=[colours[layer["status"]] for layer in shown], label="after")
    axes.set_yticks(positions, [_short(layer["name"]) for layer in shown], fontsize=8)
    axes.margins(y=0.01)
    axes.invert_yaxis()
    axes.xaxis.set_major_formatter(EngFormatter())
    axes.grid(axis="x", alpha=0.3)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="lightgray", edgecolor="gray", label="before")]
    handles += [Patch(color=colours[s], label=f"after ({s.replace('_', ' ')})")
                for s in STATUSES if any(layer["status"] == s for layer in shown)]
    axes.legend(handles=handles, loc="lower right", fontsize=8)
    return figure


def _largest(names, sizes: Mapping[str, int]) -> list[str]:
    """Up to CURVE_PLOT_LAYERS names, most MACs before first (unknown layers last, as given)."""
    order = sorted(enumerate(names), key=lambda item: (-sizes.get(item[1], -1), item[0]))
    return [name for _, name in order[:CURVE_PLOT_LAYERS]]


def spectra_figure(curves, sizes: Mapping[str, int]):
    figure = bare_figure(7.0, 4.5)
    axes = figure.add_subplot()
    for name in _largest(list(curves.spectra), sizes):
        values = np.asarray(curves.spectra[name], dtype=np.float64)
        if values.ndim != 1:
            raise ValueError(f"curves.spectra[{name!r}]: expected a 1-D array of singular values, "
                             f"found shape {values.shape}")
        values = np.sort(np.abs(values))[::-1]
        if values.size == 0 or values[0] == 0:
            continue
        normalised = values / values[0]
        normalised[normalised <= 0] = np.nan  # log scale: leave exact zeros out
        ranks = np.arange(1, values.size + 1)
        chosen = curves.chosen.get(name)
        label = _short(name, 32) + (f" (r={chosen})" if chosen is not None else "")
        (line,) = axes.plot(ranks, normalised, label=label, linewidth=1.5)
        if chosen is not None and 1 <= chosen <= values.size and np.isfinite(normalised[chosen - 1]):
            axes.plot([chosen], [normalised[chosen - 1]], "o", color=line.get_color(), markersize=6)
    axes.set_yscale("log")
    axes.set_title(f"Normalised singular-value spectra ({curves.units})" +
                   (" (dot: chosen rank)" if curves.chosen else ""))
    axes.set_xlabel("index $k$")
    axes.set_ylabel(r"$\sigma_k\,/\,\sigma_1$")
    axes.grid(which="both", alpha=0.3)
    if axes.lines:
        axes.legend(fontsize=8)
    return figure


def error_figure(curves, sizes: Mapping[str, int]):
    figure = bare_figure(7.0, 4.5)
    axes = figure.add_subplot()
    for name in _largest(list(curves.error_curves), sizes):
        ranks, errors = (np.asarray(a, dtype=np.float64) for a in curves.error_curves[name])
        if ranks.ndim != 1 or ranks.shape != errors.shape:
            raise ValueError(f"curves.error_curves[{name!r}]: expected two 1-D arrays of equal "
                             f"length, found shapes {ranks.shape} and {errors.shape}")
        order = np.argsort(ranks, kind="stable")
        ranks, errors = ranks[order], errors[order]
        chosen = curves.chosen.get(name)
        label = _short(name, 32) + (f" (r={chosen})" if chosen is not None else "")
        (line,) = axes.plot(ranks, errors, label=label, linewidth=1.5)
        if chosen is not None and ranks.size:
            error = float(np.interp(chosen, ranks, errors))
            axes.plot([chosen], [error], "o", color=line.get_color(), markersize=7)
    axes.set_title(f"Relative {curves.units} error vs rank" + (" (dot: chosen rank)" if curves.chosen else ""))
    axes.set_xlabel("rank")
    axes.set_ylabel("relative error")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize=8)
    return figure


