"""Safetensors checkpoints: zero-copy reads, sharded streaming writes, named errors."""

import hashlib
import json
import struct
from pathlib import Path

import _merge_fixtures as fx
import pytest
import torch
from safetensors import safe_open

from stages.checkpoint import (
    Checkpoint,
    CheckpointError,
    ShardedWriter,
    TensorSpec,
    dtype_from_name,
    plan_shards,
    read_header,
    save_checkpoint,
)


def test_reads_what_safetensors_wrote_single_and_sharded(tmp_path: Path) -> None:
    one = fx.write_tiny(tmp_path / "one", seed=1)
    three = fx.write_tiny(tmp_path / "three", seed=1, shards=3)
    a, b = Checkpoint(one), Checkpoint(three)
    assert set(a.tensors) == set(b.tensors) and len(a.tensors) == 27
    assert len({i.file for i in b.tensors.values()}) == 3
    with safe_open(str(one / "model.safetensors"), "pt") as f:
        for name in a.tensors:
            ref = f.get_tensor(name)
            assert torch.equal(a.tensor(name), ref) and torch.equal(b.tensor(name), ref)
    assert a.dtypes() == {torch.bfloat16}


def test_views_are_copy_on_write_never_writing_the_file(tmp_path: Path) -> None:
    root = fx.write_tiny(tmp_path / "m", seed=1)
    before = (root / "model.safetensors").read_bytes()
    ckpt = Checkpoint(root)
    t = ckpt.tensor("model.norm.weight")
    ref = t.clone()
    t.add_(1)
    assert torch.equal(t, ref + 1)
    assert (root / "model.safetensors").read_bytes() == before
    assert torch.equal(Checkpoint(root).tensor("model.norm.weight"), ref)


def test_writer_splits_shards_and_hashes_what_it_wrote(tmp_path: Path) -> None:
    tensors = fx.tiny_tensors(3)
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in sorted(tensors.items())]
    for background in (False, True):
        out = tmp_path / f"bg{background}"
        out.mkdir()
        writer = ShardedWriter(out, specs, 8_000, background=background)
        for spec in specs:
            flat = tensors[spec.name].reshape(-1)
            for half in (flat[: flat.numel() // 2], flat[flat.numel() // 2 :]):
                writer.write(half)
        writer.close()
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = sorted(out.glob("*.safetensors"))
        assert len(files) == len(writer.shards) > 3
        assert set(index["weight_map"].values()) == {f.name for f in files}
        assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
        for f in files:
            assert writer.sha256[f.name] == hashlib.sha256(f.read_bytes()).hexdigest()
        back = Checkpoint(out)
        for name, t in tensors.items():
            assert torch.equal(back.tensor(name), t)
    a = sorted((tmp_path / "bgFalse").iterdir())
    b = sorted((tmp_path / "bgTrue").iterdir())
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_a_tensor_larger_than_the_shard_size_gets_its_own_shard() -> None:
    specs = [
        TensorSpec(n, torch.float32, (s,)) for n, s in [("a", 10), ("b", 100), ("c", 5)]
    ]
    assert [[s.name for s in sh] for sh in plan_shards(specs, 60)] == [
        ["a"],
        ["b"],
        ["c"],
    ]
    assert [[s.name for s in sh] for sh in plan_shards(specs, 1000)] == [
        ["a", "b", "c"]
    ]


def test_writer_refuses_wrong_dtype_extra_and_missing_bytes(tmp_path: Path) -> None:
    specs = [
        TensorSpec("x", torch.bfloat16, (4,)),
        TensorSpec("y", torch.float32, (2,)),
    ]
    w = ShardedWriter(tmp_path, specs, 1 << 20)
    with pytest.raises(ValueError, match=r"x: got torch.float32, expected"):
        w.write(torch.zeros(4))
    with pytest.raises(ValueError, match="x: 16 bytes exceed the 8 left"):
        w.write(torch.zeros(8, dtype=torch.bfloat16))
    w.write(torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="y: 8 bytes were never written"):
        w.close()


def test_truncated_file_is_named(tmp_path: Path) -> None:
    root = fx.write_tiny(tmp_path / "m", seed=1)
    f = root / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor \S+ data_offsets \[\d+, \d+\] do not hold",
    ):
        Checkpoint(root)


def test_overlapping_and_bad_headers_are_named(tmp_path: Path) -> None:
    f = tmp_path / "x.safetensors"
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(12))
    with pytest.raises(CheckpointError, match="tensors a and b overlap"):
        read_header(f)
    f.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        read_header(f)
    header = {"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(1))
    with pytest.raises(
        CheckpointError, match="tensor a has unsupported dtype 'F8_E4M3'"
    ):
        read_header(f)


def test_index_naming_a_missing_shard_is_an_error(tmp_path: Path) -> None:
    root = fx.write_tiny(tmp_path / "m", seed=1, shards=2)
    (root / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names model-00002-of-00002.safetensors"):
        Checkpoint(root)
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        Checkpoint(tmp_path)


def test_save_checkpoint_round_trip_and_dtype_names(tmp_path: Path) -> None:
    tensors = {
        "b": torch.arange(6.0).view(2, 3),
        "a": torch.ones(3, dtype=torch.float16),
    }
    save_checkpoint(tensors, tmp_path)
    back = Checkpoint(tmp_path)
    assert torch.equal(back.tensor("b"), tensors["b"])
    assert back.tensor("a").dtype == torch.float16
    assert dtype_from_name("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'bf16'; allowed: float32"):
        dtype_from_name("bf16")
