"""Compression settings: one dataclass filled from defaults, a TOML file and command-line flags.

The TOML file uses the long option names with underscores (`rank_ratio = 0.5`,
`method = "tucker2"`, `input_shape = ["x:1x3x224x224"]`); a flag given on the command line wins
over the file, the file over the defaults.
"""

from __future__ import annotations

import dataclasses
import pathlib
import tomllib
from collections.abc import Mapping

from onnx_lowrank.errors import InputError

__all__ = ["GAIN_NOISES", "Settings", "load_config"]

#: How `calibrate.output_gains` perturbs a layer's output: i.i.d. noise, or its truncation error.
GAIN_NOISES = ("white", "truncation")
POLICY_KEYS = ("rank", "rank_ratio", "energy", "vbmf", "target_macs", "target_params", "target_latency")


@dataclasses.dataclass
class Settings:
    """Everything that decides what `compress` does; `to_dict()` is recorded in the output model."""

    method: str = "tucker2"
    rank: int | None = None
    rank_ratio: float | None = None
    energy: float | None = None
    vbmf: bool = False
    target_macs: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    rank_multiple: int = 16
    latency_aware: bool = False
    latency_margin: float = 0.05
    jobs: int = 1
    tiles: tuple[int, int] = (2, 2)
    keep_structure: bool = False
    fold: bool = True
    layers: str | None = None
    skip: str | None = None
    input_shape: tuple[str, ...] = ()
    input_value: tuple[str, ...] = ()
    calib: str | None = None
    eval: str | None = None
    data_aware: bool = True
    sequential: bool = True
    refit: bool = True
    bias_correction: bool = True
    output_weighting: bool = True
    gain_noise: str = "white"
    fit_aware_budget: bool = False
    activation_aware: bool = False
    refine_blocks: bool = False
    augment: int = 0
    calib_count: int | None = None
    eval_count: int | None = None
    batch_size: int | None = None
    resize: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "auto"
    channel_order: str = "RGB"
    provider: str = "auto"
    cudnn_conv_algo_search: str = "EXHAUSTIVE"
    max_error: float | None = None
    min_cosine: float | None = None
    min_metric: float | None = None
    metric: str | None = None
    validate: bool = True
    latency: bool = True
    threads: int | None = None
    seed: int = 0
    require_speedup: bool = False
    report: str | None = None
    max_memory: str | None = None

    def __post_init__(self):
        from onnx_lowrank.methods import available

        known = available()
        if self.method != "auto" and self.method not in known:
            raise InputError(f"unknown method '{self.method}'; expected auto or one of {', '.join(known)}")
        given = [key for key in POLICY_KEYS if getattr(self, key) not in (None, False)]
        if len(given) > 1:
            flags = " and ".join("--" + key.replace("_", "-") for key in given)
            raise InputError(f"give one rank policy, not {flags}")
        if not given:
            self.rank_ratio = 0.5
        if self.rank is not None and self.rank < 1:
            raise InputError(f"--rank must be a positive integer, got {self.rank}")
        for key in ("rank_ratio", "energy", "target_macs", "target_params", "target_latency"):
            value = getattr(self, key)
            if value is not None and not 0 < value <= 1:
                raise InputError(f"--{key.replace('_', '-')} must be in (0, 1], got {value}")
        if self.method != "auto" and not known[self.method].ranked and self.budget is not None:
            raise InputError(f"--method {self.method} has no rank to allocate: use it without a budget")
        if self.method == "auto" and self.budget is None:
            raise InputError("--method auto picks methods for a budget: add --target-macs, --target-params "
                             "or --target-latency")
        if self.min_metric is not None and self.metric is None:
            raise InputError("--min-metric needs a task metric: add --metric top1|detection|ctc|textmap|module:function")
        if self.rank_multiple < 1 or self.jobs < 1:
            raise InputError("--rank-multiple and --jobs must be positive integers")
        if len(self.tiles) != 2 or min(self.tiles) < 1:
            raise InputError(f"--tiles must be AxB with positive A and B, got {self.tiles}")
        if self.max_memory is not None:
            from onnx_lowrank.memory import parse_size

            parse_size(self.max_memory)
        from onnx_lowrank.runtime import CONV_ALGO_SEARCHES

        if self.cudnn_conv_algo_search not in CONV_ALGO_SEARCHES:
            raise InputError(f"--cudnn-conv-algo-search must be one of {', '.join(CONV_ALGO_SEARCHES)}, "
                             f"got '{self.cudnn_conv_algo_search}'")
        if self.gain_noise not in GAIN_NOISES:
            raise InputError(f"unknown --gain-noise '{self.gain_noise}'; expected {' or '.join(GAIN_NOISES)}")
        if self.provider not in ("auto", "cuda", "tensorrt", "cpu"):
            raise InputError(f"unknown provider '{self.provider}'; expected auto, cuda, tensorrt or cpu")

    @property
    def guarded(self) -> bool:
        """Whether a bound asks the guard to roll layers back."""
        return any(v is not None for v in (self.max_error, self.min_cosine, self.min_metric))

    @property
    def budget(self) -> tuple[str, float] | None:
        """("macs" | "params", fraction kept) when a whole-model target was given."""
        if self.target_macs is not None:
            return "macs", self.target_macs
        if self.target_params is not None:
            return "params", self.target_params
        if self.target_latency is not None:
            return "latency", self.target_latency
        return None

    def image_options(self):
        """How a folder of images given as --calib becomes model input."""
        from onnx_lowrank.images import ImageOptions

        return ImageOptions(resize=self.resize, mean=self.mean, std=self.std, layout=self.layout,
                            channel_order=self.channel_order)

    def provenance(self) -> dict:
        """The settings that decide the output model (not how fast it was made): its metadata."""
        return {k: v for k, v in self.to_dict().items() if k not in ("jobs", "threads", "report", "require_speedup", "max_memory")}

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        for key in ("tiles", "input_shape", "input_value", "mean", "std"):
            values[key] = list(getattr(self, key))
        return values


def load_config(path: str | pathlib.Path | None, overrides: Mapping[str, object]) -> Settings:
    """Settings from the TOML file at `path` (if any), then every non-None value of `overrides`."""
    values: dict[str, object] = {}
    if path is not None:
        path = pathlib.Path(path)
        try:
            values.update(tomllib.loads(path.read_text()))
        except FileNotFoundError:
            raise InputError(f"{path}: no such config file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not a valid TOML file ({exc})") from None
        values = {key.replace("-", "_"): value for key, value in values.items()}
    values.update({key: value for key, value in overrides.items() if value is not None})
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "tiles" in values and isinstance(values["tiles"], str):
        values["tiles"] = parse_tiles(values["tiles"])
    for key in ("mean", "std"):
        if key in values and isinstance(values[key], str):
            values[key] = parse_floats(values[key], f"--{key}")
    for key in ("tiles", "input_shape", "input_value", "mean", "std"):
        if key in values:
            values[key] = tuple(values[key])
    return Settings(**values)


def parse_tiles(text: str) -> tuple[int, int]:
    """'2x4' -> (2, 4): 2 row tiles over the output channels, 4 column tiles over the inputs."""
    try:
        a, b = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--tiles expects AxB like 2x2, got '{text}'") from None
    return a, b


def parse_floats(text: str, flag: str) -> tuple[float, ...]:
    """'0.485,0.456,0.406' -> (0.485, 0.456, 0.406)."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"{flag} expects comma-separated numbers like 0.5,0.5,0.5, got '{text}'") from None
