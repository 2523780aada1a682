"""sha256 of files and file manifests `{relpath: {"sha256", "size"}}`."""

import hashlib
import json
from pathlib import Path

CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest(root: Path, *, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """Hash every regular file below `root` (POSIX relative paths, sorted)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


def manifest_id(files: dict[str, dict]) -> str:
    """A content id for a manifest: the sha256 of its canonical JSON."""
    canon = json.dumps(files, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def write_json(path: Path, obj: object) -> None:
    """Write JSON deterministically and atomically (temp file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
