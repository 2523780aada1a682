"""Linear-merge arithmetic (mergekit 0.1.5 `linear`, bit for bit) and pre-merge checks."""

from collections.abc import Sequence

import torch


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
    out_dtype = out_dtype or tensors[0].dtype
    stacked = torch.stack([t.to(torch.float32) for t in tensors], dim=0)
    w = torch.tensor(list(weights), dtype=torch.float32)
    w = w.view(-1, *([1] * (stacked.dim() - 1)))
    res = (w * stacked).sum(dim=0)
    if normalize:
        res = res / w.sum(dim=0)
    return res.to(out_dtype)
