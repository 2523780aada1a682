"""Tiny audit fixtures: Qwen2-shaped bf16 constituents that differ as RL fine-tunes do,
and release folders laid out as docs/design.md specifies (plus ways to damage them).
"""

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stages.checkpoint import qwen2_shapes, read_header, save_checkpoint
from stages.fetch import constituent_record, local_revision
from stages.hashing import manifest, write_json
from stages.merging import linear_merge

HIDDEN, LAYERS, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 128, 2, 256, 4, 2, 1024
CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hidden_act": "silu",
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "max_position_embeddings": 512,
    "model_type": "qwen2",
    "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS,
    "num_key_value_heads": KV_HEADS,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": VOCAB,
}


def shapes() -> dict[str, tuple[int, ...]]:
    return qwen2_shapes(
        vocab=VOCAB,
        hidden=HIDDEN,
        intermediate=INTERMEDIATE,
        layers=LAYERS,
        heads=HEADS,
        kv_heads=KV_HEADS,
    )


def rl_pair(*, drift: float, seed: int) -> tuple[dict, dict]:
    """Two fine-tunes of one random base, each moved by N(0, drift) per element.

    With drift 1.5e-5 (lr 5e-7 over ~1000 Adam steps) most elements of 0.02-scale
    weights end up equal or one bf16 ulp apart; only those near zero differ by many.
    """
    gen = torch.Generator().manual_seed(seed)
    out: tuple[dict, dict] = ({}, {})
    for name, shape in shapes().items():
        scale, mean = (0.05, 1.0) if name.endswith("norm.weight") else (0.02, 0.0)
        base = mean + scale * torch.randn(shape, generator=gen)
        for d in out:
            moved = base + drift * torch.randn(shape, generator=gen)
            d[name] = moved.to(torch.bfloat16)
    return out


def write_constituent(
    folder: Path, tensors: dict, name: str, *, tied: bool = False
) -> Path:
    """A hub-like model folder (one model.safetensors) with its provenance.json."""
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = CONFIG | {"tie_word_embeddings": tied}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text('{"eos_token_id": 1}\n')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 512}\n')
    files = manifest(folder)
    record = constituent_record(name, str(folder), None, local_revision(files), files)
    write_json(folder / "provenance.json", record)
    return folder


def make_constituents(
    root: Path, *, drift: float = 1.5e-5, seed: int = 0, tie_acc: bool = False
) -> tuple[Path, Path]:
    """`len` and `acc` folders; `tie_acc` drops acc's lm_head, as the real base ties."""
    tl, ta = rl_pair(drift=drift, seed=seed)
    if tie_acc:
        del ta["lm_head.weight"]
    acc = write_constituent(root / "acc", ta, "acc", tied=tie_acc)
    return write_constituent(root / "len", tl, "len"), acc


def write_release(
    len_dir: Path,
    acc_dir: Path,
    out: Path,
    *,
    weight: float = 0.3,
    recorded: float | None = None,
    shards: int = 2,
) -> Path:
    """The release folder of docs/design.md, merged at `weight`, claiming `recorded`."""
    tl = load_file(str(len_dir / "model.safetensors"))
    ta = load_file(str(acc_dir / "model.safetensors"))
    merged = {n: linear_merge([tl[n], ta[n]], [weight, 1 - weight]) for n in tl}
    total = sum(t.nbytes for t in merged.values())
    save_checkpoint(merged, out, shard_size=total // shards + 1)
    config = json.loads((acc_dir / "config.json").read_text()) | {"dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in ("generation_config.json", "tokenizer_config.json"):
        shutil.copyfile(acc_dir / f, out / f)
    w = weight if recorded is None else recorded
    (out / "mergekit_config.yml").write_text(
        f"merge_method: linear\nbase_model: {acc_dir}\ndtype: bfloat16\nmodels:\n"
        f"  - model: {len_dir}\n    parameters: {{weight: {w}}}\n"
        f"  - model: {acc_dir}\n    parameters: {{weight: {1 - w}}}\n"
    )
    (out / "README.md").write_text("---\nlibrary_name: transformers\n---\n# merge\n")
    provenance = {
        "format": "mergesweep-release/1",
        "method": "linear",
        "normalize": True,
        "weights": {"len": w, "acc": 1 - w},
        "dtype": "bfloat16",
        "donor": "acc",
        "constituents": {
            n: json.loads((d / "provenance.json").read_text())
            for n, d in (("len", len_dir), ("acc", acc_dir))
        },
        "git_commit": None,
        "packages": {"torch": torch.__version__},
        "files": manifest(out),
    }
    write_json(out / "provenance.json", provenance)
    return out


def rehash(model_dir: Path) -> None:
    """Make provenance.json vouch for the folder as it is now (a forger's step)."""
    path = model_dir / "provenance.json"
    prov = json.loads(path.read_text())
    prov["files"] = manifest(model_dir, exclude=("provenance.json",))
    write_json(path, prov)


def flip_bit(model_dir: Path, tensor: str, index: int, bit: int) -> Path:
    """Flip one bit of element `index` (flat) of `tensor`, in place, in its shard."""
    for shard in sorted(model_dir.glob("*.safetensors")):
        info = read_header(shard).get(tensor)
        if info is None:
            continue
        pos = info.offset + index * info.dtype.itemsize + bit // 8
        with open(shard, "r+b") as f:
            f.seek(pos)
            byte = f.read(1)[0]
            f.seek(pos)
            f.write(bytes([byte ^ (1 << (bit % 8))]))
        return shard
    raise KeyError(tensor)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
