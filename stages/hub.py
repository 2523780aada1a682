"""`hf://` sources: parse, resolve a revision to its commit, download verified.

Talks to the hub through huggingface_hub; HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE are
read at call time. Partial downloads wait in `<dest parent>/.partial/`, outside `dest`.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import (
    FileMetadataError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url, http_get
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers, silent_tqdm

from stages import modelfiles

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
INDEX_NAME = "model.safetensors.index.json"
# Below this a file downloads in well under a second; a bar per tokenizer file is noise.
PROGRESS_MIN_BYTES = 8 * 1024 * 1024
# Room left on the disk beyond the download itself, for the logs and temp files of the
# rest of the run.
DISK_MARGIN_BYTES = 64 * 1024 * 1024

COMMIT_RE = re.compile(r"[0-9a-f]{40}")
SHORT_SHA_RE = re.compile(r"[0-9a-fA-F]{4,39}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


class HubError(RuntimeError):
    """Base class: something about a hub source stops the fetch."""


class HubSourceError(HubError, ValueError):
    """A malformed `hf://` source string."""


class HubRevisionError(HubError, ValueError):
    """A revision that cannot be pinned (a short sha, an empty string)."""


class HubAuthError(HubError):
    """401, or a 403 that is not a gated repo: no token, or the wrong one."""


class HubGatedError(HubError):
    """403/401 on a gated repo whose terms this account has not accepted."""


class HubNotFoundError(HubError):
    """404: repo, revision or file does not exist."""


class HubOfflineError(HubError):
    """Network down, hub unreachable, or HF_HUB_OFFLINE set."""


class HubServerError(HubError):
    """The hub answered 429 or 5xx after huggingface_hub's own retries."""


class HubUnsafeRepoError(HubError):
    """No safetensors weights (only pickle ones, or none at all)."""


class HubIntegrityError(HubError):
    """Bytes that do not match the hub's sha256/etag, size or commit."""


class HubIncompleteError(HubError):
    """The snapshot lacks a shard named by the index, or a shard is short."""


class HubDiskSpaceError(HubError):
    """Not enough free disk for the download."""


class HubInterruptedError(HubError):
    """The connection dropped mid-file; the next call resumes from the partial file."""


class HubDestinationError(HubError):
    """The destination folder exists and is not empty."""


@dataclass(frozen=True)
class RemoteFile:
    """A file at one commit: size, git blob id and, for LFS files, sha256."""

    path: str
    size: int
    git_oid: str
    sha256: str | None

    @property
    def etag(self) -> str:
        return self.sha256 or self.git_oid


# Sources and revisions


def parse_source(source: str) -> tuple[str, str] | None:
    """`hf://OWNER/NAME` -> (repo_id, "model"), `hf://datasets/OWNER/NAME` -> dataset.

    Anything not starting with `hf:` is a local path and gives None.
    """
    if not source.lower().startswith("hf:"):
        return None
    allowed = "hf://OWNER/NAME or hf://datasets/OWNER/NAME"
    if not source.startswith("hf://"):
        raise HubSourceError(f"source {source!r} is malformed: expected {allowed}")
    parts = source[len("hf://") :].split("/")
    repo_type = "model"
    if parts[0] in ("models", "datasets", "spaces") and len(parts) == 3:
        repo_type = parts.pop(0)[:-1]
    if repo_type == "space":
        raise HubSourceError(f"source {source!r}: spaces are not supported, {allowed}")
    if any("@" in p for p in parts):
        raise HubSourceError(
            f"source {source!r}: put the revision in the constituent's `revision` key, "
            f"not in the source; expected {allowed}"
        )
    if len(parts) != 2 or not all(NAME_RE.fullmatch(p) for p in parts):
        raise HubSourceError(
            f"source {source!r} is malformed: expected {allowed}, where OWNER and "
            "NAME are 1-96 letters, digits, '.', '_' or '-'"
        )
    if any("--" in p or ".." in p for p in parts):
        raise HubSourceError(f"source {source!r}: '--' and '..' are not allowed")
    return "/".join(parts), repo_type


def resolve_revision(repo_id: str, revision: str, *, repo_type: str = "model") -> str:
    """The 40-hex commit a branch, tag or full commit sha names on the hub."""
    revision = revision.strip() if isinstance(revision, str) else revision
    if not revision:
        raise HubRevisionError(
            f"{repo_id}: revision is empty; give a branch, a tag or a 40-hex commit"
        )
    if re.fullmatch(r"[0-9a-fA-F]{40}", revision):
        revision = revision.lower()
    if SHORT_SHA_RE.fullmatch(revision) and not _looks_like_word(revision):
        raise HubRevisionError(
            f"{repo_id}: revision {revision!r} looks like a short commit sha, which "
            "can be ambiguous; pass the full 40-hex commit (shown on the repo's "
            "'Files and versions' history page), or a branch or tag name"
        )
    with _hub_errors(repo_id, repo_type, revision):
        info = _api().repo_info(repo_id, revision=revision, repo_type=repo_type)
    sha = info.sha or ""
    if not COMMIT_RE.fullmatch(sha):
        raise HubIntegrityError(
            f"{repo_id}@{revision}: the hub answered commit {sha!r}, not 40 hex"
        )
    if COMMIT_RE.fullmatch(revision.lower()) and sha != revision.lower():
        raise HubIntegrityError(
            f"{repo_id}: asked for commit {revision}, the hub answered {sha}"
        )
    log.info("%s %s@%s is commit %s", repo_type, repo_id, revision, sha)
    return sha


def _looks_like_word(revision: str) -> bool:
    # A short sha is hex with a digit in it; "cafe" or "beef" is more likely a name.
    return not any(c.isdigit() for c in revision)


# Listing and selection


def list_files(
    repo_id: str, commit: str, *, repo_type: str = "model"
) -> dict[str, RemoteFile]:
    """Every file at `commit` with its size and hashes, from the hub's tree listing."""
    _require_commit(repo_id, commit)
    with _hub_errors(repo_id, repo_type, commit):
        entries = list(
            _api().list_repo_tree(
                repo_id, recursive=True, revision=commit, repo_type=repo_type
            )
        )
    files = {}
    for entry in entries:
        if isinstance(entry, RepoFile):
            sha256 = entry.lfs.sha256 if entry.lfs is not None else None
            files[entry.path] = RemoteFile(
                entry.path, entry.size, entry.blob_id, sha256
            )
    return files


def select_safe_files(files: Mapping[str, RemoteFile], *, where: str) -> list[str]:
    """The files to take (stages.modelfiles: top-level safetensors, configs, ...)."""
    safe = sorted(p for p in files if modelfiles.is_safe(p))
    weights = [p for p in safe if p.endswith(".safetensors")]
    if not weights:
        pickles = sorted(p for p in files if modelfiles.is_pickle(p))
        if pickles:
            raise HubUnsafeRepoError(
                f"{where} has only pickle weights ({', '.join(pickles[:5])}); pickle "
                "files can run code when loaded, so they are never downloaded. Use a "
                "revision or a repo that has *.safetensors weights"
            )
        raise HubUnsafeRepoError(f"{where} has no *.safetensors weights at top level")
    return safe


# Downloads


def download_snapshot(
    repo_id: str, commit: str, dest: Path, *, repo_type: str = "model"
) -> dict[str, dict]:
    """Download the safe files of `commit` into `dest`, verified and complete.

    Returns the manifest {relpath: {"sha256", "size"}}. `dest` must be absent or empty;
    it appears, renamed from a temporary sibling, only once every file checks out.
    """
    started = time.monotonic()
    where = f"{repo_type} {repo_id}@{commit}"
    _require_dest(dest)
    files = list_files(repo_id, commit, repo_type=repo_type)
    wanted = select_safe_files(files, where=where)
    staging = partial_dir(dest, repo_id, commit, repo_type=repo_type)
    manifest: dict[str, dict] = {}
    if INDEX_NAME in wanted:
        manifest |= _fetch(repo_id, commit, [files[INDEX_NAME]], staging, repo_type)
        shards = _index_shards(staging / INDEX_NAME, where)
        missing = sorted(shards - set(wanted))
        if missing:
            raise HubIncompleteError(
                f"{where}: {INDEX_NAME} names shard(s) missing from the repo: "
                f"{', '.join(missing)}; pick a commit where the upload is complete"
            )
        # Other top-level safetensors (e.g. a consolidated copy) are not the model.
        wanted = [p for p in wanted if not p.endswith(".safetensors") or p in shards]
    rest = [files[p] for p in wanted if p not in manifest]
    check_free_space(dest.parent, _bytes_to_fetch(rest, staging), where=where)
    manifest |= _fetch(repo_id, commit, rest, staging, repo_type)
    _check_complete(staging, wanted, where)
    _publish(staging, dest, wanted)
    total = sum(m["size"] for m in manifest.values())
    log.info(
        "%s: %d files, %.1f MB in %.1fs -> %s",
        where,
        len(manifest),
        total / 1e6,
        time.monotonic() - started,
        dest,
    )
    return {p: manifest[p] for p in sorted(manifest)}


def download_files(
    repo_id: str,
    commit: str,
    paths: Iterable[str],
    dest: Path,
    *,
    repo_type: str = "model",
) -> dict[str, dict]:
    """Download the given files of `commit` into `dest` (absent or empty), verified."""
    where = f"{repo_type} {repo_id}@{commit}"
    _require_dest(dest)
    files = list_files(repo_id, commit, repo_type=repo_type)
    paths = sorted(set(paths))
    missing = [p for p in paths if p not in files]
    if missing:
        raise HubNotFoundError(f"{where} has no file(s) {', '.join(missing)}")
    if any(modelfiles.is_pickle(p) or p.endswith(".py") for p in paths):
        raise HubUnsafeRepoError(f"{where}: refusing pickle or Python files in {paths}")
    staging = partial_dir(dest, repo_id, commit, repo_type=repo_type)
    remote = [files[p] for p in paths]
    check_free_space(dest.parent, _bytes_to_fetch(remote, staging), where=where)
    manifest = _fetch(repo_id, commit, remote, staging, repo_type)
    _publish(staging, dest, paths)
    return manifest


def partial_dir(dest: Path, repo_id: str, commit: str, *, repo_type: str) -> Path:
    """Where the files of one commit wait until complete: outside `dest`."""
    folder = "--".join([f"{repo_type}s", *repo_id.split("/")])
    return dest.parent / ".partial" / folder / commit


def check_free_space(directory: Path, needed: int, *, where: str = "") -> None:
    """Refuse to start when `directory`'s disk has less than `needed` bytes free."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed + DISK_MARGIN_BYTES:
        raise HubDiskSpaceError(
            f"{where}: the download needs {needed / 1e9:.2f} GB (+ "
            f"{DISK_MARGIN_BYTES / 1e6:.0f} MB margin) but {probe} has "
            f"{free / 1e9:.2f} GB free; free some space or fetch to another disk"
        )


def _bytes_to_fetch(files: Iterable[RemoteFile], staging: Path) -> int:
    needed = 0
    for f in files:
        done = staging / f.path
        part = _part_path(done)
        if done.is_file() and done.stat().st_size == f.size:
            continue
        needed += f.size - (part.stat().st_size if part.is_file() else 0)
    return max(needed, 0)


def _fetch(
    repo_id: str,
    commit: str,
    files: Iterable[RemoteFile],
    staging: Path,
    repo_type: str,
) -> dict[str, dict]:
    where = f"{repo_type} {repo_id}@{commit}"
    manifest = {}
    for f in files:
        target = staging / f.path
        if target.is_file() and target.stat().st_size == f.size:
            try:
                manifest[f.path] = _verify(target, f, where)
                continue
            except HubIntegrityError:
                log.warning("%s: %s from an earlier run is damaged", where, f.path)
                target.unlink()
        _download_one(repo_id, commit, f, staging, repo_type)
        try:
            manifest[f.path] = _verify(target, f, where)
        except HubIntegrityError:
            target.unlink(missing_ok=True)
            raise
    return manifest


def _download_one(
    repo_id: str, commit: str, f: RemoteFile, staging: Path, repo_type: str
) -> None:
    where = f"{repo_type} {repo_id}@{commit}"
    endpoint = _endpoint()
    url = hf_hub_url(
        repo_id, f.path, repo_type=repo_type, revision=commit, endpoint=endpoint
    )
    with _hub_errors(repo_id, repo_type, commit, path=f.path):
        meta = get_hf_file_metadata(url, endpoint=endpoint)
    if meta.commit_hash != commit:
        raise HubIntegrityError(
            f"{where}: the hub served {f.path} from commit {meta.commit_hash}"
        )
    if meta.etag != f.etag or (meta.size is not None and meta.size != f.size):
        raise HubIntegrityError(
            f"{where}: {f.path} is listed with etag {f.etag} and {f.size} bytes but "
            f"served with etag {meta.etag} and {meta.size} bytes"
        )
    headers = build_hf_headers()
    if _origin(meta.location) != _origin(url):
        # A signed CDN url: the token must not leave the hub (huggingface_hub does so).
        headers.pop("authorization", None)
    target = staging / f.path
    part = _part_path(target)
    part.parent.mkdir(parents=True, exist_ok=True)
    resume = part.stat().st_size if part.is_file() else 0
    if resume > f.size:
        resume = 0
    if resume:
        log.info("%s: resuming %s at byte %d of %d", where, f.path, resume, f.size)
    with open(part, "r+b" if part.is_file() else "wb") as out:
        out.seek(resume)
        out.truncate()
        try:
            with _hub_errors(repo_id, repo_type, commit, path=f.path):
                http_get(
                    meta.location,
                    out,
                    resume_size=resume,
                    headers=headers,
                    expected_size=f.size,
                    displayed_filename=f.path,
                    tqdm_class=None if f.size >= PROGRESS_MIN_BYTES else silent_tqdm,
                )
        except HubInterruptedError as err:
            out.flush()
            raise HubInterruptedError(
                f"{err} ({out.tell()} of {f.size} bytes kept in {part}; run again "
                "to resume)"
            ) from err.__cause__
        except OSError as err:
            if "Consistency check failed" not in str(err):
                raise
            out.close()
            part.unlink(missing_ok=True)
            raise HubIntegrityError(
                f"{where}: {f.path} arrived with the wrong size (expected {f.size}); "
                "the partial file was deleted, run again"
            ) from err
    os.replace(part, target)


def _verify(path: Path, f: RemoteFile, where: str) -> dict:
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as src:
        while chunk := src.read(16 * 1024 * 1024):
            sha256.update(chunk)
            if f.sha256 is None:
                blob.update(chunk)
    size = path.stat().st_size
    got, want = (
        (sha256.hexdigest(), f.sha256) if f.sha256 else (blob.hexdigest(), f.git_oid)
    )
    kind = "sha256" if f.sha256 else "git blob sha1"
    if size != f.size or got != want:
        raise HubIntegrityError(
            f"{where}: {f.path} does not match the hub: {kind} {got} and {size} bytes, "
            f"expected {want} and {f.size} bytes; the file was deleted, run again "
            "(if it fails again the hub copy is broken: report it to the repo owner)"
        )
    return {"sha256": sha256.hexdigest(), "size": size}


def _index_shards(index: Path, where: str) -> set[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise HubIncompleteError(
            f"{where}: {INDEX_NAME} has no readable weight_map ({err})"
        ) from err
    shards = set(weight_map.values())
    bad = sorted(s for s in shards if "/" in s or not s.endswith(".safetensors"))
    if bad:
        raise HubUnsafeRepoError(
            f"{where}: {INDEX_NAME} names non-top-level or non-safetensors shards {bad}"
        )
    return shards


def _check_complete(staging: Path, wanted: list[str], where: str) -> None:
    """Every shard's header must be whole and the bytes it declares all there."""
    for name in (p for p in wanted if p.endswith(".safetensors")):
        path = staging / name
        size = path.stat().st_size
        with open(path, "rb") as src:
            head = src.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            header = src.read(n) if n is not None and n < size else b""
        try:
            tensors = json.loads(header)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HubIncompleteError(
                f"{where}: shard {name} is short or not safetensors ({size} bytes, "
                "header unreadable)"
            ) from err
        ends = [t["data_offsets"][1] for k, t in tensors.items() if k != "__metadata__"]
        expected = 8 + n + max(ends, default=0)
        if size < expected:
            raise HubIncompleteError(
                f"{where}: shard {name} is short: {size} bytes, its header declares "
                f"{expected}; the upload at this commit is truncated"
            )
    if INDEX_NAME in wanted:
        weight_map = json.loads((staging / INDEX_NAME).read_text())["weight_map"]
        for shard in sorted(set(weight_map.values())):
            names = _header_names(staging / shard)
            listed = sorted(k for k, v in weight_map.items() if v == shard)
            absent = [k for k in listed if k not in names]
            if absent:
                raise HubIncompleteError(
                    f"{where}: shard {shard} lacks tensors the index puts there: "
                    f"{', '.join(absent[:5])}"
                )


def _header_names(path: Path) -> set[str]:
    with open(path, "rb") as src:
        n = struct.unpack("<Q", src.read(8))[0]
        return set(json.loads(src.read(n))) - {"__metadata__"}


def _publish(staging: Path, dest: Path, paths: Iterable[str]) -> None:
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for rel in paths:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, tmp / rel)
        if dest.is_dir():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    for parent in (staging.parent, staging.parent.parent):
        try:
            parent.rmdir()
        except OSError:
            break


# Plumbing


def _part_path(target: Path) -> Path:
    return target.with_name(target.name + ".incomplete")


def _require_commit(repo_id: str, commit: str) -> None:
    if not COMMIT_RE.fullmatch(commit):
        raise HubRevisionError(
            f"{repo_id}: {commit!r} is not a 40-hex commit; resolve the revision "
            "first with stages.hub.resolve_revision"
        )


def _require_dest(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise HubDestinationError(
            f"{dest} exists and is not an empty folder; delete it or choose another"
        )


def _endpoint() -> str:
    # huggingface_hub reads HF_ENDPOINT once, at import; read it at each call instead.
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def _offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return (env or "").upper() in TRUE_VALUES or constants.is_offline_mode()


def _api() -> HfApi:
    return HfApi(endpoint=_endpoint())


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


@contextmanager
def _hub_errors(
    repo_id: str, repo_type: str, revision: str, *, path: str | None = None
) -> Iterator[None]:
    """Turn huggingface_hub's and httpx's exceptions into one HubError per case."""
    where = f"{repo_type} {repo_id}@{revision}" + (f" file {path}" if path else "")
    page = f"{_endpoint()}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    if _offline():
        instead = (
            "use a local folder as the constituent's source"
            if repo_type == "model"
            else "run `mergesweep suites` where the hub is reachable and copy its "
            "--out folder here"
        )
        raise HubOfflineError(
            f"{where}: HF_HUB_OFFLINE is set, so the hub is not contacted; unset "
            f"HF_HUB_OFFLINE (in the environment the process starts with), or {instead}"
        )
    try:
        yield
    except GatedRepoError as err:
        raise HubGatedError(
            f"{where}: the repo is gated and this account has not been granted "
            f"access; open {page} while logged in, accept its terms, then set "
            "HF_TOKEN to a token of that account (or run `hf auth login`)"
        ) from err
    except RevisionNotFoundError as err:
        raise HubNotFoundError(
            f"{where}: revision {revision!r} not found (404); check the branch, tag "
            f"or commit on {page}"
        ) from err
    except RemoteEntryNotFoundError as err:
        raise HubNotFoundError(
            f"{where}: file not found at this revision (404)"
        ) from err
    except (RepositoryNotFoundError, HfHubHTTPError) as err:
        raise _http_error(err, where, page) from err
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as err:
        raise HubOfflineError(
            f"{where}: the hub cannot be reached ({err}); check the network, or "
            "unset HF_HUB_OFFLINE"
        ) from err
    except FileMetadataError as err:
        raise HubIntegrityError(
            f"{where}: {err}; check that HF_ENDPOINT ({_endpoint()}) is a hub"
        ) from err
    except (httpx2.ConnectError, httpx2.ConnectTimeout) as err:
        raise HubOfflineError(
            f"{where}: cannot connect to {_endpoint()} ({err}); check the network or "
            "proxy, and HF_ENDPOINT if set"
        ) from err
    except (
        httpx2.RemoteProtocolError,
        httpx2.ReadError,
        httpx2.TimeoutException,
    ) as err:
        raise HubInterruptedError(f"{where}: the connection dropped ({err})") from err


def _http_error(err: HfHubHTTPError, where: str, page: str) -> HubError:
    status = err.response.status_code if err.response is not None else None
    if status == 401:
        return HubAuthError(
            f"{where}: 401 unauthorized: the repo does not exist, or it is private "
            "and no valid token was sent. Check the name; for a private repo set "
            "HF_TOKEN (or run `hf auth login`) with an account that can read it"
        )
    if status == 403:
        return HubAuthError(
            f"{where}: 403 forbidden: the token cannot read this repo; use a token "
            f"with read access to {page} (HF_TOKEN or `hf auth login`)"
        )
    if status == 404:
        return HubNotFoundError(
            f"{where}: repo not found (404); check the owner/name and that it is a "
            "model repo (hf://OWNER/NAME) or a dataset repo (hf://datasets/OWNER/NAME)"
        )
    if status is not None and (status == 429 or status >= 500):
        return HubServerError(
            f"{where}: the hub answered {status} after retries; try again later"
        )
    return HubError(f"{where}: the hub answered {status}: {err}")
