"""Build the embedded default: tokenizer, tiny Qwen2 base, `len` and `acc` children.

`python -m stages.embedded --out data/embedded --seed 0` writes len/, acc/, eval.jsonl
and build.json (file manifest, training-set digest, measured numbers). CPU, minutes.
"""

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    trainers,
)
from tokenizers import models as tok_models
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from stages import hashing, problems
from stages.merging import linear_merge

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|begin_of_sentence|>", "<|end_of_sentence|>", "<|pad|>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
THINK, END_THINK = "<think>", "</think>"
# Qwen2's own split (transformers' Qwen2Tokenizer): digits one by one, so numbers are
# spelled digit by digit, which the tiny model needs for arithmetic.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<|User|>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|Assistant|>' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('role must be system, user or assistant, got '"
    " + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|Assistant|><think>\\n' }}{% endif %}"
)
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass(frozen=True)
class BuildConfig:
    """Every setting of one build; recorded in build.json."""

    seed: int = 0
    max_steps: int = 6
    n_eval: int = 320
    vocab_size: int = 320
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    batch_size: int = 32
    base_steps: int = 3000
    base_lr: float = 3e-3
    # The concise style is learned fast, so the base sees it less often.
    base_len_share: float = 0.3
    child_steps: int = 150
    child_lr: float = 1e-3
    # Share of the other style mixed into each child's fine-tune.
    child_other_share: float = 0.0
    max_new_tokens: int = 128
    sweep_weights: tuple[float, ...] = tuple(i / 10 for i in range(11))
    # One thread: the same result on any machine with a core, and unharmed by
    # other jobs competing for the cores.
    threads: int = 1

    @classmethod
    def from_record(cls, config: dict) -> "BuildConfig":
        """The config as build.json records it (lists back to tuples)."""
        return cls(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        )


# --- tokenizer ----------------------------------------------------------------


def training_corpus(seed: int, n: int, max_steps: int) -> list[str]:
    """Templated training-style texts the BPE merges are learned from."""
    out = []
    for p in problems.generate(seed, n, max_steps, split="train"):
        out.append(render_prompt(p.question) + problems.acc_response(p) + EOS)
        out.append(render_prompt(p.question) + problems.len_response(p) + EOS)
    return out


def render_prompt(question: str) -> str:
    """The chat template's generation prompt for one question (mirrors the jinja)."""
    return f"{BOS}{USER}{question}{ASSISTANT}{THINK}\n"


def build_tokenizer(corpus: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE and wrap it with the chat template and special tokens."""
    tok = Tokenizer(tok_models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, PAD, USER, ASSISTANT]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # Ordinary (non-special) added tokens: skip_special_tokens keeps them.
    tok.add_tokens(
        [AddedToken(THINK, special=False), AddedToken(END_THINK, special=False)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- model and training -------------------------------------------------------


def model_config(cfg: BuildConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


Example = tuple[list[int], int]  # token ids, length of the prompt part


def make_examples(
    tokenizer: PreTrainedTokenizerBase,
    train: Sequence[problems.Problem],
    own: str,
    other_share: float,
    rng: random.Random,
) -> dict[tuple[int, str], list[Example]]:
    """Tokenize training examples, grouped by (steps, style) so batches need no padding.

    Each example takes the other style with probability `other_share`, drawn from
    `rng` so that style never correlates with the step count.
    """
    responders = {"acc": problems.acc_response, "len": problems.len_response}
    other = {"acc": "len", "len": "acc"}[own]
    groups: dict[tuple[int, str], list[Example]] = {}
    for p in train:
        style = other if rng.random() < other_share else own
        prompt = encode(tokenizer, render_prompt(p.question))
        response = encode(tokenizer, responders[style](p))
        ids = prompt + response + [tokenizer.eos_token_id]
        groups.setdefault((p.steps, style), []).append((ids, len(prompt)))
    return groups


def batches(
    groups: dict[tuple[int, str], list[Example]], batch_size: int, rng: random.Random
) -> list[list[Example]]:
    out = []
    for examples in groups.values():
        examples = list(examples)
        rng.shuffle(examples)
        out += [
            examples[i : i + batch_size] for i in range(0, len(examples), batch_size)
        ]
    rng.shuffle(out)
    return out


def collate(batch: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch; labels cover only the response (and its eos)."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    for row, (ids, n_prompt) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, labels


def train(
    model: Qwen2ForCausalLM,
    plan: Sequence[Sequence[Example]],
    lr: float,
    pad_id: int,
    desc: str,
) -> float:
    """AdamW, linear warmup then cosine decay over the plan; returns the final loss."""
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98)
    )
    warmup = max(1, len(plan) // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (
            1 + math.cos(math.pi * (step - warmup) / max(1, len(plan) - warmup))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    loss_ema = float("nan")
    for batch in tqdm(plan, desc=desc, leave=False):
        input_ids, labels = collate(batch, pad_id)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_ema = (
            loss.item()
            if math.isnan(loss_ema)
            else 0.95 * loss_ema + 0.05 * loss.item()
        )
    model.eval()
    log.info("%s: %d steps, final loss (ema) %.4f", desc, len(plan), loss_ema)
    return loss_ema


PHASES = ("base", "len", "acc")
CHILDREN = ("len", "acc")


def training_problems(cfg: BuildConfig, phase: str) -> list[problems.Problem]:
    """The training problems of one phase: enough for its steps in full batches."""
    n_batches = cfg.base_steps if phase == "base" else cfg.child_steps
    # Each (steps, style) group may leave one partial batch, which is dropped.
    n = (n_batches + 2 * cfg.max_steps) * cfg.batch_size
    seed = cfg.seed + PHASES.index(phase)
    return list(problems.generate(seed, n, cfg.max_steps, split="train"))


def training_questions_digest(cfg: BuildConfig) -> dict[str, int | str]:
    """Count and sha256 of the sorted distinct questions trained on, over all phases."""
    qs = sorted({p.question for phase in PHASES for p in training_problems(cfg, phase)})
    return {
        "count": len(qs),
        "sha256": hashlib.sha256("\n".join(qs).encode()).hexdigest(),
    }


def training_plan(
    tokenizer: PreTrainedTokenizerBase, cfg: BuildConfig, phase: str
) -> list[list[Example]]:
    """The phase's batches, each of one (steps, style) group, in a seeded order.

    The base sees both styles (`base_len_share` of them concise); a child its own
    style, with `child_other_share` of the other one mixed in.
    """
    rng = random.Random(f"{phase}:{cfg.seed}")
    if phase == "base":
        own, share = "acc", cfg.base_len_share
    else:
        own, share = phase, cfg.child_other_share
    groups = make_examples(tokenizer, training_problems(cfg, phase), own, share, rng)
    plan = batches(groups, cfg.batch_size, rng)
    n_batches = cfg.base_steps if phase == "base" else cfg.child_steps
    return [b for b in plan if len(b) == cfg.batch_size][:n_batches]


# --- evaluation ---------------------------------------------------------------


@dataclass(frozen=True)
class Scores:
    accuracy: float
    mean_tokens: float
    format_rate: float
    truncation_rate: float
    accuracy_by_steps: dict[int, float]


def grade(response: str, gold: str) -> tuple[bool, bool]:
    """(formatted, correct): exactly one `</think>` and a `\\boxed{}` after it."""
    if response.count(END_THINK) != 1:
        return False, False
    found = BOXED.findall(response.split(END_THINK, 1)[1])
    if not found:
        return False, False
    return True, found[-1].strip() == gold


@torch.no_grad()
def generate_greedy(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 160,
) -> list[tuple[str, int, bool]]:
    """Greedy responses as (text, tokens, truncated); tokens counts ids before eos."""
    out = []
    for i in range(0, len(questions), batch_size):
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for q in questions[i : i + batch_size]
        ]
        enc = tokenizer(
            prompts, add_special_tokens=False, padding=True, return_tensors="pt"
        )
        gen = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in gen[:, enc["input_ids"].shape[1] :].tolist():
            n = (
                row.index(tokenizer.eos_token_id)
                if tokenizer.eos_token_id in row
                else None
            )
            ids = row[:n] if n is not None else row
            out.append(
                (tokenizer.decode(ids, skip_special_tokens=True), len(ids), n is None)
            )
    return out


def evaluate(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    eval_set: Sequence[problems.Problem],
    max_new_tokens: int,
) -> Scores:
    responses = generate_greedy(
        model, tokenizer, [p.question for p in eval_set], max_new_tokens
    )
    formatted, correct, by_steps = [], [], {}
    for p, (text, _, _) in zip(eval_set, responses, strict=True):
        f, c = grade(text, str(p.answer))
        formatted.append(f)
        correct.append(c)
        by_steps.setdefault(p.steps, []).append(c)
    n = len(eval_set)
    return Scores(
        accuracy=sum(correct) / n,
        mean_tokens=sum(t for _, t, _ in responses) / n,
        format_rate=sum(formatted) / n,
        truncation_rate=sum(tr for _, _, tr in responses) / n,
        accuracy_by_steps={k: sum(v) / len(v) for k, v in sorted(by_steps.items())},
    )


def merged_model(
    len_model: Qwen2ForCausalLM, acc_model: Qwen2ForCausalLM, weight: float
) -> Qwen2ForCausalLM:
    """The linear merge at `weight` (share of len), built with the shared kernel."""
    merged = Qwen2ForCausalLM(len_model.config).to(torch.bfloat16)
    acc_state = acc_model.state_dict()
    state = {
        name: linear_merge([t, acc_state[name]], [weight, 1 - weight])
        for name, t in len_model.state_dict().items()
    }
    merged.load_state_dict(state)
    return merged.eval()


# --- files --------------------------------------------------------------------


def save_child(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, folder: Path
) -> Qwen2ForCausalLM:
    """Save in bf16 with tokenizer and generation config; returns the reloaded model."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()


def write_eval_set(eval_set: Sequence[problems.Problem], path: Path) -> None:
    with path.open("w") as f:
        for p in eval_set:
            row = {"question": p.question, "answer": str(p.answer), "steps": p.steps}
            f.write(json.dumps(row) + "\n")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished build into place, removing the previous one only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.chmod(0o755)  # mkdtemp makes it private
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def markdown_tables(record: dict) -> str:
    """The measured numbers of a build record as markdown tables."""
    rows = [
        "| model | accuracy | mean response tokens | format rate | truncated |",
        "|---|---|---|---|---|",
    ]
    for name, s in record["children"].items():
        rows.append(
            f"| {name} | {s['accuracy']:.3f} | {s['mean_tokens']:.1f} "
            f"| {s['format_rate']:.3f} | {s['truncation_rate']:.3f} |"
        )
    rows += [
        "",
        "| w (share of len) | accuracy | mean response tokens | format rate |",
        "|---|---|---|---|",
    ]
    for w, s in record["sweep"].items():
        rows.append(
            f"| {w} | {s['accuracy']:.3f} | {s['mean_tokens']:.1f} "
            f"| {s['format_rate']:.3f} |"
        )
    return "\n".join(rows) + "\n"


# --- main ---------------------------------------------------------------------


def build(cfg: BuildConfig, out_dir: Path) -> dict:
    """Train everything into an empty out_dir and return the build record."""
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(cfg.threads)

    eval_set = list(
        problems.generate(cfg.seed, cfg.n_eval, cfg.max_steps, split="eval")
    )
    tokenizer = build_tokenizer(
        training_corpus(cfg.seed, 2000, cfg.max_steps), cfg.vocab_size
    )
    model = Qwen2ForCausalLM(model_config(cfg, tokenizer))
    pad = tokenizer.pad_token_id
    log.info("model: %d parameters", sum(p.numel() for p in model.parameters()))

    train(model, training_plan(tokenizer, cfg, "base"), cfg.base_lr, pad, "base")
    base_state = copy.deepcopy(model.state_dict())
    base_bf16 = copy.deepcopy(model).to(torch.bfloat16).eval()
    scores = {
        "base": asdict(evaluate(base_bf16, tokenizer, eval_set, cfg.max_new_tokens))
    }
    log.info("base: %s", scores["base"])

    children: dict[str, Qwen2ForCausalLM] = {}
    for name in CHILDREN:
        model.load_state_dict(base_state)
        train(model, training_plan(tokenizer, cfg, name), cfg.child_lr, pad, name)
        children[name] = save_child(model, tokenizer, out_dir / name)

    write_eval_set(eval_set, out_dir / "eval.jsonl")
    for name, m in children.items():
        scores[name] = asdict(evaluate(m, tokenizer, eval_set, cfg.max_new_tokens))
        log.info("%s: %s", name, scores[name])
    sweep = {}
    for w in tqdm(cfg.sweep_weights, desc="sweep", leave=False):
        merged = merged_model(children["len"], children["acc"], w)
        sweep[f"{w:.2f}"] = asdict(
            evaluate(merged, tokenizer, eval_set, cfg.max_new_tokens)
        )
        log.info("w=%.2f %s", w, sweep[f"{w:.2f}"])
    return {
        "format": "mergesweep-embedded/1",
        "config": asdict(cfg),
        "training_questions": training_questions_digest(cfg),
        "children": scores,
        "sweep": sweep,
        "files": hashing.manifest(out_dir, exclude=("build.json",)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = BuildConfig(seed=args.seed)
    log.info("config: %s", cfg)

    started = time.monotonic()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.tmp-", dir=args.out.parent))
    try:
        record = build(cfg, tmp)
        hashing.write_json(tmp / "build.json", record)
        replace_dir(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info(
        "built %s in %.0f s (seed %d, bf16 children, peak memory %.0f MiB)",
        args.out,
        time.monotonic() - started,
        cfg.seed,
        peak_mib,
    )


if __name__ == "__main__":
    main()
