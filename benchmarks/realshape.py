"""Two random bf16 checkpoints with DeepSeek-R1-Distill-Qwen-1.5B's names and shapes.

`python -m benchmarks.realshape [ROOT]`, from the repository root, makes `ROOT/len` and
`ROOT/acc` (3.5 GB each) unless they exist; most elements differ by a few bf16 ulps.
"""

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from stages.checkpoint import ShardedWriter, TensorSpec, qwen2_shapes

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path(tempfile.gettempdir()) / "mergesweep-bench"
HIDDEN, LAYERS, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 1536, 28, 8960, 12, 2, 151936
CHUNK = 1 << 24
ULPS = 2

CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": HIDDEN,
    "initializer_range": 0.02,
    "intermediate_size": INTERMEDIATE,
    "max_position_embeddings": 131072,
    "max_window_layers": 21,
    "model_type": "qwen2",
    "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS,
    "num_key_value_heads": KV_HEADS,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.44.0",
    "use_cache": True,
    "use_mrope": False,
    "use_sliding_window": False,
    "vocab_size": VOCAB,
}
GENERATION = {"bos_token_id": 151646, "eos_token_id": 151643, "do_sample": True}


def tensor_specs(layers: int = LAYERS, vocab: int = VOCAB) -> list[TensorSpec]:
    """The Qwen2ForCausalLM tensors of the 1.5B model, untied lm_head, qkv biases."""
    shapes = qwen2_shapes(
        vocab=vocab,
        hidden=HIDDEN,
        intermediate=INTERMEDIATE,
        layers=layers,
        heads=HEADS,
        kv_heads=KV_HEADS,
    )
    return [TensorSpec(n, torch.bfloat16, s) for n, s in sorted(shapes.items())]


def _perturbed_pair(name: str, n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """`n` random base values and two copies of them, each off by up to ULPS ulps."""
    if name.endswith("norm.weight"):
        base = 1.0 + 0.05 * torch.randn(n, generator=gen)
    else:
        base = 0.02 * torch.randn(n, generator=gen)
    # Perturb the magnitude bits, so no value crosses zero or leaves the finite range.
    bits = base.to(torch.bfloat16).view(torch.int16)
    sign, mag = bits & -0x8000, bits & 0x7FFF
    pair = []
    for _ in range(2):
        delta = torch.randint(-ULPS, ULPS + 1, (n,), generator=gen, dtype=torch.int16)
        pair.append(((mag + delta).clamp_(0, 0x7F7F) | sign).view(torch.bfloat16))
    return pair


def _write_pair(dirs: tuple[Path, Path], specs: list[TensorSpec], seed: int) -> None:
    writers = [ShardedWriter(d, specs, 5 << 30) for d in dirs]
    gen = torch.Generator().manual_seed(seed)
    for spec in specs:
        left = spec.nbytes // spec.dtype.itemsize
        while left:
            n = min(CHUNK, left)
            for w, chunk in zip(
                writers, _perturbed_pair(spec.name, n, gen), strict=True
            ):
                w.write(chunk)
            left -= n
    for w in writers:
        w.close()


def make_checkpoints(
    root: Path = DEFAULT_ROOT,
    *,
    seed: int = 0,
    layers: int = LAYERS,
    vocab: int = VOCAB,
) -> tuple[Path, Path]:
    """Create `root/len` and `root/acc` (each with config.json) unless both exist."""
    dirs = (root / "len", root / "acc")
    if all((d / "config.json").exists() for d in dirs):
        return dirs
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".realshape-", dir=root))
    try:
        tmps = (tmp / "len", tmp / "acc")
        for d in tmps:
            d.mkdir()
        log.info("writing %s and %s (%d layers, vocab %d)", *dirs, layers, vocab)
        _write_pair(tmps, tensor_specs(layers, vocab), seed)
        config = CONFIG | {"num_hidden_layers": layers, "vocab_size": vocab}
        for d, final in zip(tmps, dirs, strict=True):
            (d / "generation_config.json").write_text(json.dumps(GENERATION, indent=2))
            (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            d.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dirs


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_checkpoints(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_ROOT)
