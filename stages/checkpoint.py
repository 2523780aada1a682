"""Read and write safetensors checkpoints: single or sharded, with the index json.

Reads are zero-copy views of memory-mapped files; writes stream tensor bytes in order.
"""

import hashlib
import json
import logging
import math
import mmap
import os
import queue
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
MAX_HEADER = 100 << 20
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def qwen2_shapes(
    *,
    vocab: int,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    tied: bool = False,
) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Qwen2ForCausalLM checkpoint (q/k/v with biases)."""
    kv = hidden // heads * kv_heads
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.q_proj.bias": (hidden,),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (hidden, hidden),
        }
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be read as safetensors weights."""


def dtype_from_name(name: str) -> torch.dtype:
    """`bfloat16` -> torch.bfloat16; the names config.json and params.yaml use."""
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        allowed = ", ".join(DTYPE_NAMES)
        raise ValueError(f"unknown dtype {name!r}; allowed: {allowed}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> `bfloat16`."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: `offset` is absolute in `file`."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one .safetensors header, checking every entry against the file size."""
    with open(path, "rb") as f:
        return read_header_from(f, path)[1]


def read_header_from(f: BinaryIO, path: Path) -> tuple[bytes, dict[str, TensorInfo]]:
    """Read the header at `f`'s position: its raw bytes (8-byte length included, for a
    caller that hashes the file as it reads it) and its checked entries."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{path}: header length {n} exceeds the file")
    raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: header is not JSON ({e})") from None
    header.pop("__metadata__", None)
    start = 8 + n
    out = {}
    for name, entry in header.items():
        out[name] = _tensor_info(path, name, entry, start, size)
    _check_overlap(path, out.values())
    return head + raw, out


def _tensor_info(
    path: Path, name: str, entry: dict, start: int, size: int
) -> TensorInfo:
    dt = entry.get("dtype")
    if dt not in ST_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dt!r}")
    shape = tuple(entry.get("shape", ()))
    begin, end = entry.get("data_offsets", (None, None))
    info = TensorInfo(name, ST_DTYPES[dt], shape, path, start + begin)
    if end - begin != info.nbytes or start + end > size:
        raise CheckpointError(
            f"{path}: tensor {name} data_offsets [{begin}, {end}] do not hold "
            f"shape {list(shape)} of {dt} inside a file of {size} bytes"
        )
    return info


def _check_overlap(path: Path, infos: Iterable[TensorInfo]) -> None:
    spans = sorted((i.offset, i.offset + i.nbytes, i.name) for i in infos)
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {a} and {b} overlap")


class Checkpoint:
    """A model folder's safetensors weights, memory-mapped copy-on-write."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tensors: dict[str, TensorInfo] = {}
        for path in weight_files(root):
            for name, info in read_header(path).items():
                if name in self.tensors:
                    raise CheckpointError(f"{root}: tensor {name} appears twice")
                self.tensors[name] = info
        self._check_index()
        self._maps: dict[Path, mmap.mmap] = {}

    def _check_index(self) -> None:
        index = self.root / INDEX
        if not index.exists():
            return
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        for name, file in weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != file:
                raise CheckpointError(
                    f"{index}: weight_map says {name} is in {file}, but it is in "
                    f"{info.file.name if info else 'no shard'}"
                )
        missing = sorted(set(self.tensors) - set(weight_map))
        if missing:
            raise CheckpointError(f"{index}: weight_map lacks {', '.join(missing[:5])}")

    def config(self) -> dict:
        path = self.root / "config.json"
        if not path.exists():
            raise CheckpointError(f"{self.root}: no config.json")
        return json.loads(path.read_text())

    def dtypes(self) -> set[torch.dtype]:
        return {i.dtype for i in self.tensors.values()}

    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy view of `name`; its pages stay file-backed until written."""
        info = self.tensors[name]
        mm = self._maps.get(info.file)
        if mm is None:
            with open(info.file, "rb") as f:
                # Copy-on-write: pages stay file-backed until written, and a write into
                # a view changes only this process's copy, never the file.
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            mm.madvise(mmap.MADV_SEQUENTIAL)
            self._maps[info.file] = mm
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        raw = torch.frombuffer(
            mm, dtype=torch.uint8, count=info.nbytes, offset=info.offset
        )
        if info.offset % info.dtype.itemsize:
            raw = raw.clone()
        return raw.view(info.dtype).view(info.shape)

    def close(self) -> None:
        self._maps.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def weight_files(root: Path) -> list[Path]:
    """The checkpoint's .safetensors files: those the index names, else all of them."""
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    index = root / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = [root / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if "/" in f.relative_to(root).as_posix() or not f.is_file():
                raise CheckpointError(
                    f"{index}: names {f.name}, which is not in {root}"
                )
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root}: no *.safetensors files")
    return files


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: name, dtype and shape, bytes come later."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: list[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most `shard_size` bytes each.

    A tensor larger than `shard_size` gets a shard of its own, as transformers does.
    """
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if shards[-1] and used + spec.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _header_bytes(shard: list[TensorSpec]) -> bytes:
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for s in shard:
        header[s.name] = {
            "dtype": ST_NAMES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [pos, pos + s.nbytes],
        }
        pos += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class _Sink:
    """Writes shard files and hashes them: inline, or on two background threads.

    In the background, one thread writes while the other hashes what was written:
    both release the GIL, so the caller keeps computing the next chunk meanwhile.
    """

    def __init__(self, background: bool) -> None:
        self.sha256: dict[Path, str] = {}
        self._f = None
        self._path: Path | None = None
        self._hash = None
        self._hash_path: Path | None = None
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        if background:
            self._write_q: queue.Queue = queue.Queue(maxsize=8)
            self._hash_q: queue.Queue = queue.Queue(maxsize=8)
            for target in (self._write_loop, self._hash_loop):
                self._threads.append(threading.Thread(target=target, daemon=True))
                self._threads[-1].start()

    def put(self, op: str, arg: object = None) -> None:
        if not self._threads:
            self._write(op, arg)
            self._digest(op, arg)
            return
        if self._error:
            raise self._error
        self._write_q.put((op, arg))

    def _write_loop(self) -> None:
        while True:
            op, arg = self._write_q.get()
            if op != "stop" and self._error is None:
                try:
                    self._write(op, arg)
                except BaseException as e:  # re-raised in the caller's thread
                    self._error = e
            self._hash_q.put((op, arg))
            if op == "stop":
                return

    def _hash_loop(self) -> None:
        while True:
            op, arg = self._hash_q.get()
            if op == "stop":
                return
            if self._error is None:
                self._digest(op, arg)

    def _write(self, op: str, arg: object) -> None:
        if op in ("open", "close") and self._f:
            self._f.close()
            self._f = None
        if op == "open":
            self._f = open(arg, "wb")
        elif op == "data":
            self._f.write(arg)

    def _digest(self, op: str, arg: object) -> None:
        if op in ("open", "close") and self._hash is not None:
            self.sha256[self._hash_path] = self._hash.hexdigest()
            self._hash = None
        if op == "open":
            self._hash_path, self._hash = arg, hashlib.sha256()
        elif op == "data":
            self._hash.update(arg)

    def finish(self) -> None:
        self.put("close")
        self._stop()
        if self._error:
            raise self._error

    def _stop(self) -> None:
        if self._threads:
            self._write_q.put(("stop", None))
            for t in self._threads:
                t.join()
            self._threads = []

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        self._stop()
        if self._f:
            self._f.close()
            self._f = None


class ShardedWriter:
    """Write a sharded checkpoint into `out`, one tensor's bytes after another.

    Call `write(chunk)` with the bytes of each tensor in spec order (any number of
    chunks per tensor), then `close()`, which checks that every byte came and writes
    model.safetensors.index.json. With `background`, files are written and hashed on
    a thread while the caller computes the next chunk. `sha256` maps each shard file
    name to its hash after `close()`.
    """

    def __init__(
        self,
        out: Path,
        specs: list[TensorSpec],
        shard_size: int,
        *,
        background: bool = False,
    ) -> None:
        self.out = out
        self.shards = plan_shards(specs, shard_size)
        n = len(self.shards)
        self.files = [out / shard_name(i, n) for i in range(n)]
        self.sha256: dict[str, str] = {}
        self._queue: Iterator[tuple[int, TensorSpec]] = (
            (i, s) for i, shard in enumerate(self.shards) for s in shard
        )
        self._sink = _Sink(background)
        self._background = background
        self._shard = -1
        self._left = 0
        self._spec: TensorSpec | None = None
        self._next_tensor()

    def _next_tensor(self) -> None:
        for i, spec in self._queue:
            if i != self._shard:
                self._sink.put("open", self.files[i])
                self._sink.put("data", _header_bytes(self.shards[i]))
                self._shard = i
            self._spec, self._left = spec, spec.nbytes
            if self._left:
                return
        self._spec = None

    def write(self, chunk: torch.Tensor) -> None:
        """Append `chunk` (the current tensor's dtype) to the output."""
        spec = self._spec
        if spec is None:
            raise ValueError("all tensors are written; got more bytes")
        if chunk.dtype != spec.dtype:
            raise ValueError(f"{spec.name}: got {chunk.dtype}, expected {spec.dtype}")
        n = chunk.numel() * chunk.element_size()
        if n > self._left:
            raise ValueError(f"{spec.name}: {n} bytes exceed the {self._left} left")
        raw = chunk.reshape(-1).view(torch.uint8)
        if self._background or not raw.is_contiguous():
            raw = raw.clone()
        self._sink.put("data", raw.numpy().data)
        self._left -= n
        if not self._left:
            self._next_tensor()

    def close(self) -> Path:
        if self._spec is not None:
            self.abort()
            raise ValueError(
                f"{self._spec.name}: {self._left} bytes were never written"
            )
        self._sink.finish()
        self.sha256 = {p.name: h for p, h in self._sink.sha256.items()}
        index = {
            "metadata": {"total_size": sum(s.nbytes for sh in self.shards for s in sh)},
            "weight_map": {
                s.name: f.name
                for f, sh in zip(self.files, self.shards, strict=True)
                for s in sh
            },
        }
        path = self.out / INDEX
        path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return path

    def abort(self) -> None:
        self._sink.abort()


def save_checkpoint(
    tensors: dict[str, torch.Tensor], out: Path, *, shard_size: int = 5 << 30
) -> None:
    """Write in-memory tensors (names sorted) as a sharded checkpoint into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    specs = [TensorSpec(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names]
    writer = ShardedWriter(out, specs, shard_size)
    for n in names:
        writer.write(tensors[n])
    writer.close()
