"""constituents.lock.yaml: the exact revision each constituent resolves to.

`mergesweep lock` writes it; each fetch@<name> stage depends on its own entry, so DVC
reruns one constituent's downstream exactly when its resolved revision moves.
"""

from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

HEADER = (
    "# Written by `mergesweep lock`: what each constituent resolves to. DVC reruns a\n"
    "# constituent's fetch and everything downstream when its entry changes.\n"
)


@dataclass(frozen=True)
class Pin:
    source: str
    revision: str | None
    resolved: str


def read_lock(path: Path) -> dict[str, Pin]:
    if not path.exists():
        return {}
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: must map constituent names to pins, got {raw!r}")
    pins = {}
    for name, entry in raw.items():
        try:
            pins[name] = Pin(**entry)
        except TypeError as e:
            raise ValueError(
                f"{path}: entry {name!r} must have source, revision and resolved, "
                f"got {entry!r}"
            ) from e
    return pins


def write_lock(path: Path, pins: dict[str, Pin]) -> None:
    body = yaml.safe_dump(
        {name: asdict(pin) for name, pin in sorted(pins.items())}, sort_keys=False
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(HEADER + body)
    tmp.replace(path)
