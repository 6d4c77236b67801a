"""What every benchmark's `main` does around its cases: progress on stderr, comma-separated
flags, and a work folder for the calibration files and compressed models."""

from __future__ import annotations

import contextlib
import pathlib
import sys
import tempfile
from collections.abc import Iterator


def log(text: str) -> None:
    """A progress line on stderr (stdout carries the document)."""
    print(text, file=sys.stderr, flush=True)


def names(text: str) -> list[str]:
    """"a,b,,c" -> ["a", "b", "c"]."""
    return [item for item in text.split(",") if item]


def numbers(text: str) -> list[float]:
    """"0.7,0.5" -> [0.7, 0.5]."""
    return [float(item) for item in names(text)]


def choose(wanted: list[str], known, what: str) -> list[str]:
    """`wanted`, checked against the `known` names: exit with a usage message on an unknown one."""
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return wanted


@contextlib.contextmanager
def work_folder(keep: str | None, prefix: str) -> Iterator[pathlib.Path]:
    """`keep` (created, left in place) when given, else a temporary folder removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        folder = pathlib.Path(keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
