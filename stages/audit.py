"""Stage audit: prove that a release folder is the merge its provenance.json claims.

Reads MODEL_DIR and the two constituents (--len, --acc); writes a JSON report (--json)
with four checks: integrity, lineage, recompute (bit for bit) and weight inference.
"""

import argparse
import hashlib
import json
import logging
import math
import mmap
import os
import sys
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from stages import modelfiles
from stages.checkpoint import CheckpointError, read_header_from
from stages.hashing import manifest_id, sha256_file, write_json
from stages.merging import linear_merge

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
PROVENANCE = "provenance.json"
CHECKS = ("integrity", "lineage", "recompute", "inference")
FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# Same-size integers for the bit patterns, and the pattern of the smallest subnormal
# with the sign bit set: x ^ it maps +0 to -min and -0 to +min.
BITS = {
    torch.bfloat16: (torch.int16, -32767),
    torch.float16: (torch.int16, -32767),
    torch.float32: (torch.int32, -(2**31) + 1),
    torch.float64: (torch.int64, -(2**63) + 1),
}
# Elements per step of the recompute and the inference: a dozen fp32 temporaries of
# this size stay in cache; 2^18 ran the inference 2.2x faster than 2^22 here (1 thread).
CHUNK = 1 << 18
# Where the recompute runs and matches, the intervals of a tensor of more than
# FULL_FIT elements come from a deterministic sample: SAMPLE_BLOCK elements of every
# SAMPLE_EVERY * SAMPLE_BLOCK (1/16 here). Its intersection holds the one of all
# elements, so the interval is honest, only wider; the other elements are vouched for
# by the bit-exact recompute. A tensor the recompute does not match is fitted in full.
FULL_FIT = 1 << 20
SAMPLE_BLOCK = 1 << 16
SAMPLE_EVERY = 16
# Tensors read ahead of need in a constituent whose tensor order differs from the
# release's are held up to this many bytes, then dropped and read again when needed.
PENDING_BYTES = 1 << 30
# fp32 merge arithmetic (a product, a fused multiply-add, a division, weights rounded
# to fp32) is off by at most 2^-21 (|len| + |acc|) for w in [0, 1]. There
# |len| + |acc| <= 2 |released| + 2 |len - acc|, and a half gap of a format with p
# mantissa bits is at least 2^-(p+3) |released|; so each rounding interval widened by
# 2^(p-16) of itself, plus 2^-19 in w, holds every w the arithmetic allows (2x margin).
W_SLACK = 2.0**-19
# The w axis (and its bins) searched for the most-agreed w when elements disagree.
W_RANGE = (-1.0, 2.0)
W_BINS = 1 << 15
# Bytes read but not yet hashed, at most.
QUEUED = 256 << 20
# Names listed in a summary line, at most (the JSON report has them all).
MAX_LISTED = 20


class AuditError(ValueError):
    """A file of the audited folders is missing or malformed."""


# Reading: every byte of every weight file is read once, hashed as it is read.


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(f: Any, path: Path) -> tuple[bytes, list[Entry]]:
    """The raw header bytes and the tensor entries of a safetensors file, by offset."""
    try:
        raw, infos = read_header_from(f, path)
    except CheckpointError as e:
        raise AuditError(str(e)) from None
    entries = [
        Entry(i.name, i.dtype, i.shape, i.offset, i.offset + i.nbytes)
        for i in infos.values()
    ]
    return raw, sorted(entries, key=lambda e: e.start)


def tensor_at(data: memoryview, entry: Entry) -> torch.Tensor:
    """A read-only tensor over mapped file bytes, copied only when misaligned."""
    if not len(data):
        return torch.empty(entry.shape, dtype=entry.dtype)
    with warnings.catch_warnings():
        # The mapping is read-only by design; nothing here writes into inputs.
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(data, dtype=torch.uint8)
    if entry.start % entry.dtype.itemsize:
        raw = raw.clone()
    return raw.view(entry.dtype).reshape(entry.shape)


# The recompute of a tensor runs on this thread while the main one fits it.
RECOMPUTE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-recompute")


class Hasher:
    """sha256 of a byte stream, computed on a background thread (hashlib lets go of
    the GIL), one thread for all files, so the arithmetic keeps the other cores.
    At most QUEUED bytes wait for it; reading waits beyond that."""

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-sha256")

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.queue: deque[tuple[Future, int]] = deque()
        self.queued = 0

    def update(self, data: Any) -> None:
        self.queue.append((self.pool.submit(self.sha.update, data), len(data)))
        self.queued += len(data)
        while self.queued > QUEUED:
            done, n = self.queue.popleft()
            done.result()
            self.queued -= n

    def hexdigest(self) -> str:
        while self.queue:
            self.queue.popleft()[0].result()
        self.queued = 0
        return self.sha.hexdigest()


class Shard:
    """One safetensors file, mapped read-only and walked front to back once: every
    byte is hashed, and the tensors are views of the same pages, never copies."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            raw, self.entries = read_header(f, path)
            self.size = os.fstat(f.fileno()).st_size
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.map.madvise(mmap.MADV_SEQUENTIAL)
        self.data = memoryview(self.map)
        self.sha = Hasher()
        self.pos = 0
        self.bytes_read = 0
        self._take(len(raw))
        self.next = 0
        self.digest: str | None = None

    def _take(self, n: int) -> memoryview:
        chunk = self.data[self.pos : self.pos + n]
        self.sha.update(chunk)
        self.pos += n
        self.bytes_read += n
        return chunk

    def read_next(self) -> tuple[Entry, torch.Tensor] | None:
        if self.next == len(self.entries):
            return None
        entry = self.entries[self.next]
        self.next += 1
        if entry.start > self.pos:
            self._take(entry.start - self.pos)
        return entry, tensor_at(self._take(entry.end - entry.start), entry)

    def finish(self) -> str:
        """Hash the rest of the file; return its sha256."""
        if self.digest is None:
            self.next = len(self.entries)
            self._take(self.size - self.pos)
            self.digest = self.sha.hexdigest()
        return self.digest

    def reread(self, entry: Entry) -> torch.Tensor:
        self.bytes_read += entry.end - entry.start
        return tensor_at(self.data[entry.start : entry.end], entry)


def shard_names(folder: Path) -> tuple[list[str], dict[str, str], list[str]]:
    """(shard files, tensor -> shard per the index, problems) of a model folder."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            return [], {}, [f"{index}: not a safetensors index ({e!r})"]
        return sorted(set(weight_map.values())), dict(weight_map), []
    names = sorted(p.name for p in folder.glob("*.safetensors"))
    if not names:
        return [], {}, [f"{folder}: no *.safetensors weights and no {INDEX}"]
    return names, {}, []


class WeightStream:
    """A model folder's tensors as one stream over its shards, in file order.

    Tensors asked for out of file order are found by reading ahead; what is read
    ahead waits in memory (up to PENDING_BYTES) and is otherwise read again later.
    """

    def __init__(self, folder: Path, *, pending_bytes: int = PENDING_BYTES):
        self.folder = folder
        names, self.index, self.problems = shard_names(folder)
        self.shards: list[Shard] = []
        self.missing: list[str] = []
        self.where: dict[str, tuple[Shard, Entry]] = {}
        for name in names:
            path = folder / name
            if not path.is_file():
                self.missing.append(name)
                continue
            try:
                shard = Shard(path)
            except (AuditError, OSError) as e:
                self.problems.append(str(e))
                continue
            self.shards.append(shard)
            for entry in shard.entries:
                if entry.name in self.where:
                    self.problems.append(
                        f"{folder}: tensor {entry.name} is in both "
                        f"{self.where[entry.name][0].path.name} and {name}"
                    )
                self.where[entry.name] = (shard, entry)
        for tensor, shard_name in self.index.items():
            found = self.where.get(tensor)
            if shard_name in self.missing:
                continue
            if found is None or found[0].path.name != shard_name:
                self.problems.append(
                    f"{folder / INDEX}: maps {tensor} to {shard_name}, which does "
                    "not hold it"
                )
        self.names = set(self.where)
        self.unavailable = {t for t, s in self.index.items() if s in self.missing}
        self.pending: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.pending_bytes = 0
        self.pending_cap = pending_bytes
        self.seen: set[str] = set()
        self.current = 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor once, in file order (the release drives the audit this way)."""
        while (item := self._advance()) is not None:
            yield item

    def _advance(self) -> tuple[str, torch.Tensor] | None:
        while self.current < len(self.shards):
            shard = self.shards[self.current]
            try:
                item = shard.read_next()
            except (AuditError, OSError) as e:
                self.problems.append(str(e))
                item = None
            if item is not None:
                self.seen.add(item[0].name)
                return item[0].name, item[1]
            self.current += 1
        return None

    def get(self, name: str) -> torch.Tensor | None:
        """The named tensor, or None when this folder does not hold it."""
        if name in self.pending:
            t = self.pending.pop(name)
            self.pending_bytes -= t.nbytes
            return t
        if name not in self.where:
            return None
        if name in self.seen:
            shard, entry = self.where[name]
            return shard.reread(entry)
        while (item := self._advance()) is not None:
            if item[0] == name:
                return item[1]
            self.hold(*item)
        return None

    def hold(self, name: str, t: torch.Tensor) -> None:
        """Keep a tensor read ahead of need, dropping the oldest beyond the cap."""
        self.pending[name] = t
        self.pending_bytes += t.nbytes
        while self.pending_bytes > self.pending_cap and self.pending:
            _, old = self.pending.popitem(last=False)
            self.pending_bytes -= old.nbytes

    def finish(self) -> dict[str, str]:
        """Read what is left; return {shard name: sha256} of every readable shard."""
        self.pending.clear()
        out = {}
        for shard in self.shards:
            try:
                out[shard.path.name] = shard.finish()
            except (AuditError, OSError) as e:
                self.problems.append(str(e))
        return out

    @property
    def bytes_read(self) -> int:
        return sum(s.bytes_read for s in self.shards)

    @property
    def size(self) -> int:
        return sum(s.size for s in self.shards)


# Recompute: the merge at the recorded weights, bit for bit.


@dataclass
class Mismatch:
    count: int = 0
    max_abs_diff: float = 0.0
    first_index: int | None = None


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """Floats as same-size integers, so that NaN equals itself and -0 differs from 0."""
    if t.dtype.is_floating_point:
        return t.view(BITS[t.dtype][0])
    return t


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit-for-bit equality, compared 8 bytes at a time where the layout allows
    (2.3x faster than comparing bf16 patterns as int16, measured here)."""
    if want.dtype != got.dtype:
        return False
    x, y = got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
    if x.numel() % 8 == 0 and x.data_ptr() % 8 == 0 and y.data_ptr() % 8 == 0:
        return torch.equal(x.view(torch.int64), y.view(torch.int64))
    return torch.equal(x, y)


def compare_chunk(
    got: torch.Tensor, want: torch.Tensor, offset: int, into: Mismatch
) -> None:
    if same_bits(got, want):
        return
    if want.dtype != got.dtype:
        want = want.to(got.dtype)
    eq = as_bits(got) == as_bits(want)
    bad = int(eq.numel() - torch.count_nonzero(eq))
    if not bad:
        return
    if into.first_index is None:
        into.first_index = offset + int((~eq).nonzero()[0, 0])
    diff = (got[~eq].double() - want[~eq].double()).abs()
    diff = diff.nan_to_num(nan=math.inf)
    into.count += bad
    into.max_abs_diff = max(into.max_abs_diff, float(diff.max()))


# Inference: which w makes released = round(w * len + (1 - w) * acc)?


def half_out(dtype: torch.dtype) -> float:
    """lerp weight from a value to its neighbour: the midpoint, pushed out."""
    p = -round(math.log2(torch.finfo(dtype).eps))
    return (1 + 2.0 ** (p - 16)) / 2


def neighbours(
    rl: torch.Tensor,
    work: torch.Tensor,
    *,
    zeros: bool = True,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The representable values next to each element of `rl`, away from zero and
    toward it (past zero for +-0), in the dtype of `work` (`rl` as that dtype).

    With zeros=False a bf16 zero's toward-neighbour may be NaN (a cheaper pass that
    the caller redoes when a NaN shows).
    """
    if rl.dtype == torch.bfloat16 and work.dtype == torch.float32:
        # A bf16 value is the top half of its fp32 pattern: one bf16 step is 2^16.
        bits = work.view(torch.int32)
        away, toward = out or (torch.empty_like(work), torch.empty_like(work))
        torch.add(bits, 65536, out=away.view(torch.int32))
        torch.sub(bits, 65536, out=toward.view(torch.int32))
        if zeros:
            toward = torch.where(work == 0, -away, toward)
        return away, toward
    ints, flip = BITS[rl.dtype]
    bits = rl.view(ints)
    away = (bits + 1).view(rl.dtype)
    zero = (bits & -flip) == 0
    toward = torch.where(zero, bits ^ flip, bits - 1).view(rl.dtype)
    return away.to(work.dtype), toward.to(work.dtype)


@dataclass
class Intervals:
    """For each element of a chunk, the closed interval of w that explains it:
    [-inf, inf] where len == acc == released, empty (at +-inf) where len == acc but
    released differs."""

    lo: torch.Tensor
    hi: torch.Tensor


class Workspace:
    """Preallocated chunk-sized temporaries: fresh ones cost page faults every chunk."""

    def __init__(self, dtype: torch.dtype, n: int = CHUNK):
        self.buf = torch.empty((7, n), dtype=dtype)

    def take(self, m: int) -> list[torch.Tensor]:
        return [row[:m] for row in self.buf]


def chunk_intervals(
    ln: torch.Tensor,
    ac: torch.Tensor,
    rl: torch.Tensor,
    ws: Workspace,
    *,
    zeros: bool = True,
) -> tuple[Intervals, tuple[float, float, float]]:
    """Intervals (W_SLACK not yet applied, views into `ws`) and least-squares sums
    (d.d, d.e, e.e) of one chunk.

    d = len - acc and e = released - acc. Released r stands for every real between
    the midpoints to its neighbours; acc + w * d lands there for w in
    (midpoint - acc) / d, in either order.
    """
    l32, a32, r32, d, e, t1, t2 = ws.take(rl.numel())
    l32.copy_(ln), a32.copy_(ac), r32.copy_(rl)
    torch.sub(l32, a32, out=d)
    torch.sub(r32, a32, out=e)
    sums = (float(d @ d), float(d @ e), float(e @ e))
    away, toward = neighbours(rl, r32, zeros=zeros, out=(t1, t2))
    out = half_out(rl.dtype)
    torch.lerp(r32, away, out, out=t1).sub_(a32).div_(d)
    torch.lerp(r32, toward, out, out=t2).sub_(a32).div_(d)
    lo = torch.minimum(t1, t2, out=e)
    return Intervals(lo, torch.maximum(t1, t2, out=t1)), sums


def work_dtype(rl: torch.Tensor) -> torch.dtype:
    """fp32 holds bf16 and fp16 values and their midpoints exactly; fp32 needs fp64."""
    return torch.float64 if rl.element_size() >= 4 else torch.float32


def interval_chunks(
    ln: torch.Tensor, ac: torch.Tensor, rl: torch.Tensor
) -> Iterator[Intervals]:
    ws = Workspace(work_dtype(rl))
    fl, fa, fr = ln.reshape(-1), ac.reshape(-1), rl.reshape(-1)
    for i in range(0, fr.numel(), CHUNK):
        s = slice(i, i + CHUNK)
        iv = chunk_intervals(fl[s], fa[s], fr[s], ws)[0]
        yield Intervals(iv.lo.sub_(W_SLACK), iv.hi.add_(W_SLACK))


def max_coverage(
    lo: torch.Tensor, hi: torch.Tensor, base: int = 0
) -> tuple[float | None, int]:
    """A point covered by the most closed intervals [lo, hi] (plus `base` that cover
    everything), and how many cover it; (None, base) when there are none."""
    if not lo.numel() and not hi.numel():
        return None, base
    points = torch.cat([lo, hi]).double()
    closing = torch.cat([torch.zeros_like(lo), torch.ones_like(hi)]).to(torch.int8)
    # Openings sort before closings at equal positions: closed intervals that touch
    # share that point.
    order = torch.argsort(closing, stable=True)
    order = order[torch.argsort(points[order], stable=True)]
    delta = 1 - 2 * closing[order].long()
    running = base + delta.cumsum(0)
    best = int(running.argmax())
    if int(running[best]) <= base:
        return None, base
    return float(points[order][best]), int(running[best])


def bin_index(x: torch.Tensor) -> torch.Tensor:
    """Bins of the w axis: 0 below W_RANGE, 1..W_BINS inside, W_BINS + 1 above."""
    width = (W_RANGE[1] - W_RANGE[0]) / W_BINS
    idx = torch.floor((x.double() - W_RANGE[0]) / width) + 1
    return idx.nan_to_num(nan=0).clamp(0, W_BINS + 1).long()


def most_agreed(ln: torch.Tensor, ac: torch.Tensor, rl: torch.Tensor) -> float | None:
    """The w that the most elements' intervals contain, robust to a few outliers.

    A histogram of interval ends over W_RANGE bounds each bin's coverage from above;
    the best bins are then resolved exactly from the ends that fall inside them.
    """
    lo_count = torch.zeros(W_BINS + 2, dtype=torch.long)
    hi_count = torch.zeros(W_BINS + 2, dtype=torch.long)
    for iv in interval_chunks(ln, ac, rl):
        lo_count += torch.bincount(bin_index(iv.lo), minlength=W_BINS + 2)
        hi_count += torch.bincount(bin_index(iv.hi), minlength=W_BINS + 2)
    lo_before = lo_count.cumsum(0) - lo_count
    hi_before = hi_count.cumsum(0) - hi_count
    bound = lo_before + lo_count - hi_before
    bound[0] = bound[-1] = -1
    best_w, best_n, done = None, 0, torch.zeros_like(bound, dtype=torch.bool)
    while True:
        open_bound = bound.masked_fill(done, -1)
        top = int(open_bound.max())
        if top <= best_n:
            return best_w
        bins = (open_bound == top).nonzero().flatten()[:64]
        done[bins] = True
        ends: list[list[torch.Tensor]] = [[], [], [], []]  # lo bin, lo, hi bin, hi
        for iv in interval_chunks(ln, ac, rl):
            for k, x in ((0, iv.lo), (2, iv.hi)):
                idx = bin_index(x)
                keep = torch.isin(idx, bins)
                ends[k].append(idx[keep])
                ends[k + 1].append(x[keep])
        lo_bin, lo, hi_bin, hi = (torch.cat(e) for e in ends)
        width = (W_RANGE[1] - W_RANGE[0]) / W_BINS
        for b in bins.tolist():
            base = int(lo_before[b] - hi_before[b])
            w, n = max_coverage(lo[lo_bin == b], hi[hi_bin == b], base)
            if w is None:
                w = W_RANGE[0] + (b - 1) * width
            if n > best_n:
                best_w, best_n = w, n


@dataclass
class TensorFit:
    name: str
    numel: int
    lo: float = -math.inf
    hi: float = math.inf
    disagree: int = 0
    sdd: float = 0.0
    sde: float = 0.0
    see: float = 0.0
    agreed_at: float | None = None
    examined: int = 0

    @property
    def informative(self) -> bool:
        """Whether len and acc differ anywhere in this tensor."""
        return self.sdd > 0

    @property
    def w_ls(self) -> float | None:
        return self.sde / self.sdd if self.sdd > 0 else None

    @property
    def residual(self) -> float | None:
        """RMS of released - (acc + w_ls * (len - acc)) over all elements."""
        if self.w_ls is None:
            return math.sqrt(self.see / self.numel) if self.numel else None
        ss = self.see - self.sde * self.sde / self.sdd
        return math.sqrt(max(ss, 0.0) / self.numel)

    def as_dict(self) -> dict[str, Any]:
        finite = self.informative and self.lo <= self.hi
        return {
            "elements": self.numel,
            "elements_examined": self.examined,
            "informative": self.informative,
            "w_interval": [self.lo, self.hi] if finite else None,
            "w_agreed": self.agreed_at,
            "disagreeing_elements": self.disagree,
            "w_least_squares": self.w_ls,
            "ls_residual_rms": self.residual,
        }


def agreement_at(
    w: float, ln: torch.Tensor, ac: torch.Tensor, rl: torch.Tensor
) -> tuple[float, float, int]:
    """(max lo, min hi, count) over the element intervals that contain w."""
    lo, hi, n = -math.inf, math.inf, 0
    for iv in interval_chunks(ln, ac, rl):
        keep = (iv.lo <= w) & (iv.hi >= w)
        if keep.any():
            lo = max(lo, float(iv.lo[keep].max()))
            hi = min(hi, float(iv.hi[keep].min()))
            n += int(keep.sum())
    return lo, hi, n


def fit_chunk(
    fit: TensorFit, ln: torch.Tensor, ac: torch.Tensor, rl: torch.Tensor, ws: Workspace
) -> None:
    """Fold one chunk into `fit`."""
    iv, sums = chunk_intervals(ln, ac, rl, ws, zeros=False)
    lo, hi = float(iv.lo.max()), float(iv.hi.min())
    if math.isnan(lo) or math.isnan(hi):
        iv, sums = chunk_intervals(ln, ac, rl, ws)
        lo, hi = float(iv.lo.max()), float(iv.hi.min())
    fit.sdd, fit.sde, fit.see = (
        x + y for x, y in zip((fit.sdd, fit.sde, fit.see), sums, strict=True)
    )
    # NaN (a NaN weight) sends the tensor down the robust path, to fail there.
    fit.lo = math.inf if math.isnan(lo) else max(fit.lo, lo - W_SLACK)
    fit.hi = -math.inf if math.isnan(hi) else min(fit.hi, hi + W_SLACK)


def fit_slices(n: int, sample: bool) -> Iterator[slice]:
    """The chunks of a tensor of `n` elements that the fit examines: all of them, or
    with `sample` and more than FULL_FIT elements, the deterministic sample."""
    if sample and n > FULL_FIT:
        step, size = SAMPLE_BLOCK * SAMPLE_EVERY, SAMPLE_BLOCK
    else:
        step, size = CHUNK, CHUNK
    for i in range(0, n, step):
        yield slice(i, min(i + size, n))


def fit_tensor(
    name: str,
    rl: torch.Tensor,
    ln: torch.Tensor,
    ac: torch.Tensor,
    *,
    sample: bool = False,
) -> TensorFit:
    """The interval of w that explains every element examined (all, or with `sample`
    the sample of a large tensor), or over all elements the most-agreed w."""
    fit = TensorFit(name, rl.numel())
    fl, fa, fr = ln.reshape(-1), ac.reshape(-1), rl.reshape(-1)
    ws = Workspace(work_dtype(rl))
    for s in fit_slices(fr.numel(), sample):
        fit_chunk(fit, fl[s], fa[s], fr[s], ws)
        fit.examined += s.stop - s.start
    if fit.lo > fit.hi:
        w = most_agreed(ln, ac, rl)
        found = (math.inf, -math.inf, 0) if w is None else agreement_at(w, ln, ac, rl)
        fit.lo, fit.hi, n = found
        fit.disagree = fit.numel - n
        fit.agreed_at = w
        fit.examined = fit.numel
    elif fit.informative:
        fit.agreed_at = (fit.lo + fit.hi) / 2
    return fit


def recompute(
    rl: torch.Tensor,
    ln: torch.Tensor,
    ac: torch.Tensor,
    weights: tuple[float, float],
    normalize: bool,
    out_dtype: torch.dtype,
) -> Mismatch:
    """Compare one tensor with the merge at `weights` (the shared kernel), by chunks.

    The inputs go to the kernel as fp32 copies, as stream_merge gives them to it: the
    conversion is exact, and fp32 operands run its multiply-adds 10% faster.
    """
    found = Mismatch()
    fl, fa, fr = ln.reshape(-1), ac.reshape(-1), rl.reshape(-1)
    as_fp32 = ln.dtype in (torch.bfloat16, torch.float16) and ac.dtype == ln.dtype
    l32, a32 = (torch.empty(min(CHUNK, fr.numel())) for _ in range(2))
    for i in range(0, fr.numel(), CHUNK):
        s = slice(i, i + CHUNK)
        parts = [fl[s], fa[s]]
        if as_fp32:
            m = parts[0].numel()
            parts = [l32[:m].copy_(parts[0]), a32[:m].copy_(parts[1])]
        want = linear_merge(parts, weights, normalize=normalize, out_dtype=out_dtype)
        compare_chunk(fr[s], want, i, found)
    return found


# The checks. Each returns {"status": pass|fail|skip, "summary": words, ...details}.


def result(status: str, summary: str, **details: Any) -> dict[str, Any]:
    return {"status": status, "summary": summary, **details}


def is_weight_file(rel: str) -> bool:
    return (
        rel.endswith(".safetensors")
        or modelfiles.is_pickle(rel)
        or rel.endswith((".gguf", ".msgpack", ".h5", ".onnx"))
    )


def files_against(
    folder: Path, recorded: dict[str, dict], hashed: dict[str, str], skip: set[str]
) -> dict[str, list]:
    """Compare a folder with a recorded manifest; hash what the stream did not."""
    missing, changed = [], []
    for rel, entry in sorted(recorded.items()):
        path = folder / rel
        if not path.is_file():
            missing.append(rel)
            continue
        digest = hashed.get(rel) or sha256_file(path)
        size = path.stat().st_size
        if digest != entry.get("sha256") or size != entry.get("size"):
            changed.append(
                {
                    "file": rel,
                    "recorded": {
                        "sha256": entry.get("sha256"),
                        "size": entry.get("size"),
                    },
                    "found": {"sha256": digest, "size": size},
                }
            )
    present = {
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
    }
    unlisted = sorted(
        rel for rel in present - set(recorded) - skip if is_weight_file(rel)
    )
    return {"missing": missing, "changed": changed, "unlisted_weights": unlisted}


def check_files(where: str, found: dict[str, list]) -> tuple[bool, list[str]]:
    words = []
    for rel in found["missing"]:
        words.append(f"{where}: {rel} is recorded but missing")
    for c in found["changed"]:
        words.append(
            f"{where}: {c['file']} has sha256 {c['found']['sha256'][:12]}... "
            f"({c['found']['size']} bytes), recorded "
            f"{str(c['recorded']['sha256'])[:12]}... ({c['recorded']['size']} bytes)"
        )
    for rel in found["unlisted_weights"]:
        words.append(f"{where}: weight file {rel} is not listed in the provenance")
    return not words, words


def check_integrity(
    model_dir: Path, prov: dict | None, prov_error: str | None, hashed: dict[str, str]
) -> dict[str, Any]:
    if prov is None:
        if prov_error:
            return result("fail", prov_error)
        return result("skip", f"no {PROVENANCE} in {model_dir}: nothing recorded")
    found = files_against(model_dir, prov.get("files", {}), hashed, {PROVENANCE})
    ok, words = check_files(str(model_dir), found)
    n = len(prov.get("files", {}))
    if ok:
        return result("pass", f"all {n} recorded files match their sha256", **found)
    return result("fail", "; ".join(words), **found)


def check_constituent(
    name: str, rec: dict, folder: Path | None, hashed: dict[str, str]
) -> tuple[bool, list[str], dict[str, Any]]:
    """Does `folder` hold constituent `name` at its recorded revision and hashes?"""
    if folder is None:
        return (
            False,
            [
                f"constituent {name} ({rec.get('source')}) not found: pass "
                f"--{name} DIR or place it at its recorded source"
            ],
            {},
        )
    files = rec.get("files", {})
    found = files_against(folder, files, hashed, {PROVENANCE})
    ok, words = check_files(f"constituent {name} ({folder})", found)
    revision = rec.get("resolved_revision")
    if str(revision).startswith("local:") and revision != "local:" + manifest_id(files):
        ok = False
        words.append(
            f"constituent {name}: recorded revision {revision} is not the content id "
            "of its recorded files"
        )
    own = folder / PROVENANCE
    if own.is_file():
        try:
            theirs = json.loads(own.read_text())
        except json.JSONDecodeError as e:
            theirs = {}
            words.append(f"{own}: not JSON ({e})")
            ok = False
        if theirs and theirs.get("resolved_revision") != revision:
            ok = False
            words.append(
                f"constituent {name}: {own} says revision "
                f"{theirs.get('resolved_revision')}, the release recorded {revision}"
            )
    elif not str(revision).startswith("local:"):
        words.append(
            f"constituent {name}: {folder} has no {PROVENANCE}; revision {revision} "
            "is vouched for by the file hashes only"
        )
    return ok, words, {"folder": str(folder), "revision": revision, **found}


def check_lineage(
    prov: dict | None, folders: dict[str, Path | None], hashed: dict[str, dict]
) -> dict[str, Any]:
    if prov is None:
        return result("skip", "no provenance: no recorded constituents to check")
    recorded = prov.get("constituents") or {}
    if set(recorded) != {"len", "acc"}:
        return result(
            "fail",
            f"provenance constituents are {sorted(recorded)}, expected ['acc', 'len']",
        )
    ok, words, details = True, [], {}
    for name in ("len", "acc"):
        good, said, details[name] = check_constituent(
            name, recorded[name], folders[name], hashed.get(name, {})
        )
        ok &= good
        words += said
    if ok:
        note = "; ".join(words)
        summary = "len and acc match their recorded revisions and file hashes"
        return result("pass", summary + (f" ({note})" if note else ""), **details)
    return result("fail", "; ".join(words), **details)


def recorded_merge(prov: dict | None) -> tuple[tuple[float, float] | None, str | None]:
    """The recorded (w_len, w_acc), or why there are none usable."""
    if prov is None:
        return None, "no provenance: no recorded merge to recompute"
    weights = prov.get("weights") or {}
    try:
        pair = (float(weights["len"]), float(weights["acc"]))
    except (KeyError, TypeError, ValueError):
        return None, f"provenance weights {weights!r} lack numeric 'len' and 'acc'"
    if prov.get("method") != "linear":
        return None, f"provenance method {prov.get('method')!r} is not 'linear'"
    return pair, None


def torch_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or dtype not in FLOATS:
        raise AuditError(
            f"provenance dtype {name!r} is not one of float32, float16, bfloat16"
        )
    return dtype


# One pass over the tensors feeds the hashes, the recompute and the inference.


@dataclass
class Scan:
    problems: list[str] = field(default_factory=list)
    mismatches: dict[str, Mismatch] = field(default_factory=dict)
    fits: list[TensorFit] = field(default_factory=list)
    compared: int = 0
    unseen: list[str] = field(default_factory=list)


def source_tensor(c: WeightStream, name: str) -> torch.Tensor | None:
    """The constituent's tensor for a release tensor; a tied lm_head is the embeddings
    (as stages.merging pairs them), kept in memory since they are needed again."""
    if name == LM_HEAD and LM_HEAD not in c.names and EMBED in c.names:
        t = c.get(EMBED)
        if t is not None:
            c.hold(EMBED, t)
        return t
    return c.get(name)


def pair_problem(
    name: str, rl: torch.Tensor, got: dict[str, torch.Tensor | None]
) -> str | None:
    for who, t in got.items():
        if t is None:
            return f"tensor {name} is in the release but not in {who}"
        if t.shape != rl.shape:
            return (
                f"tensor {name}: release shape {list(rl.shape)}, "
                f"{who} shape {list(t.shape)}"
            )
    return None


def scan_tensors(
    release: WeightStream,
    constituents: dict[str, WeightStream],
    recorded: tuple[float, float] | None,
    normalize: bool,
    out_dtype: torch.dtype | None,
) -> Scan:
    scan = Scan()
    skipped: set[str] = set()
    bar = tqdm(total=release.size, unit="B", unit_scale=True, desc="audit", leave=False)
    for name, rl in release:
        bar.update(rl.nbytes)
        if len(constituents) < 2:
            continue
        got = {who: source_tensor(c, name) for who, c in constituents.items()}
        problem = pair_problem(name, rl, got)
        if problem:
            scan.problems.append(problem)
            continue
        if out_dtype is not None and recorded is not None and rl.dtype != out_dtype:
            scan.problems.append(
                f"tensor {name} is {rl.dtype}, the provenance records {out_dtype}"
            )
            recorded_here = None
        else:
            recorded_here = recorded
        pending = None
        if recorded_here is not None:
            dtype = out_dtype or got["len"].dtype
            args = (rl, got["len"], got["acc"], recorded_here, normalize, dtype)
            pending = RECOMPUTE.submit(recompute, *args)
        # While the recompute runs, a large tensor is fitted on a sample; one that it
        # does not match is fitted again in full, to find the elements that disagree.
        sample = pending is not None
        fit = (
            fit_tensor(name, rl, got["len"], got["acc"], sample=sample)
            if rl.dtype in FLOATS
            else None
        )
        mismatch = pending.result() if pending is not None else None
        if fit is not None and mismatch is not None and mismatch.count:
            if fit.examined < fit.numel:
                fit = fit_tensor(name, rl, got["len"], got["acc"])
        scan.compared += 1
        if fit is None:
            skipped.add(name)
        if mismatch is not None and mismatch.count:
            scan.mismatches[name] = mismatch
        if fit is not None:
            scan.fits.append(fit)
    bar.close()
    if len(constituents) == 2:
        done = {f.name for f in scan.fits} | set(scan.mismatches)
        expected = set(release.index) | release.names
        scan.unseen = sorted(expected - done - skipped)
    for who, c in constituents.items():
        extra = sorted(c.names - release.names - release.unavailable)
        if extra:
            scan.problems.append(
                f"{who} has {len(extra)} tensors the release lacks: "
                + ", ".join(extra[:MAX_LISTED])
            )
    for shard in release.missing:
        lost = sorted(t for t, s in release.index.items() if s == shard)
        scan.problems.append(
            f"release shard {shard} is missing: {len(lost)} tensors not compared"
            + (f" ({', '.join(lost[:MAX_LISTED])})" if lost else "")
        )
    return scan


def check_recompute(
    scan: Scan, recorded: tuple[float, float] | None, why: str | None, have: bool
) -> dict[str, Any]:
    if recorded is None:
        return result("skip", why or "no recorded merge")
    if not have:
        return result("skip", "constituents not available: nothing to recompute")
    mism = {
        name: {
            "elements": m.count,
            "max_abs_diff": m.max_abs_diff,
            "first_flat_index": m.first_index,
        }
        for name, m in scan.mismatches.items()
    }
    details = {
        "weights": {"len": recorded[0], "acc": recorded[1]},
        "tensors_compared": scan.compared,
        "mismatches": mism,
        "problems": scan.problems,
    }
    if not mism and not scan.problems:
        summary = f"all {scan.compared} tensors equal the recomputed merge bit for bit"
        return result("pass", summary, **details)
    words = [
        f"{name}: {plural(m['elements'], 'element')} differ, largest difference "
        f"{m['max_abs_diff']:.3g} (first at flat index {m['first_flat_index']})"
        for name, m in list(mism.items())[:MAX_LISTED]
    ]
    if len(mism) > MAX_LISTED:
        words.append(f"and {len(mism) - MAX_LISTED} more tensors")
    return result("fail", "; ".join(scan.problems + words), **details)


def describe_w(lo: float, hi: float) -> str:
    """`0.3000 ± 4e-05 (consistent: [0.29996, 0.30004])`, digits to the uncertainty."""
    half = (hi - lo) / 2
    digits = min(8, max(2, 1 - math.floor(math.log10(half)))) if half > 0 else 8
    mid = f"{(lo + hi) / 2:.{digits}f} ± {half:.1g}"
    return f"{mid} (consistent: [{lo:.{digits + 1}f}, {hi:.{digits + 1}f}])"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    t = torch.tensor(values, dtype=torch.float64)
    return {
        "median": float(t.median()),
        "min": float(t.min()),
        "max": float(t.max()),
    }


def check_inference(
    scan: Scan, have: bool, recorded: tuple[float, float] | None, normalize: bool
) -> dict[str, Any]:
    """Summarize the per-tensor fits into a verdict on one weight for all tensors."""
    if not have:
        return result("skip", "constituents not available: pass --len DIR --acc DIR")
    fits = [f for f in scan.fits if f.informative]
    bad_inside = [f for f in scan.fits if f.disagree]
    usable = [f for f in fits if f.lo <= f.hi]
    w, _ = max_coverage(
        torch.tensor([f.lo for f in usable], dtype=torch.float64),
        torch.tensor([f.hi for f in usable], dtype=torch.float64),
    )
    agreeing = [f for f in usable if w is not None and f.lo <= w <= f.hi]
    agreed = {f.name for f in agreeing}
    apart = [f for f in fits if f.name not in agreed and not f.disagree]
    lo = max((f.lo for f in agreeing), default=-math.inf)
    hi = min((f.hi for f in agreeing), default=math.inf)
    sdd = sum(f.sdd for f in scan.fits)
    sde = sum(f.sde for f in scan.fits)
    details = {
        "w": (lo + hi) / 2 if agreeing else None,
        "w_interval": [lo, hi] if agreeing else None,
        "uncertainty": (hi - lo) / 2 if agreeing else None,
        "tensors": len(scan.fits),
        "informative_tensors": len(fits),
        "elements": sum(f.numel for f in scan.fits),
        "elements_examined": sum(f.examined for f in scan.fits),
        "interval_midpoints": stats(
            [f.agreed_at for f in fits if f.agreed_at is not None]
        ),
        "least_squares": stats([f.w_ls for f in fits if f.w_ls is not None]),
        "least_squares_pooled": sde / sdd if sdd > 0 else None,
        "unexamined_tensors": scan.unseen,
        "disagreeing_tensors": {
            f.name: f.disagree or "interval excludes the consensus"
            for f in bad_inside + apart
        },
        "per_tensor": {f.name: f.as_dict() for f in scan.fits},
    }
    if bad_inside or apart or not scan.fits:
        names = [
            f"{f.name} ({plural(f.disagree, 'element')} no single w explains)"
            for f in bad_inside
        ] + [f"{f.name} (w in [{f.lo:.5f}, {f.hi:.5f}])" for f in apart]
        verdict = (
            f"not a linear merge of len and acc at one weight: {len(names)} of "
            f"{len(scan.fits)} tensors disagree: " + ", ".join(names[:MAX_LISTED])
        )
        if agreeing:
            verdict += f"; the most tensors agree on w={describe_w(lo, hi)}"
        return result("fail", verdict, verdict=verdict, **details)
    if not fits:
        verdict = "linear merge at any w: len and acc are identical"
        return result("pass", verdict, verdict=verdict, **details)
    verdict = f"linear merge at w={describe_w(lo, hi)}"
    if scan.unseen:
        verdict += (
            f" over the tensors read; {plural(len(scan.unseen), 'tensor')} could not "
            f"be examined ({', '.join(scan.unseen[:MAX_LISTED])})"
        )
        return result("fail", verdict, verdict=verdict, **details)
    if recorded is not None:
        w_rec = recorded[0] / (recorded[0] + recorded[1]) if normalize else recorded[0]
        details["w_recorded"] = w_rec
        if not lo <= w_rec <= hi:
            verdict += f"; the provenance records w={w_rec:g}, outside that interval"
            return result("fail", verdict, verdict=verdict, **details)
        verdict += f", as recorded (w={w_rec:g})"
    summary = verdict
    if details["elements_examined"] < details["elements"]:
        summary += (
            f"; intervals from a sample of {details['elements_examined']:,} of "
            f"{details['elements']:,} elements, every element equal to the recompute"
        )
    return result("pass", summary, verdict=verdict, **details)


# The audit as a library call, then the command line and the DVC stage.


def load_provenance(model_dir: Path) -> tuple[dict | None, str | None]:
    path = model_dir / PROVENANCE
    if not path.is_file():
        return None, None
    try:
        prov = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path}: not JSON ({e})"
    if not isinstance(prov, dict) or prov.get("format") != "mergesweep-release/1":
        got = prov.get("format") if isinstance(prov, dict) else type(prov).__name__
        return None, f"{path}: format {got!r}, expected 'mergesweep-release/1'"
    return prov, None


def locate(prov: dict | None, name: str, given: Path | None) -> Path | None:
    """A constituent's folder: as given, else its recorded local source if present."""
    if given is not None:
        return given
    source = ((prov or {}).get("constituents") or {}).get(name, {}).get("source")
    if source and not str(source).startswith("hf://") and Path(source).is_dir():
        return Path(source)
    return None


def audit(
    model_dir: Path, *, len_dir: Path | None = None, acc_dir: Path | None = None
) -> dict:
    """Audit a model folder; return the JSON report (see docs/audit.md)."""
    start = time.perf_counter()
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise AuditError(f"model folder {model_dir} does not exist")
    for flag, d in (("--len", len_dir), ("--acc", acc_dir)):
        if d is not None and not Path(d).is_dir():
            raise AuditError(f"{flag} {d} is not a folder")
    prov, prov_error = load_provenance(model_dir)
    normalize = bool((prov or {}).get("normalize", True))
    recorded, why = recorded_merge(prov)
    out_dtype = torch_dtype((prov or {}).get("dtype")) if recorded else None
    folders = {
        "len": locate(prov, "len", len_dir and Path(len_dir)),
        "acc": locate(prov, "acc", acc_dir and Path(acc_dir)),
    }
    release = WeightStream(model_dir)
    consts = {n: WeightStream(f) for n, f in folders.items() if f is not None}
    # Three threads work at once (fit, recompute, sha256): torch's threads are shared
    # out so as not to oversubscribe the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, ((os.cpu_count() or 2) - 1) // 2)))
    try:
        scan = scan_tensors(release, consts, recorded, normalize, out_dtype)
    finally:
        torch.set_num_threads(threads)
    hashed = {n: c.finish() for n, c in consts.items()}
    released = release.finish()
    scan.problems[:0] = release.problems + [
        f"{n}: {p}" for n, c in consts.items() for p in c.problems
    ]
    have = len(consts) == 2
    checks = {
        "integrity": check_integrity(model_dir, prov, prov_error, released),
        "lineage": check_lineage(prov, folders, hashed),
        "recompute": check_recompute(scan, recorded, why, have),
        "inference": check_inference(scan, have, recorded, normalize),
    }
    statuses = [c["status"] for c in checks.values()]
    read = release.bytes_read + sum(c.bytes_read for c in consts.values())
    size = release.size + sum(c.size for c in consts.values())
    report = {
        "format": "mergesweep-audit/1",
        "model_dir": str(model_dir),
        "len_dir": str(folders["len"]) if folders["len"] else None,
        "acc_dir": str(folders["acc"]) if folders["acc"] else None,
        "ok": "fail" not in statuses and "pass" in statuses,
        "checks": checks,
        "weight_bytes": size,
        "weight_bytes_read": read,
        "elapsed_s": round(time.perf_counter() - start, 3),
    }
    return json_safe(report)


def json_safe(obj: Any) -> Any:
    """Replace the infinities and NaNs that JSON cannot hold with None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def render(report: dict) -> str:
    """The report in words, one line per check."""
    lines = [f"audit of {report['model_dir']}"]
    for name, check in report["checks"].items():
        lines.append(f"  {name:<10} {check['status'].upper():<4}  {check['summary']}")
    if not report["ok"]:
        statuses = {c["status"] for c in report["checks"].values()}
        why = "a check failed" if "fail" in statuses else "nothing could be checked"
        lines.append(f"FAILED: {why}")
    else:
        lines.append("OK: every check that could run holds")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mergesweep audit",
        description="Prove that a model folder is the linear merge its provenance "
        "claims, or infer the weight that explains it from two constituents.",
    )
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    parser.add_argument("--len", dest="len_dir", type=Path, metavar="DIR")
    parser.add_argument("--acc", dest="acc_dir", type=Path, metavar="DIR")
    parser.add_argument("--json", dest="json_out", type=Path, metavar="FILE")
    args = parser.parse_args(argv)
    if (args.len_dir is None) != (args.acc_dir is None):
        parser.error("--len and --acc go together: give both or neither")
    if args.json_out is not None:
        inside = args.json_out.resolve().is_relative_to(args.model_dir.resolve())
        if inside:
            parser.error(
                f"--json {args.json_out} is inside MODEL_DIR: the audit "
                "never writes into the folder it audits"
            )
    return args


def run(argv: list[str] | None) -> tuple[int, dict | None]:
    """(exit code, report): 0 all holds, 1 something does not, 2 bad usage."""
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0), None
    try:
        report = audit(args.model_dir, len_dir=args.len_dir, acc_dir=args.acc_dir)
    except AuditError as e:
        say(f"mergesweep audit: error: {e}")
        return 2, None
    say(render(report))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json_out, report)
    return (0 if report["ok"] else 1), report


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def cli(argv: list[str] | None = None) -> int:
    """`mergesweep audit MODEL_DIR [--len DIR --acc DIR] [--json FILE]`."""
    return run(argv)[0]


def release_tags(report: dict) -> dict[str, str]:
    checks = report["checks"]
    tags = {f"audit.{name}": checks[name]["status"] for name in CHECKS}
    tags["audit.ok"] = str(report["ok"]).lower()
    inference = checks["inference"]
    if inference.get("w") is not None:
        tags["audit.inferred_w"] = f"{inference['w']:.6g}"
        tags["audit.inferred_w_uncertainty"] = f"{inference['uncertainty']:.2g}"
    if inference.get("verdict"):
        tags["audit.verdict"] = inference["verdict"][:4000]
    return tags


def tag_release(model_dir: Path, report: dict) -> None:
    """Put the verdict on the release's registered MLflow model version, if any."""
    try:
        from stages.tracking import tag_release_version, tracking_uri
    except ImportError as e:
        log.warning("not tagging the MLflow model version: %s", e)
        return
    store = tracking_uri()
    if store.startswith("sqlite:///") and not Path(store[len("sqlite:///") :]).exists():
        # Opening a missing store creates it: there is no release registered there.
        log.warning("not tagging %s: no MLflow store at %s", model_dir.name, store)
        return
    from mlflow.exceptions import MlflowException

    try:
        tag_release_version(model_dir.name, model_dir, release_tags(report))
    except MlflowException as e:
        log.warning("not tagging the MLflow model version of %s: %s", model_dir.name, e)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    code, report = run(argv)
    if report is not None:
        log.info(
            "audited %s: %.3g GB of weights, %.3g GB read, %.1f s, peak RSS %.2f GB",
            report["model_dir"],
            report["weight_bytes"] / 1e9,
            report["weight_bytes_read"] / 1e9,
            report["elapsed_s"],
            peak_rss_gb(),
        )
        tag_release(Path(report["model_dir"]), report)
    sys.exit(code)


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


if __name__ == "__main__":
    main()
