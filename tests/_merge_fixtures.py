"""Tiny random Qwen2 checkpoints and a mergekit-yaml runner for the merge tests."""

import json
import shutil
import subprocess
from pathlib import Path

import torch
from safetensors.torch import save_file

from stages.checkpoint import Checkpoint, qwen2_shapes

HIDDEN, LAYERS, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 32, 2, 48, 4, 2, 96


def tiny_config(vocab: int = VOCAB, *, tied: bool = False, dtype: str = "bfloat16"):
    """A Qwen2 config.json as the hub has them, key order and sliding_window kept."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": [2, 3],
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 512,
        "max_window_layers": 21,
        "model_type": "qwen2",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000,
        "sliding_window": 4096,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }


def tiny_tensors(
    seed: int, *, vocab: int = VOCAB, tied: bool = False, dtype=torch.bfloat16
) -> dict[str, torch.Tensor]:
    """A shared base (seed 0) plus a per-seed perturbation, like two fine-tunes."""
    shapes = qwen2_shapes(
        vocab=vocab,
        hidden=HIDDEN,
        intermediate=INTERMEDIATE,
        layers=LAYERS,
        heads=HEADS,
        kv_heads=KV_HEADS,
        tied=tied,
    )
    base_gen = torch.Generator().manual_seed(0)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(shapes.items()):
        base = torch.randn(shape, generator=base_gen) * 0.05
        out[name] = (base + torch.randn(shape, generator=gen) * 1e-3).to(dtype)
    return out


def write_tiny(
    root: Path,
    *,
    seed: int,
    vocab: int = VOCAB,
    tied: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 1,
) -> Path:
    """A constituent folder written by safetensors itself (not by stages.checkpoint)."""
    root.mkdir(parents=True, exist_ok=True)
    tensors = tiny_tensors(seed, vocab=vocab, tied=tied, dtype=dtype)
    names = sorted(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = (
            f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            if shards > 1
            else ("model.safetensors")
        )
        part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
        save_file(part, str(root / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    if shards > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (root / "model.safetensors.index.json").write_text(json.dumps(index))
    dname = str(dtype).removeprefix("torch.")
    config = tiny_config(vocab, tied=tied, dtype=dname)
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": 1, "eos_token_id": [2, 3], "do_sample": True}
    (root / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (root / "tokenizer_config.json").write_text('{"model_max_length": 512}\n')
    return root


def run_mergekit(config: Path, out: Path) -> Path:
    """Run `mergekit-yaml` on CPU, offline, without copying a tokenizer."""
    shutil.rmtree(out, ignore_errors=True)
    exe = Path(__import__("sys").executable).with_name("mergekit-yaml")
    cmd = [str(exe), str(config), str(out), "--no-copy-tokenizer", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode:
        raise RuntimeError(f"mergekit-yaml failed:\n{res.stderr[-3000:]}")
    return out


def differing_tensors(a: Path, b: Path) -> list[str]:
    """Names whose bytes or dtype differ between two checkpoints, plus missing ones."""
    ca, cb = Checkpoint(a), Checkpoint(b)
    bad = sorted(set(ca.tensors) ^ set(cb.tensors))
    for name in sorted(set(ca.tensors) & set(cb.tensors)):
        x, y = ca.tensor(name), cb.tensor(name)
        same = x.dtype == y.dtype and x.shape == y.shape
        if not same or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            bad.append(name)
    return bad
