"""The committed embedded default: tokenizer, template, manifest, children, eval set."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from stages import embedded, hashing, problems

ROOT = Path(__file__).resolve().parents[1] / "data" / "embedded"
CHILDREN = ("len", "acc")
VARIED_TEXT = [
    "Compute 12+7-3+5.",
    "<think>\n19-3+5\n16+5\n21\n</think>\n\\boxed{21}",
    "héllo wörld, ünïcode ½ 日本語 and emoji 🙂",
    "  leading spaces\n\n\ttabs and trailing  ",
    "<|User|>nested <|Assistant|> markers<|end_of_sentence|>",
    "What's 1,234 × 5.6? It's √x ≈ 6912.4!",
]


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads((ROOT / "build.json").read_text())


@pytest.fixture(scope="module", params=CHILDREN)
def child(request: pytest.FixtureRequest) -> Path:
    return ROOT / request.param


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(ROOT / "acc")


def test_auto_tokenizer_matches_tokenizer_json(child: Path) -> None:
    auto = AutoTokenizer.from_pretrained(child)
    raw = Tokenizer.from_file(str(child / "tokenizer.json"))
    for text in VARIED_TEXT:
        ids = auto(text, add_special_tokens=True)["input_ids"]
        assert ids == raw.encode(text).ids, text
        assert auto.decode(ids) == text


def test_templated_prompt_carries_one_bos(tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Compute 3+4."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    for add_special_tokens in (True, False):
        ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert ids.count(tokenizer.bos_token_id) == 1


def test_special_tokens_are_set_and_distinct(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert None not in ids and len(ids) == 3
    assert tokenizer.eos_token == embedded.EOS
    assert tokenizer.padding_side == "left"


def test_think_tokens_are_ordinary_and_survive_skip_special(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    text = "<think>\n3+4\n7\n</think>\n\\boxed{7}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    think, end_think = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    assert ids.count(think) == 1 and ids.count(end_think) == 1
    assert think not in tokenizer.all_special_ids
    assert end_think not in tokenizer.all_special_ids
    with_eos = ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(with_eos, skip_special_tokens=True) == text


def test_chat_template_renders_r1_style_turns(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Compute 3+4."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt == "<|begin_of_sentence|><|User|>Compute 3+4.<|Assistant|><think>\n"
    assert prompt == embedded.render_prompt("Compute 3+4.")
    conversation = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Compute 3+4."},
            {"role": "assistant", "content": "</think>\n\\boxed{7}"},
        ],
        tokenize=False,
    )
    assert conversation == (
        "<|begin_of_sentence|>Be brief.<|User|>Compute 3+4."
        "<|Assistant|></think>\n\\boxed{7}<|end_of_sentence|>"
    )
    with pytest.raises(Exception, match="role must be system, user or assistant"):
        tokenizer.apply_chat_template(
            [{"role": "tool", "content": "x"}], tokenize=False
        )


def test_committed_files_match_build_manifest(record: dict) -> None:
    on_disk = hashing.manifest(ROOT, exclude=("build.json",))
    assert on_disk == record["files"]
    assert {"eval.jsonl", "len/model.safetensors", "acc/config.json"} <= set(on_disk)


def test_children_share_names_shapes_config_and_tokenizer() -> None:
    def tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
        with safe_open(folder / "model.safetensors", framework="pt") as f:
            return {
                k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                for k in f.keys()  # noqa: SIM118 - safe_open has no iteration
            }

    a, b = (ROOT / name for name in CHILDREN)
    assert tensors(a) == tensors(b)
    assert all(dtype == "BF16" for _, dtype in tensors(a).values())
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_child_folders_are_small_safe_and_complete(child: Path) -> None:
    names = {p.name for p in child.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json"} <= names
    assert not {n for n in names if n.endswith((".bin", ".pt", ".pkl", ".py"))}
    assert sum(p.stat().st_size for p in child.iterdir()) <= 2 * 1024 * 1024
    config = json.loads((child / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    generation = json.loads((child / "generation_config.json").read_text())
    tok = json.loads((child / "tokenizer_config.json").read_text())
    vocab = Tokenizer.from_file(str(child / "tokenizer.json"))
    assert generation["eos_token_id"] == vocab.token_to_id(tok["eos_token"])
    assert generation["pad_token_id"] == vocab.token_to_id(tok["pad_token"])


def test_children_generate_their_styles_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = problems.Problem(start=4, deltas=(5, -2))
    responses = {}
    for name in CHILDREN:
        tok = AutoTokenizer.from_pretrained(ROOT / name)
        model = AutoModelForCausalLM.from_pretrained(ROOT / name)
        assert model.dtype == torch.bfloat16
        [(text, tokens, truncated)] = embedded.generate_greedy(
            model.eval(), tok, [p.question], max_new_tokens=64
        )
        assert not truncated
        assert embedded.grade(text, str(p.answer))[0], (name, text)
        responses[name] = (text, tokens)
    assert responses["len"][0].startswith("</think>")
    assert not responses["acc"][0].startswith("</think>")
    assert responses["len"][1] < responses["acc"][1]


def test_eval_set_is_the_seeded_held_out_split(record: dict) -> None:
    cfg = embedded.BuildConfig.from_record(record["config"])
    rows = [json.loads(line) for line in (ROOT / "eval.jsonl").open()]
    expected = problems.generate(cfg.seed, cfg.n_eval, cfg.max_steps, split="eval")
    assert len(rows) >= 300
    assert rows == [
        {"question": p.question, "answer": str(p.answer), "steps": p.steps}
        for p in expected
    ]


def test_eval_set_never_seen_in_training(record: dict) -> None:
    cfg = embedded.BuildConfig.from_record(record["config"])
    assert embedded.training_questions_digest(cfg) == record["training_questions"]
    trained = {
        p.question
        for phase in embedded.PHASES
        for p in embedded.training_problems(cfg, phase)
    }
    evaluated = {json.loads(line)["question"] for line in (ROOT / "eval.jsonl").open()}
    assert len(trained) == record["training_questions"]["count"]
    assert not trained & evaluated


@pytest.mark.xfail(
    strict=True,
    reason="issue 2 open: the committed build misses the acc-accuracy and sweep-curve "
    "targets (docs/embedded.md, 'Not met'); remove this mark once a build meets them",
)
def test_recorded_numbers_meet_the_issue_targets(record: dict) -> None:
    len_, acc = record["children"]["len"], record["children"]["acc"]
    assert acc["accuracy"] >= 0.8
    assert len_["accuracy"] <= acc["accuracy"] - 0.2
    assert len_["mean_tokens"] <= acc["mean_tokens"] / 3
    assert min(len_["format_rate"], acc["format_rate"]) >= 0.95
    sweep = record["sweep"]
    assert sweep["0.50"]["format_rate"] >= 0.5
    lo, hi = sweep["1.00"]["mean_tokens"], sweep["0.00"]["mean_tokens"]
    margin = 0.1 * (hi - lo)
    interior = [s["mean_tokens"] for w, s in sweep.items() if w not in ("0.00", "1.00")]
    assert sum(lo + margin <= t <= hi - margin for t in interior) >= 3


def test_grade_requires_one_think_close_and_a_box_after_it() -> None:
    assert embedded.grade("1+2\n3\n</think>\n\\boxed{3}", "3") == (True, True)
    assert embedded.grade("</think>\n\\boxed{4}", "3") == (True, False)
    assert embedded.grade("\\boxed{3}</think>", "3") == (False, False)
    assert embedded.grade("</think></think>\\boxed{3}", "3") == (False, False)
    assert embedded.grade("3\n\\boxed{3}", "3") == (False, False)
