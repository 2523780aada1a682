"""Linear-merge arithmetic (mergekit 0.1.5 `linear`, bit for bit) and pre-merge checks.

`plan_merge` checks two checkpoints before anything is written; `stream_merge` merges
them chunk by chunk from memory-mapped inputs into a writer."""

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from stages.checkpoint import Checkpoint, dtype_name

log = logging.getLogger(__name__)

NAMES = ("len", "acc")
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CONFIG_KEYS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
CHUNK = 1 << 18


class MergeError(ValueError):
    """The constituents or the weight cannot give a release."""


def _linear_into(
    res: torch.Tensor,
    out: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    coefs: torch.Tensor,
    denom: torch.Tensor | None,
    scratch: torch.Tensor | None = None,
) -> None:
    # mergekit's exact op sequence: addcmul_ is a fused multiply-add on CPU (measured
    # here: torch 2.13, AVX2), so `(w * x).sum(0)` differs from it in the last bit.
    # Converting to fp32 first is exact and, measured, faster than a mixed addcmul_.
    res.zero_()
    for t, c in zip(tensors, coefs.unbind(0), strict=True):
        if scratch is not None and t.dtype != torch.float32:
            t = scratch.copy_(t)
        res.addcmul_(t, c)
    if denom is not None:
        res.div_(denom)
    out.copy_(res)


def _denominator(coefs: torch.Tensor, normalize: bool) -> torch.Tensor | None:
    """The weight sum, or None where dividing changes nothing (x / 1.0 is x)."""
    total = coefs.sum()
    return total if normalize and total.item() != 1.0 else None


def linear_merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = True,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge same-shaped tensors as mergekit's `linear` method does.

    Accumulates in fp32 in the order given (len first, acc second: fp32 addition is not
    associative), divides by the weight sum when normalizing, then casts to `out_dtype`
    (default: the first tensor's dtype).
    """
    first = tensors[0]
    coefs = torch.tensor(list(weights), dtype=torch.float32)
    res = torch.empty(first.shape, dtype=torch.float32, device=first.device)
    out = torch.empty(first.shape, dtype=out_dtype or first.dtype, device=first.device)
    tensors = [t.to(res.device) for t in tensors]
    _linear_into(
        res, out, tensors, coefs.to(res.device), _denominator(coefs, normalize)
    )
    return out


def check_weight(weight: float, *, allow_out_of_range: bool = False) -> float:
    """The share of `len`; outside [0, 1] (extrapolation) only when allowed."""
    if not math.isfinite(weight):
        raise MergeError(f"weight must be a finite number, got {weight}")
    if not 0.0 <= weight <= 1.0 and not allow_out_of_range:
        raise MergeError(
            f"weight must be in [0, 1], got {weight}; outside that range the merge "
            "extrapolates, pass --allow-out-of-range if that is meant"
        )
    return weight


@dataclass(frozen=True)
class TensorJob:
    """One output tensor and the tensor of each constituent it is merged from."""

    name: str
    sources: tuple[str, str]
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class MergePlan:
    """The checked tensors to merge, the output dtype and the tied constituents."""

    jobs: tuple[TensorJob, ...]
    dtype: torch.dtype
    tied: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(j.shape) * j.dtype.itemsize for j in self.jobs)


def _check_embeddings(ckpts: Sequence[Checkpoint]) -> None:
    for name in (EMBED, LM_HEAD):
        infos = [c.tensors.get(name) for c in ckpts]
        if None in infos or infos[0].shape[:1] == infos[1].shape[:1]:
            continue
        raise MergeError(
            f"{name}: len has {infos[0].shape[0]} embedding rows, acc has "
            f"{infos[1].shape[0]}; the vocabularies differ, and mergesweep does not "
            "cut or pad rows that may stand for different tokens"
        )


def _source_names(
    ckpts: Sequence[Checkpoint],
) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Output name -> (len name, acc name), mapping a tied lm_head to the embeddings."""
    names = [set(c.tensors) for c in ckpts]
    tied = [NAMES[i] for i, n in enumerate(names) if LM_HEAD not in n and EMBED in n]
    if len(tied) == 1:
        for n in names:
            n.add(LM_HEAD)
    missing = [sorted(names[1] - names[0]), sorted(names[0] - names[1])]
    for who, miss in zip(NAMES, missing, strict=True):
        if miss:
            other = "acc" if who == "len" else "len"
            raise MergeError(
                f"{who} lacks {len(miss)} tensor(s) that {other} has: "
                f"{', '.join(miss[:5])}{' ...' if len(miss) > 5 else ''}"
            )
    pairs = {}
    for n in sorted(names[0]):
        pairs[n] = tuple(
            EMBED if n == LM_HEAD and LM_HEAD not in c.tensors else n for c in ckpts
        )
    return pairs, tied


def _output_dtype(
    ckpts: Sequence[Checkpoint], dtype: torch.dtype | None
) -> torch.dtype:
    for who, c in zip(NAMES, ckpts, strict=True):
        for info in c.tensors.values():
            if info.dtype not in FLOAT_DTYPES:
                raise MergeError(
                    f"{who}: tensor {info.name} is {dtype_name(info.dtype)}; a linear "
                    "merge needs floating-point tensors"
                )
    if dtype is not None:
        return dtype
    found = {d for c in ckpts for d in c.dtypes()}
    if len(found) == 1:
        return found.pop()
    where = ", ".join(
        f"{who} has {'/'.join(sorted(dtype_name(d) for d in c.dtypes()))}"
        for who, c in zip(NAMES, ckpts, strict=True)
    )
    raise MergeError(
        f"the constituents are stored in more than one dtype ({where}); choose the "
        "output dtype with --dtype (merge.dtype in params.yaml)"
    )


def check_configs(configs: Sequence[dict]) -> None:
    """Same architecture and sizes in both config.json files, naming the key."""
    for key in CONFIG_KEYS:
        a, b = (c.get(key) for c in configs)
        if a != b:
            raise MergeError(
                f"config.json key {key} differs: len has {a!r}, acc has {b!r}"
            )


def plan_merge(
    ckpts: Sequence[Checkpoint], *, dtype: torch.dtype | None = None
) -> MergePlan:
    """Check `(len, acc)` against each other and list the tensors to merge."""
    _check_embeddings(ckpts)
    pairs, tied = _source_names(ckpts)
    out_dtype = _output_dtype(ckpts, dtype)
    jobs = []
    for name, (a, b) in pairs.items():
        sa, sb = ckpts[0].tensors[a].shape, ckpts[1].tensors[b].shape
        if sa != sb:
            raise MergeError(f"{name}: len has shape {list(sa)}, acc has {list(sb)}")
        jobs.append(TensorJob(name, (a, b), sa, out_dtype))
    check_configs([c.config() for c in ckpts])
    return MergePlan(tuple(jobs), out_dtype, tuple(tied))


INT_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
EXPONENT_BITS = {
    torch.bfloat16: 0x7F80,
    torch.float16: 0x7C00,
    torch.float32: 0x7F800000,
    torch.float64: 0x7FF0000000000000,
}


def _first_non_finite(out: torch.Tensor, bits: torch.Tensor) -> int | None:
    """Index of the first NaN/Inf in `out`: those have every exponent bit set.

    A masked max over the raw bits is exact and, measured, about 20x faster than
    `torch.isfinite(out).all()` on bf16.
    """
    mask = EXPONENT_BITS[out.dtype]
    torch.bitwise_and(out.view(bits.dtype), mask, out=bits)
    if int(bits.amax()) != mask:
        return None
    return int((bits == mask).nonzero()[0])


def stream_merge(
    plan: MergePlan,
    ckpts: Sequence[Checkpoint],
    weights: Sequence[float],
    write: Callable[[torch.Tensor], None],
    *,
    normalize: bool = True,
    progress: Callable[[int], None] | None = None,
    chunk: int = CHUNK,
) -> None:
    """Merge every tensor of `plan` in chunks of `chunk` elements, in plan order.

    `write` receives each output chunk (reused afterwards: copy or consume it at once).
    A non-finite result raises MergeError naming the tensor. Runs torch on one thread:
    the writer uses the other core, and on a shared machine OpenMP's spinning threads
    made these small ops 20-50x slower (measured on 2 busy cores).
    """
    coefs = torch.tensor(list(weights), dtype=torch.float32)
    denom = _denominator(coefs, normalize)
    res, scratch = torch.empty(chunk), torch.empty(chunk)
    out = torch.empty(chunk, dtype=plan.dtype)
    bits = torch.empty(chunk, dtype=INT_VIEWS[plan.dtype.itemsize])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for job in plan.jobs:
            srcs = [
                c.tensor(s).reshape(-1) for c, s in zip(ckpts, job.sources, strict=True)
            ]
            n = srcs[0].numel()
            for start in range(0, n, chunk):
                m = min(chunk, n - start)
                o = out[:m]
                parts = [s[start : start + m] for s in srcs]
                _linear_into(res[:m], o, parts, coefs, denom, scratch[:m])
                bad = _first_non_finite(o, bits[:m])
                if bad is not None:
                    raise MergeError(
                        f"{job.name}: the merge gives {o[bad].item()} at flat index "
                        f"{start + bad}; a release must be finite, refusing it"
                    )
                write(o)
                if progress:
                    progress(m * plan.dtype.itemsize)
    finally:
        torch.set_num_threads(threads)
