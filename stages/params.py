"""Load and validate params.yaml into frozen dataclasses, before any work starts.

Every error names the key, the value and what is allowed, e.g.
`sweep.weights[3] must be in [0, 1], got 1.2`.
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CONSTITUENTS = ("len", "acc")
DTYPES = ("float32", "float16", "bfloat16")
DEVICES = re.compile(r"^(cpu|cuda(:\d+)?|mps|auto)$")
SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)B?$", re.IGNORECASE)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class ParamsError(ValueError):
    """params.yaml holds a key or value the pipeline cannot use."""


@dataclass(frozen=True)
class Constituent:
    source: str
    revision: str | None


@dataclass(frozen=True)
class Task:
    datasets: dict[str, str]
    limit: int | None
    system_prompt: str | None


@dataclass(frozen=True)
class Eval:
    max_gen_toks: int
    until: tuple[str, ...]
    do_sample: bool
    temperature: float
    top_p: float
    batch_size: int
    seed: int


@dataclass(frozen=True)
class Sweep:
    weights: tuple[float, ...]


@dataclass(frozen=True)
class Merge:
    dtype: str | None
    normalize: bool
    device: str


@dataclass(frozen=True)
class Release:
    weight: float
    name: str
    shard_size: int


@dataclass(frozen=True)
class Mlflow:
    experiment: str


@dataclass(frozen=True)
class Params:
    constituents: dict[str, Constituent]
    task: Task
    eval: Eval
    sweep: Sweep
    merge: Merge
    release: Release
    mlflow: Mlflow


class _Section:
    """A mapping under a dotted key; reads each field once and rejects unknown keys."""

    def __init__(self, raw: Any, key: str, allowed: tuple[str, ...]):
        if not isinstance(raw, dict):
            raise ParamsError(f"{key} must be a mapping, got {raw!r}")
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise ParamsError(
                f"{key}.{unknown[0]} is not a known key; allowed: {', '.join(allowed)}"
            )
        self.raw, self.key = raw, key

    def get(self, name: str, default: Any = ...) -> Any:
        if name not in self.raw:
            if default is ...:
                raise ParamsError(f"{self.key}.{name} is missing")
            return default
        return self.raw[name]

    def path(self, name: str) -> str:
        return f"{self.key}.{name}"


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParamsError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ParamsError(f"{key} must be finite, got {value!r}")
    return float(value)


def _unit(value: Any, key: str) -> float:
    x = _number(value, key)
    if not 0.0 <= x <= 1.0:
        raise ParamsError(f"{key} must be in [0, 1], got {value!r}")
    return x


def _int(value: Any, key: str, *, minimum: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamsError(f"{key} must be an integer, got {value!r}")
    if value < minimum:
        raise ParamsError(f"{key} must be at least {minimum}, got {value!r}")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ParamsError(f"{key} must be true or false, got {value!r}")
    return value


def _str(value: Any, key: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ParamsError(f"{key} must be a non-empty string, got {value!r}")
    return value


def parse_size(value: Any, key: str) -> int:
    """Parse a byte count: an integer, or a string like "2GB", "500MB", "1.5G"."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := SIZE.match(value.strip())):
        scale = 1000 ** ("KMGT".find(m.group(2).upper()) + 1) if m.group(2) else 1
        size = int(float(m.group(1)) * scale)
    else:
        raise ParamsError(
            f"{key} must be a byte count like 2000000000 or '2GB', got {value!r}"
        )
    if size < 1:
        raise ParamsError(f"{key} must be positive, got {value!r}")
    return size


def _constituents(raw: Any) -> dict[str, Constituent]:
    sec = _Section(raw, "constituents", CONSTITUENTS)
    out = {}
    for name in CONSTITUENTS:
        c = _Section(sec.get(name), sec.path(name), ("source", "revision"))
        out[name] = Constituent(
            source=_str(c.get("source"), c.path("source")),
            revision=_str(c.get("revision", None), c.path("revision"), optional=True),
        )
    return out


def _task(raw: Any) -> Task:
    sec = _Section(raw, "task", ("datasets", "limit", "system_prompt"))
    datasets = sec.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise ParamsError(
            f"task.datasets must map dataset names to jsonl paths, got {datasets!r}"
        )
    for name, path in datasets.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise ParamsError(
                f"task.datasets key {name!r} must be letters, digits, '.', '_' or '-'"
            )
        _str(path, f"task.datasets.{name}")
    return Task(
        datasets=dict(datasets),
        limit=_int(sec.get("limit", None), sec.path("limit"), minimum=1, optional=True),
        system_prompt=_str(
            sec.get("system_prompt", None), sec.path("system_prompt"), optional=True
        ),
    )


def _eval(raw: Any) -> Eval:
    keys = (
        "max_gen_toks",
        "until",
        "do_sample",
        "temperature",
        "top_p",
        "batch_size",
        "seed",
    )
    sec = _Section(raw, "eval", keys)
    until = sec.get("until", [])
    if not isinstance(until, list) or not all(isinstance(s, str) and s for s in until):
        raise ParamsError(
            f"eval.until must be a list of non-empty stop strings, got {until!r}"
        )
    do_sample = _bool(sec.get("do_sample", False), sec.path("do_sample"))
    temperature = _number(sec.get("temperature", 0.0), sec.path("temperature"))
    if temperature < 0 or (do_sample and temperature == 0):
        raise ParamsError(
            f"eval.temperature must be >= 0 (> 0 when do_sample), got {temperature!r}"
        )
    top_p = _number(sec.get("top_p", 1.0), sec.path("top_p"))
    if not 0 < top_p <= 1:
        raise ParamsError(f"eval.top_p must be in (0, 1], got {top_p!r}")
    return Eval(
        max_gen_toks=_int(sec.get("max_gen_toks"), sec.path("max_gen_toks"), minimum=1),
        until=tuple(until),
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        batch_size=_int(sec.get("batch_size", 1), sec.path("batch_size"), minimum=1),
        seed=_int(sec.get("seed", 0), sec.path("seed"), minimum=0),
    )


def _sweep(raw: Any) -> Sweep:
    sec = _Section(raw, "sweep", ("weights",))
    weights = sec.get("weights")
    if not isinstance(weights, list) or not weights:
        raise ParamsError(f"sweep.weights must be a non-empty list, got {weights!r}")
    seen: dict[float, int] = {}
    for i, w in enumerate(weights):
        x = _unit(w, f"sweep.weights[{i}]")
        if x in seen:
            raise ParamsError(
                f"sweep.weights[{i}] = {w!r} duplicates sweep.weights[{seen[x]}]"
            )
        seen[x] = i
    return Sweep(weights=tuple(sorted(seen)))


def _merge(raw: Any) -> Merge:
    sec = _Section(raw, "merge", ("dtype", "normalize", "device"))
    dtype = _str(sec.get("dtype", None), sec.path("dtype"), optional=True)
    if dtype is not None and dtype not in DTYPES:
        raise ParamsError(
            f"merge.dtype must be null or one of {', '.join(DTYPES)}, got {dtype!r}"
        )
    device = _str(sec.get("device", "cpu"), sec.path("device"))
    if not DEVICES.match(device):
        raise ParamsError(
            f"merge.device must be cpu, cuda, cuda:N, mps or auto, got {device!r}"
        )
    return Merge(
        dtype=dtype,
        normalize=_bool(sec.get("normalize", True), sec.path("normalize")),
        device=device,
    )


def _release(raw: Any) -> Release:
    sec = _Section(raw, "release", ("weight", "name", "shard_size"))
    name = _str(sec.get("name"), sec.path("name"))
    if not NAME.match(name):
        raise ParamsError(
            "release.name must be a folder name of letters, digits, '.', '_' or '-' "
            f"(at most 96), got {name!r}"
        )
    return Release(
        weight=_unit(sec.get("weight"), sec.path("weight")),
        name=name,
        shard_size=parse_size(sec.get("shard_size", "5GB"), sec.path("shard_size")),
    )


def _mlflow(raw: Any) -> Mlflow:
    sec = _Section(raw, "mlflow", ("experiment",))
    return Mlflow(experiment=_str(sec.get("experiment"), sec.path("experiment")))


def parse_params(raw: Any) -> Params:
    """Validate a parsed params mapping; raises ParamsError naming the first bad key."""
    top = _Section(
        raw,
        "params",
        ("constituents", "task", "eval", "sweep", "merge", "release", "mlflow"),
    )
    return Params(
        constituents=_constituents(top.get("constituents")),
        task=_task(top.get("task")),
        eval=_eval(top.get("eval")),
        sweep=_sweep(top.get("sweep")),
        merge=_merge(top.get("merge", {})),
        release=_release(top.get("release")),
        mlflow=_mlflow(top.get("mlflow", {"experiment": "mergesweep"})),
    )


def load_params(path: Path = Path("params.yaml")) -> Params:
    """Read and validate a params file; errors are prefixed with the file name."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ParamsError(f"{path}: cannot read params file: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    try:
        return parse_params(raw)
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None


def load_params_or_exit(path: Path = Path("params.yaml")) -> Params:
    """For stage entry points: a bad params file ends the run with its message alone."""
    try:
        return load_params(path)
    except ParamsError as e:
        raise SystemExit(f"error: {e}") from None
