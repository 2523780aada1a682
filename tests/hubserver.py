"""A local stand-in for the Hugging Face hub on 127.0.0.1, with fault injection.

Speaks the part of the HTTP API that huggingface_hub 2.4 calls (read from its source):
repo info per revision, tree listing, paths-info, HEAD/GET on /resolve with the hub's
headers, LFS redirects to a second "CDN" origin, Range requests, the hub's error codes.
"""

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import PurePosixPath
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".parquet")
RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: sha1 over `blob <size>\\0` + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class HubFile:
    """One file of one commit, as the hub stores it (git blob or LFS object)."""

    path: str
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return (
            "version https://git-lfs.github.com/spec/v1\n"
            f"oid sha256:{self.sha256}\nsize {len(self.data)}\n"
        ).encode()

    @property
    def oid(self) -> str:
        return git_blob_oid(self.pointer if self.lfs else self.data)


@dataclass
class HubRepo:
    """A repo: commits (full trees), branches, tags and who may read it."""

    repo_type: str
    repo_id: str
    private: bool = False
    gated: bool = False
    readers: set[str] = field(default_factory=set)
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        for prefix, refs in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if rev.startswith(prefix):
                return refs.get(rev[len(prefix) :])
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        return rev if rev in self.commits else None


@dataclass
class Faults:
    """Misbehaviour to inject, keyed by the file's path in the repo.

    drop_after: for each of the next GETs of the file (one list item each), send the
    full headers but close the connection once the body reaches that byte offset.
    corrupt: serve these files with one byte flipped (same length, wrong sha256).
    advertised_size: sizes to claim in tree/paths-info listings instead of the truth.
    status: answer this HTTP status to every request whose path contains the key.
    """

    drop_after: dict[str, list[int]] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)
    advertised_size: dict[str, int] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Seen:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]


class HubServer:
    """The hub and its CDN, each a threaded HTTP server bound to 127.0.0.1."""

    def __init__(
        self, *, tokens: set[str] | None = None, page_size: int = 1000
    ) -> None:
        self.tokens = set(tokens or ())
        self.page_size = page_size
        self.repos: dict[tuple[str, str], HubRepo] = {}
        self.faults = Faults()
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=False))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=True))
        self._threads: list[threading.Thread] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def __enter__(self) -> "HubServer":
        for server in (self._hub, self._cdn):
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    # Content

    def add_repo(
        self,
        repo_id: str,
        *,
        repo_type: str = "model",
        private: bool = False,
        gated: bool = False,
        readers: set[str] | None = None,
    ) -> HubRepo:
        repo = HubRepo(repo_type, repo_id, private, gated, set(readers or ()))
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        repo_type: str = "model",
        branch: str = "main",
        tag: str | None = None,
        sha: str | None = None,
    ) -> str:
        """Make `files` the whole tree of a new commit on `branch`; returns its sha.

        `sha` gives the commit a chosen id (e.g. a real hub commit pinned in a spec).
        """
        repo = self.repos[(repo_type, repo_id)]
        tree = {
            path: HubFile(path, data, path.endswith(LFS_SUFFIXES))
            for path, data in files.items()
        }
        self._counter += 1
        seed = json.dumps(
            [repo_id, self._counter, sorted((p, f.oid) for p, f in tree.items())]
        )
        sha = sha or hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = tree
        repo.branches[branch] = sha
        if tag is not None:
            repo.tags[tag] = sha
        return sha

    def seen(self, method: str | None = None, contains: str = "") -> list[Seen]:
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and contains in r.path
            ]

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)

    def take_drop(self, path: str) -> int | None:
        with self._lock:
            offsets = self.faults.drop_after.get(path)
            return offsets.pop(0) if offsets else None


class _Reply(Exception):
    """An HTTP error answer, raised anywhere in a handler."""

    def __init__(self, status: int, code: str | None, message: str, **headers: str):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = (
            status,
            code,
            message,
            headers,
        )


def _handler(hub: HubServer, *, cdn: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        server_hub = hub
        is_cdn = cdn

    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: HubServer
    is_cdn: bool

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # Routing

    def _dispatch(self, method: str) -> None:
        hub = self.server_hub
        url = urlsplit(self.path)
        hub.record(Seen(method, self.path, {k: v for k, v in self.headers.items()}))
        body = b""
        if method == "POST":
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            for key, status in hub.faults.status.items():
                if key in url.path:
                    raise _Reply(status, None, f"injected {status}")
            if self.is_cdn:
                return self._cdn_object(method, url.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            query = parse_qs(url.query)
            if parts[:1] == ["api"] and len(parts) >= 4:
                return self._api(method, parts[1:], query, body)
            if len(parts) >= 5 and parts[0] == "datasets" and parts[3] == "resolve":
                return self._resolve(method, "dataset", parts[1:])
            if len(parts) >= 4 and parts[2] == "resolve":
                return self._resolve(method, "model", parts)
            raise _Reply(404, None, "Not Found")
        except _Reply as reply:
            self._error(method, reply)

    def _api(self, method: str, parts: list[str], query: dict, body: bytes) -> None:
        kind, owner, name, *rest = parts
        repo_type = {"models": "model", "datasets": "dataset"}.get(kind)
        if repo_type is None:
            raise _Reply(404, None, "Not Found")
        repo = self._repo(repo_type, f"{owner}/{name}", files=False)
        if not rest or rest[0] == "revision":
            rev = rest[1] if len(rest) > 1 else "main"
            return self._json(self._info(repo, self._commit(repo, rev), query))
        if rest[0] == "tree" and len(rest) >= 2:
            sha = self._commit(repo, rest[1])
            return self._tree(repo, sha, "/".join(rest[2:]), query)
        if rest[0] == "paths-info" and len(rest) == 2 and method == "POST":
            sha = self._commit(repo, rest[1])
            form = parse_qs(body.decode())
            tree = repo.commits[sha]
            wanted = [p for p in form.get("paths", []) if p in tree]
            return self._json([self._entry(tree[p]) for p in wanted])
        raise _Reply(404, None, "Not Found")

    # Access and lookup

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def _repo(self, repo_type: str, repo_id: str, *, files: bool) -> HubRepo:
        hub, token = self.server_hub, self._token()
        if token is not None and token not in hub.tokens:
            raise _Reply(401, None, "Invalid credentials in Authorization header")
        repo = hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and token not in repo.readers):
            if token is None:
                raise _Reply(401, "RepoNotFound", "Invalid username or password.")
            raise _Reply(404, "RepoNotFound", "Repository not found")
        if files and repo.gated and token not in repo.readers:
            what = f"Access to {repo_type} {repo_id} is restricted"
            if token is None:
                raise _Reply(
                    401,
                    "GatedRepo",
                    f"{what}. You must have access to it and be authenticated to "
                    "access it. Please log in.",
                )
            raise _Reply(
                403,
                "GatedRepo",
                f"{what} and you are not in the authorized list. Visit "
                f"{hub.endpoint}/{repo_id} to ask for access.",
            )
        return repo

    def _commit(self, repo: HubRepo, rev: str) -> str:
        sha = repo.resolve(rev)
        if sha is None:
            raise _Reply(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha

    # API answers

    def _info(self, repo: HubRepo, sha: str, query: dict) -> dict:
        blobs = query.get("blobs", ["false"])[0].lower() in ("true", "1")
        siblings = []
        for f in repo.commits[sha].values():
            sibling: dict = {"rfilename": f.path}
            if blobs:
                sibling.update(size=len(f.data), blobId=f.oid)
                if f.lfs:
                    sibling["lfs"] = {
                        "sha256": f.sha256,
                        "size": len(f.data),
                        "pointerSize": len(f.pointer),
                    }
            siblings.append(sibling)
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": sha,
            "lastModified": "2025-01-01T00:00:00.000Z",
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": siblings,
        }

    def _entry(self, f: HubFile) -> dict:
        size = self.server_hub.faults.advertised_size.get(f.path, len(f.data))
        entry: dict = {"type": "file", "oid": f.oid, "size": size, "path": f.path}
        if f.lfs:
            entry["lfs"] = {
                "oid": f.sha256,
                "size": size,
                "pointerSize": len(f.pointer),
            }
        return entry

    def _tree(self, repo: HubRepo, sha: str, base: str, query: dict) -> None:
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        tree = repo.commits[sha]
        prefix = f"{base}/" if base else ""
        if base and not any(p.startswith(prefix) for p in tree):
            raise _Reply(404, "EntryNotFound", f"{base} does not exist on {sha}")
        entries: dict[str, dict] = {}
        for path in sorted(tree):
            if not path.startswith(prefix):
                continue
            rel = PurePosixPath(path[len(prefix) :])
            dirs = [prefix + str(p) for p in reversed(rel.parents) if str(p) != "."]
            for d in dirs if recursive else dirs[:1]:
                oid = hashlib.sha1(f"tree {sha} {d}".encode()).hexdigest()
                entries.setdefault(
                    d, {"type": "directory", "oid": oid, "size": 0, "path": d}
                )
            if recursive or not dirs:
                entries[path] = self._entry(tree[path])
        listing = list(entries.values())
        start = int(query.get("cursor", ["0"])[0])
        page = listing[start : start + self.server_hub.page_size]
        headers = {}
        if start + self.server_hub.page_size < len(listing):
            url = urlsplit(self.path)
            rest = {k: v[0] for k, v in query.items() if k != "cursor"}
            args = "&".join(f"{k}={quote(v)}" for k, v in rest.items())
            nxt = f"{start + self.server_hub.page_size}"
            link = f"{self.server_hub.endpoint}{url.path}?{args}&cursor={nxt}"
            headers["Link"] = f'<{link}>; rel="next"'
        self._json(page, **headers)

    # Files

    def _resolve(self, method: str, repo_type: str, parts: list[str]) -> None:
        owner, name, _, rev, *path_parts = parts
        repo = self._repo(repo_type, f"{owner}/{name}", files=True)
        sha = self._commit(repo, rev)
        path = "/".join(path_parts)
        f = repo.commits[sha].get(path)
        if f is None:
            raise _Reply(
                404, "EntryNotFound", "Entry not found", **{"X-Repo-Commit": sha}
            )
        common = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if f.lfs:
            location = f"{self.server_hub.cdn}/lfs/{f.sha256}/{quote(path)}"
            self.send_response(302)
            headers = {
                **common,
                "Location": location,
                "ETag": f'"{f.oid}"',
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": str(len(f.data)),
                "Content-Length": "0",
            }
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            return
        self._send_bytes(method, f, {**common, "ETag": f'"{f.oid}"'})

    def _cdn_object(self, method: str, path: str) -> None:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if len(parts) < 3 or parts[0] != "lfs":
            raise _Reply(404, None, "Not Found")
        sha256, rel = parts[1], "/".join(parts[2:])
        for repo in self.server_hub.repos.values():
            for tree in repo.commits.values():
                f = tree.get(rel)
                if f is not None and f.lfs and f.sha256 == sha256:
                    return self._send_bytes(method, f, {"ETag": f'"{sha256}"'})
        raise _Reply(404, None, "NoSuchKey")

    def _send_bytes(self, method: str, f: HubFile, headers: dict[str, str]) -> None:
        hub = self.server_hub
        data = f.data
        if f.path in hub.faults.corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start, end, status = 0, len(data) - 1, 200
        match = RANGE_RE.fullmatch(self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            if start >= len(data):
                raise _Reply(416, None, "Requested Range Not Satisfiable")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        body = data[start : end + 1]
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if method == "HEAD":
            return
        cut = hub.take_drop(f.path)
        if cut is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[: max(cut - start, 0)])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    # Plumbing

    def _json(self, payload: object, **headers: str) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(200)
        for key, value in {
            "Content-Type": "application/json",
            "Content-Length": str(len(raw)),
            **headers,
        }.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)

    def _error(self, method: str, reply: _Reply) -> None:
        raw = json.dumps({"error": reply.message}).encode()
        self.send_response(reply.status)
        headers = {
            "Content-Type": "application/json",
            "Content-Length": str(len(raw)),
            "X-Error-Message": reply.message,
            **reply.headers,
        }
        if reply.code is not None:
            headers["X-Error-Code"] = reply.code
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(raw)
