"""Stage fetch@<name>: copy one constituent into its folder and record its provenance.

Reads params `constituents.<name>` and its pin in constituents.lock.yaml; writes the
model folder plus provenance.json: source, requested and resolved revision, hashes.
"""

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

from stages import modelfiles
from stages.hashing import manifest, manifest_id, sha256_file, write_json
from stages.lockfile import Pin, read_lock
from stages.params import Constituent, load_params_or_exit

log = logging.getLogger(__name__)

LOCK = Path("constituents.lock.yaml")


class FetchError(RuntimeError):
    """A constituent cannot be fetched as its params and lock describe."""


def hub_source(source: str) -> tuple[str, str] | None:
    """(repo_id, repo_type) for an hf:// source, None for a local folder."""
    if not source.startswith("hf://"):
        return None
    from stages import hub

    return hub.parse_source(source)


def local_manifest(src: Path) -> dict[str, dict]:
    """Hash the safe files of a local model folder; refuse pickles and code."""
    if not src.is_dir():
        raise FetchError(f"constituent source {src} is not a folder")
    names = sorted(p.name for p in src.iterdir() if p.is_file())
    try:
        modelfiles.check_weights(str(src), names)
    except ValueError as e:
        raise FetchError(str(e)) from None
    if "config.json" not in names:
        raise FetchError(f"constituent source {src} has no config.json")
    files = manifest(src)
    return {rel: entry for rel, entry in files.items() if modelfiles.is_safe(rel)}


def local_revision(files: dict[str, dict]) -> str:
    return "local:" + manifest_id(files)


def constituent_record(
    name: str,
    source: str,
    requested: str | None,
    resolved: str,
    files: dict[str, dict],
) -> dict:
    """A constituent's provenance.json (format in docs/design.md)."""
    return {
        "format": "mergesweep-constituent/1",
        "name": name,
        "source": source,
        "requested_revision": requested,
        "resolved_revision": resolved,
        "files": files,
    }


def check_local_pin(name: str, c: Constituent, pin: Pin | None, current: str) -> None:
    if pin and pin.source == c.source and pin.resolved != current:
        raise FetchError(
            f"{c.source} (constituent {name}) changed since it was locked: "
            f"lock says {pin.resolved}, folder is {current}. "
            "Run `mergesweep lock` to pin the new content, then `dvc repro`."
        )


def resolve_hub(
    name: str, c: Constituent, pin: Pin | None, hub_repo: tuple[str, str]
) -> str:
    """The commit to fetch: the lock's pin when it matches the params, else live."""
    if pin and pin.source == c.source and pin.revision == c.revision:
        return pin.resolved
    from stages import hub

    log.warning(
        "%s: no pin for %s@%s in %s; resolving live (run `mergesweep lock` to pin it)",
        name,
        c.source,
        c.revision,
        LOCK,
    )
    return hub.resolve_revision(
        hub_repo[0], c.revision or "main", repo_type=hub_repo[1]
    )


def copy_local(src: Path, files: dict[str, dict], dest: Path) -> None:
    """Copy the listed files and check each copy against the source's hash."""
    for rel, entry in files.items():
        shutil.copyfile(src / rel, dest / rel)
        if sha256_file(dest / rel) != entry["sha256"]:
            raise FetchError(f"{src / rel} changed while it was being copied")


def fetch(name: str, c: Constituent, pin: Pin | None, out: Path) -> dict:
    """Write `out` (model folder + provenance.json) atomically; return provenance."""
    hub_repo = hub_source(c.source)
    if hub_repo is None:
        files = local_manifest(Path(c.source))
        resolved = local_revision(files)
        check_local_pin(name, c, pin, resolved)
    else:
        resolved = resolve_hub(name, c, pin, hub_repo)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if hub_repo is None:
            copy_local(Path(c.source), files, tmp)
        else:
            from stages import hub

            shutil.rmtree(tmp)
            files = hub.download_snapshot(
                hub_repo[0], resolved, tmp, repo_type=hub_repo[1]
            )
        provenance = constituent_record(name, c.source, c.revision, resolved, files)
        write_json(tmp / "provenance.json", provenance)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return provenance


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", choices=("len", "acc"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )

    start = time.perf_counter()
    params = load_params_or_exit(args.params)
    c = params.constituents[args.name]
    pin = read_lock(LOCK).get(args.name)
    errors: tuple[type[Exception], ...] = (FetchError,)
    if hub_source(c.source) is not None:
        from stages.hub import HubError

        errors += (HubError,)
    try:
        prov = fetch(args.name, c, pin, args.out)
    except errors as e:
        raise SystemExit(f"error: fetch@{args.name}: {e}") from None
    size = sum(f["size"] for f in prov["files"].values())
    log.info(
        "fetched %s from %s at %s: %d files, %.1f MB in %.1f s",
        args.name,
        c.source,
        prov["resolved_revision"],
        len(prov["files"]),
        size / 1e6,
        time.perf_counter() - start,
    )


if __name__ == "__main__":
    main()
