"""The linear kernel and the pre-merge checks; each refusal names tensor, key, value."""

import json
from pathlib import Path

import _merge_fixtures as fx
import pytest
import torch

from stages.checkpoint import Checkpoint
from stages.merging import (
    EMBED,
    LM_HEAD,
    MergeError,
    check_weight,
    linear_merge,
    plan_merge,
    stream_merge,
)


def _pair(tmp_path: Path, **acc_kwargs: object) -> list[Checkpoint]:
    a = fx.write_tiny(tmp_path / "len", seed=1)
    b = fx.write_tiny(tmp_path / "acc", seed=2, **acc_kwargs)
    return [Checkpoint(a), Checkpoint(b)]


def _mergekit_kernel(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    # mergekit 0.1.5's linear merge on one tensor, through its own batch kernel
    from mergekit.merge_methods.base import TensorBatch
    from mergekit.merge_methods.linear import linear_merge as mk

    batch = TensorBatch(tuple(t.unsqueeze(0).float() for t in tensors), base_index=None)
    w = torch.tensor([weights], dtype=torch.float32)
    return mk.implementation(batch, weight=w, normalize=True)[0]


def test_kernel_is_mergekits_fused_arithmetic_not_a_plain_sum() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(100_003, generator=gen) for _ in range(2))
    ours = linear_merge([a, b], [0.3, 0.7])
    plain = (torch.tensor([0.3, 0.7]).view(2, 1) * torch.stack([a, b])).sum(0)
    assert (ours != plain).sum() > 1000  # fp32 out: the fused rounding shows
    ref = _mergekit_kernel([a, b], [0.3, 0.7])
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))


def test_weights_zero_and_one_give_a_constituent_back_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = ((torch.randn(4096, generator=gen) * 0.05).bfloat16() for _ in range(2))
    for w, want in ((1.0, a), (0.0, b)):
        got = linear_merge([a, b], [w, 1 - w])
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_negative_zero_becomes_positive_zero_as_in_mergekit() -> None:
    a = torch.tensor([-0.0, 1.0], dtype=torch.bfloat16)
    got = linear_merge([a, torch.ones(2, dtype=torch.bfloat16)], [1.0, 0.0])
    assert got.view(torch.int16).tolist() == [0, a.view(torch.int16)[1].item()]


def test_out_dtype_and_no_normalize() -> None:
    a = torch.full((3,), 2.0, dtype=torch.bfloat16)
    b = torch.full((3,), 4.0, dtype=torch.bfloat16)
    assert linear_merge([a, b], [1.0, 1.0], normalize=False).tolist() == [6.0] * 3
    got = linear_merge([a, b], [1.0, 1.0], out_dtype=torch.float32)
    assert got.dtype == torch.float32 and got.tolist() == [3.0] * 3


def test_weight_range() -> None:
    assert check_weight(0.3) == 0.3
    with pytest.raises(MergeError, match=r"weight must be in \[0, 1\], got 1.2"):
        check_weight(1.2)
    assert check_weight(1.2, allow_out_of_range=True) == 1.2
    with pytest.raises(MergeError, match="finite number, got nan"):
        check_weight(float("nan"), allow_out_of_range=True)


def test_stream_merge_equals_the_in_memory_kernel_across_chunks(tmp_path: Path) -> None:
    ckpts = _pair(tmp_path)
    plan = plan_merge(ckpts)
    chunks: list[torch.Tensor] = []
    stream_merge(plan, ckpts, [0.3, 0.7], lambda o: chunks.append(o.clone()), chunk=100)
    flat = torch.cat(chunks)
    pos = 0
    for job in plan.jobs:
        want = linear_merge([c.tensor(job.name) for c in ckpts], [0.3, 0.7])
        n = want.numel()
        assert torch.equal(
            flat[pos : pos + n].view(torch.int16), want.view(-1).view(torch.int16)
        )
        pos += n
    assert pos == flat.numel() == plan.nbytes // 2


def test_missing_and_extra_tensors_are_listed(tmp_path: Path) -> None:
    ckpts = _pair(tmp_path)
    del ckpts[1].tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(
        MergeError, match="acc lacks 1 tensor.*model.layers.1.mlp.up_proj"
    ):
        plan_merge(ckpts)


def test_shape_mismatch_names_both_shapes(tmp_path: Path) -> None:
    ckpts = _pair(tmp_path)
    info = ckpts[1].tensors["model.norm.weight"]
    ckpts[1].tensors["model.norm.weight"] = type(info)(
        info.name, info.dtype, (16,), info.file, info.offset
    )
    with pytest.raises(
        MergeError, match=r"model.norm.weight: len has shape \[32\], acc has \[16\]"
    ):
        plan_merge(ckpts)


def test_embedding_rows_that_differ_are_refused(tmp_path: Path) -> None:
    ckpts = _pair(tmp_path, vocab=100)
    with pytest.raises(
        MergeError, match=f"{EMBED}: len has 96 embedding rows, acc has 100"
    ):
        plan_merge(ckpts)


def test_config_sizes_must_agree(tmp_path: Path) -> None:
    ckpts = _pair(tmp_path)
    cfg = ckpts[1].root / "config.json"
    cfg.write_text(json.dumps(json.loads(cfg.read_text()) | {"num_key_value_heads": 4}))
    with pytest.raises(
        MergeError, match="num_key_value_heads differs: len has 2, acc has 4"
    ):
        plan_merge(ckpts)


def test_one_tied_constituent_merges_its_embeddings_into_lm_head(
    tmp_path: Path,
) -> None:
    ckpts = _pair(tmp_path, tied=True)
    plan = plan_merge(ckpts)
    assert plan.tied == ("acc",)
    head = next(j for j in plan.jobs if j.name == LM_HEAD)
    assert head.sources == (LM_HEAD, EMBED)
    both = plan_merge([ckpts[1], ckpts[1]])
    assert LM_HEAD not in {j.name for j in both.jobs} and both.tied == ("len", "acc")


def test_mixed_dtypes_need_an_explicit_output_dtype(tmp_path: Path) -> None:
    ckpts = _pair(tmp_path, dtype=torch.float32)
    with pytest.raises(MergeError, match="len has bfloat16, acc has float32.*--dtype"):
        plan_merge(ckpts)
    plan = plan_merge(ckpts, dtype=torch.bfloat16)
    assert {j.dtype for j in plan.jobs} == {torch.bfloat16}


def test_non_finite_result_names_the_tensor(tmp_path: Path) -> None:
    ckpts = _pair(tmp_path, dtype=torch.float32)
    plan = plan_merge(ckpts, dtype=torch.float16)
    with pytest.raises(
        MergeError, match=r"model.norm.weight: the merge gives inf at flat index 5"
    ):
        big = ckpts[1].tensor("model.norm.weight")
        big[5] = 1e6  # copy-on-write map: the file keeps its value
        stream_merge(plan, ckpts, [0.0, 1.0], lambda o: None)
