"""Tiny sweep fixtures: a byte-level tokenizer with an R1-style chat template and random
Qwen2 constituents whose end-of-sequence logit is pushed up (`len`) or down (`acc`).
"""

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# DeepSeek-R1's shape: BOS in the template, and a tokenizer that also adds BOS itself,
# so a harness that encodes the templated text with special tokens doubles it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<|User|>' + m['content'] }}"
    "{% else %}{{ '<|Assistant|>' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|Assistant|><think>\\n' }}{% endif %}"
)
PROBLEMS = [
    ("What is 2 + 3?", "5"),
    ("What is 7 - 4?", "3"),
    ("Half of 1?", "\\frac{1}{2}"),
    ("What is 6 * 7?", "42"),
    ("What is 10 / 4?", "2.5"),
    ("What is 9 + 9?", "18"),
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens, then the specials and the two think tags."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, PAD, "<|User|>", "<|Assistant|>"])
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>")])
    tok.post_processor = TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_constituent(
    out: Path,
    *,
    seed: int,
    eos_push: float,
    newline_push: float = 0.0,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a tiny random Qwen2 model folder (safetensors) with tokenizer files.

    Hidden dimension 0 is a constant carried unchanged through the residual stream, and
    the EOS row of lm_head reads it with weight `eos_push`: large positive ends every
    response at once, large negative never ends one (untied models only);
    `newline_push` does the same for the byte token of "\n".
    """
    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        model.model.embed_tokens.weight[:, 0] = 4.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0].zero_()
            layer.mlp.down_proj.weight[0].zero_()
        if not tie:
            model.lm_head.weight.normal_(0.0, 1.0)
            model.lm_head.weight[:, 0] = 0.0
            model.lm_head.weight[tokenizer.eos_token_id, 0] = eos_push
            newline = tokenizer.convert_tokens_to_ids("Ċ")
            model.lm_head.weight[newline, 0] = newline_push
    model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # R1's own generation_config samples; the sweep must override it from params.
        do_sample=True,
        temperature=0.6,
        top_p=0.95,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def write_eval(path: Path, problems: list[tuple[str, str]] = PROBLEMS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"question": q, "answer": a}) for q, a in problems]
    path.write_text("\n".join(lines) + "\n")
    return path


def params_dict(datasets: dict[str, str], **eval_overrides: object) -> dict:
    """A complete params.yaml mapping for a fixture sweep."""
    return {
        "constituents": {
            "len": {"source": "fixtures/len", "revision": None},
            "acc": {"source": "fixtures/acc", "revision": None},
        },
        "task": {"datasets": datasets, "limit": None, "system_prompt": None},
        "eval": {
            "max_gen_toks": 12,
            "until": [],
            "do_sample": False,
            "temperature": 0.0,
            "top_p": 1.0,
            "batch_size": 8,
            "seed": 1234,
        }
        | eval_overrides,
        "sweep": {"weights": [0.0, 1.0]},
        "merge": {"dtype": None, "normalize": True, "device": "cpu"},
        "release": {"weight": 0.3, "name": "fixture-release", "shard_size": "5GB"},
        "mlflow": {"experiment": "fixture"},
    }
