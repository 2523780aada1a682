"""Build the embedded default: a byte-level BPE tokenizer, a tiny Qwen2 base pre-trained
on graded mod-10 arithmetic, its `len` and `acc` fine-tunes, the held-out eval set and
build.json. Run: `python -m stages.embedded --out data/embedded --seed 0`."""

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import Qwen2Config, Qwen2ForCausalLM

from stages.grading import grade
from stages.hashing import manifest, write_json
from stages.merging import linear_merge
from stages.problems import (
    MAX_STEPS,
    Problem,
    direct_response,
    draw,
    eval_set,
    steps_response,
)

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
SPECIAL = (BOS, EOS, PAD, USER, ASSISTANT)
# R1's template, cut to what a single-turn chat needs: BOS once, an optional system
# prompt, the turns, and a generation prompt that opens the think block.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + "{{ m['content'] }}"
    "{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + THINK + "\n{% endif %}"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NAMES = ("len", "acc")
SWEEP_WEIGHTS = tuple(i / 10 for i in range(11))


@dataclass(frozen=True)
class Settings:
    """Everything the build depends on besides the seed."""

    vocab_size: int = 320
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    batch_size: int = 64
    base_steps: int = 600
    base_lr: float = 3e-3
    base_acc_share: float = 0.5
    tune_steps: int = 60
    tune_lr: float = 1e-3
    other_style: float = 0.35
    eval_per_steps: int = 50
    max_new_tokens: int = 64
    # One thread: on this shared 2-core machine two threads ran a training step 10x
    # slower than one (0.2 s against 2 s, load average 3), and the count is pinned
    # because it changes the order of float reductions, hence the bits.
    threads: int = 1


def prompt_text(question: str) -> str:
    """What CHAT_TEMPLATE gives for one user message with the generation prompt."""
    return f"{BOS}{USER}{question}{ASSISTANT}{THINK}\n"


def build_tokenizer(corpus: Sequence[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE; think tags ordinary tokens, chat tags special ones.

    Normalizer and pre-tokenizer are exactly those transformers 5's Qwen2Tokenizer
    installs when it loads a qwen2 folder (it ignores tokenizer_class there), so
    AutoTokenizer and tokenizer.json give the same ids. Its regex isolates every digit.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens([THINK, END_THINK])
    return tok


def save_tokenizer(tok: Tokenizer, folder: Path) -> None:
    """tokenizer.json plus the config that makes AutoTokenizer use it unchanged."""
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    write_json(folder / "tokenizer_config.json", config)
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    write_json(folder / "special_tokens_map.json", special)


def new_model(s: Settings, tok: Tokenizer) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        # Measured: with the default 0.02, a width-64 model's attention stays near
        # uniform for hundreds of steps (loss 0.75 after 150 steps on one fixed batch);
        # 0.1, about 1/sqrt(width), fits that batch to 0.04 in 50 steps.
        initializer_range=0.1,
        torch_dtype="float32",
    )
    return Qwen2ForCausalLM(config)


def encode_pairs(
    tok: Tokenizer, pairs: Sequence[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention mask, labels) with loss on the response and eos."""
    prompts = tok.encode_batch([p for p, _ in pairs], add_special_tokens=False)
    answers = tok.encode_batch([r for _, r in pairs], add_special_tokens=False)
    eos, pad = tok.token_to_id(EOS), tok.token_to_id(PAD)
    rows = [(p.ids, a.ids + [eos]) for p, a in zip(prompts, answers, strict=True)]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p) : n] = torch.tensor(a)
        mask[i, :n] = 1
    return ids, mask, labels


def training_batch(
    rng: random.Random, size: int, acc_share: Callable[[int], float]
) -> list[tuple[str, str]]:
    """(prompt, response) pairs from the training share, k uniform in 1..MAX_STEPS;
    a problem of k steps gets the step-by-step response with chance `acc_share(k)`."""
    out = []
    for _ in range(size):
        p = draw(rng, rng.randint(1, MAX_STEPS), held_out=False)
        style = steps_response if rng.random() < acc_share(p.steps) else direct_response
        out.append((prompt_text(p.question), style(p)))
    return out


def style_shares(s: Settings) -> dict[str, Callable[[int], float]]:
    """Chance of the step-by-step response per k, for the base and each child.

    Each child gets some of the other style, more of it where that style fits the
    problem (long chains for `len`, short ones for `acc`), so the children's style
    margins, and with them the merge weight where a problem switches, depend on k.
    Measured: with a flat 10% every problem switched between w = 0.4 and 0.6.
    """
    span = MAX_STEPS - 1
    return {
        "base": lambda k: s.base_acc_share,
        "len": lambda k: s.other_style * (k - 1) / span,
        "acc": lambda k: 1 - s.other_style * (MAX_STEPS - k) / span,
    }


def train(
    model: Qwen2ForCausalLM,
    tok: Tokenizer,
    rng: random.Random,
    s: Settings,
    *,
    steps: int,
    lr: float,
    acc_share: Callable[[int], float],
) -> float:
    """AdamW, warmup then cosine decay; returns the mean loss of the last 20 steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)

    def schedule(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses = []
    for i in range(steps):
        ids, mask, labels = encode_pairs(
            tok, training_batch(rng, s.batch_size, acc_share)
        )
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (i + 1) % 25 == 0:
            log.info("step %d/%d loss %.4f", i + 1, steps, sum(losses[-20:]) / 20)
    model.eval()
    return sum(losses[-20:]) / min(20, len(losses))


@torch.no_grad()
def generate(
    model: Qwen2ForCausalLM, tok: Tokenizer, questions: Sequence[str], max_new: int
) -> list[tuple[str, int]]:
    """Greedy responses with left padding: (text, generated ids up to and with eos)."""
    eos, pad = tok.token_to_id(EOS), tok.token_to_id(PAD)
    enc = [e.ids for e in tok.encode_batch([prompt_text(q) for q in questions], False)]
    width = max(len(e) for e in enc)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
    mask = (
        torch.arange(width)[None, :]
        >= torch.tensor([width - len(e) for e in enc])[:, None]
    ).long()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad,
    )[:, width:]
    results = []
    for row in out.tolist():
        n = row.index(eos) + 1 if eos in row else len(row)
        results.append((tok.decode(row[:n], skip_special_tokens=True), n))
    return results


def measure(
    model: Qwen2ForCausalLM, tok: Tokenizer, problems: Sequence[Problem], max_new: int
) -> dict:
    """Accuracy, format rate and mean response tokens, overall and per k."""
    res = generate(model, tok, [p.question for p in problems], max_new)
    verdicts = [
        grade(text, p.answer) for (text, _), p in zip(res, problems, strict=True)
    ]
    by_k = {}
    for k in range(1, MAX_STEPS + 1):
        idx = [i for i, p in enumerate(problems) if p.steps == k]
        by_k[str(k)] = {
            "accuracy": sum(verdicts[i].correct for i in idx) / len(idx),
            "mean_tokens": sum(res[i][1] for i in idx) / len(idx),
        }
    n = len(problems)
    return {
        "accuracy": sum(v.correct for v in verdicts) / n,
        "format": sum(v.formatted for v in verdicts) / n,
        "mean_tokens": sum(t for _, t in res) / n,
        "by_steps": by_k,
    }


def merged(
    children: dict[str, Qwen2ForCausalLM], w: float, make: Callable
) -> Qwen2ForCausalLM:
    """The linear merge with share `w` of len, through the pipeline's kernel."""
    a, b = children["len"].state_dict(), children["acc"].state_dict()
    model = make()
    model.load_state_dict({k: linear_merge([a[k], b[k]], [w, 1 - w]) for k in a})
    return model.eval()


def write_folder(model: Qwen2ForCausalLM, tok: Tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True)
    model.generation_config.do_sample = False
    model.save_pretrained(folder)
    save_tokenizer(tok, folder)


def build(out: Path, seed: int, s: Settings, sweep: bool) -> dict:
    """Train, measure, write it all under a temporary sibling of `out`, swap it in."""
    start, cpu_start = time.time(), time.process_time()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(s.threads)
    rng = random.Random(f"train-{seed}")

    shares = style_shares(s)
    corpus = [
        p + r for p, r in training_batch(random.Random(seed), 2000, shares["base"])
    ]
    tok = build_tokenizer(corpus, s.vocab_size)
    base = new_model(s, tok)
    base_loss = train(
        base, tok, rng, s, steps=s.base_steps, lr=s.base_lr, acc_share=shares["base"]
    )
    log.info("base trained: loss %.4f, %.0f s", base_loss, time.time() - start)

    children, losses = {}, {"base": base_loss}
    for name in NAMES:
        child = new_model(s, tok)
        child.load_state_dict(base.state_dict())
        losses[name] = train(
            child, tok, rng, s, steps=s.tune_steps, lr=s.tune_lr, acc_share=shares[name]
        )
        children[name] = child
    trained_s = time.time() - start

    problems = eval_set(seed, s.eval_per_steps)
    metrics = {
        n: measure(m, tok, problems, s.max_new_tokens) for n, m in children.items()
    }
    curve = []
    if sweep:
        for w in SWEEP_WEIGHTS:
            m = merged(children, w, lambda: new_model(s, tok))
            curve.append({"w": w, **measure(m, tok, problems, s.max_new_tokens)})
            log.info(
                "w=%.1f %s", w, {k: v for k, v in curve[-1].items() if k != "by_steps"}
            )

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, child in children.items():
        write_folder(child, tok, tmp / name)
    lines = [json.dumps({"question": p.question, "answer": p.answer}) for p in problems]
    (tmp / "eval.jsonl").write_text("\n".join(lines) + "\n")
    record = {
        "seed": seed,
        "settings": asdict(s),
        "files": manifest(tmp),
        "train_loss": losses,
        "children": metrics,
        "sweep": curve,
        "train_seconds": round(trained_s, 1),
        "wall_seconds": round(time.time() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
    }
    write_json(tmp / "build.json", record)
    swap_in(tmp, out)
    return record


def swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` so a reader never sees a half-written build."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def with_overrides(s: Settings, items: Sequence[str]) -> Settings:
    """`s` with `KEY=VALUE` fields replaced, each cast to the field's type."""
    fields = asdict(s)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(
                f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}"
            )
        fields[key] = type(fields[key])(value)
    return Settings(**fields)


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True, help="e.g. data/embedded")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-sweep", action="store_true", help="skip the 11-point sweep")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one Settings field (experiments; the default build uses none)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    s = with_overrides(Settings(), args.set)
    log.info("building embedded default: seed %d, %s", args.seed, s)
    record = build(args.out, args.seed, s, not args.no_sweep)
    for name in NAMES:
        m = record["children"][name]
        _say(
            f"{name}: accuracy {m['accuracy']:.3f} format {m['format']:.3f} "
            f"mean tokens {m['mean_tokens']:.1f}"
        )
    for p in record["sweep"]:
        _say(
            f"w={p['w']:.1f}: accuracy {p['accuracy']:.3f} format {p['format']:.3f} "
            f"mean tokens {p['mean_tokens']:.1f}"
        )
    _say(f"wall {record['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
