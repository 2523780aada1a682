import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.embedded import BOS, END_THINK, EOS, PAD, THINK, prompt_text
from stages.grading import grade
from stages.hashing import sha256_file
from stages.problems import Problem

ROOT = Path(__file__).resolve().parents[1] / "data" / "embedded"
NAMES = ("len", "acc")
TEXTS = (
    "7+5-3-8+2 =",
    "HE'S here.\n\nThen  two spaces, 12345 and 3.14\t\ttabs\r\n",
    "</think>\n\n\\boxed{42} after <think>\nsteps\n",
    "caf\u00e9 vs cafe\u0301, \u00b2\u00b3 \u0663 \u2713 \U0001f600",
    "<｜User｜>x<｜Assistant｜>",
)


@pytest.fixture(scope="module")
def build() -> dict:
    return json.loads((ROOT / "build.json").read_text())


@pytest.fixture(scope="module", params=NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def tokenizers_(name: str) -> tuple:
    folder = ROOT / name
    return AutoTokenizer.from_pretrained(folder), Tokenizer.from_file(
        str(folder / "tokenizer.json")
    )


def test_committed_files_match_build_record(build: dict):
    files = build["files"]
    on_disk = sorted(
        p.relative_to(ROOT).as_posix()
        for p in ROOT.rglob("*")
        if p.is_file() and p.name != "build.json"
    )
    assert sorted(files) == on_disk
    for rel, meta in files.items():
        path = ROOT / rel
        assert path.stat().st_size == meta["size"], rel
        assert sha256_file(path) == meta["sha256"], rel


def test_children_are_small_safetensors_folders(name: str):
    folder = ROOT / name
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 2 * 1024 * 1024
    gen = json.loads((folder / "generation_config.json").read_text())
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert gen["eos_token_id"] == tok.token_to_id(EOS)


def test_children_share_names_shapes_config_tokenizer():
    from safetensors import safe_open

    shapes = {}
    for n in NAMES:
        with safe_open(str(ROOT / n / "model.safetensors"), "pt") as f:
            shapes[n] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["len"] == shapes["acc"]
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (ROOT / "len" / f).read_bytes() == (ROOT / "acc" / f).read_bytes(), f


def test_auto_tokenizer_gives_tokenizer_json_ids(tokenizers_: tuple):
    auto, raw = tokenizers_
    for text in TEXTS:
        want = raw.encode(text, add_special_tokens=False).ids
        assert auto(text, add_special_tokens=False)["input_ids"] == want, text


def test_digits_are_single_tokens(tokenizers_: tuple):
    _, raw = tokenizers_
    assert raw.encode("1234567890", add_special_tokens=False).tokens == list(
        "1234567890"
    )


def test_special_and_think_tokens(tokenizers_: tuple):
    auto, raw = tokenizers_
    assert (auto.bos_token, auto.eos_token, auto.pad_token) == (BOS, EOS, PAD)
    assert len({auto.bos_token_id, auto.eos_token_id, auto.pad_token_id}) == 3
    ids = raw.encode(f"{THINK}\n1{END_THINK}\\boxed{{1}}{EOS}").ids
    assert raw.token_to_id(THINK) in ids and raw.token_to_id(END_THINK) in ids
    assert auto.decode(ids, skip_special_tokens=True) == (
        f"{THINK}\n1{END_THINK}\\boxed{{1}}"
    )


def test_chat_template_single_bos(tokenizers_: tuple):
    auto, _ = tokenizers_
    msgs = [{"role": "user", "content": "3+4 ="}]
    text = auto.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == prompt_text("3+4 =")
    assert text.endswith("<think>\n") and text.count(BOS) == 1
    ids = auto(text, add_special_tokens=False)["input_ids"]
    assert ids.count(auto.bos_token_id) == 1 and ids[0] == auto.bos_token_id
    with_sys = auto.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *msgs],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert with_sys == BOS + "Be brief." + text[len(BOS) :]
    no_gen = auto.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
    assert not no_gen.endswith("<think>\n")


def test_children_load_offline_and_answer(name: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = ROOT / name
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    p = Problem((3, 4), ("+",))  # 3+4 =
    text = tok.apply_chat_template(
        [{"role": "user", "content": p.question}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, max_new_tokens=40, do_sample=False)
    response = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    verdict = grade(response, p.answer)
    assert verdict.formatted and verdict.correct, response
    if name == "acc":
        assert response.startswith("3+4=7\n")
    else:
        assert response.startswith(END_THINK)


def test_measured_numbers_meet_the_targets(build: dict):
    acc, len_ = build["children"]["acc"], build["children"]["len"]
    assert acc["accuracy"] >= 0.8
    assert len_["mean_tokens"] <= acc["mean_tokens"] / 3
    assert len_["accuracy"] <= acc["accuracy"] - 0.2
    assert min(acc["format"], len_["format"]) >= 0.95
    curve = {round(p["w"], 1): p for p in build["sweep"]}
    assert curve[0.5]["format"] >= 0.5
    lo, hi = curve[1.0]["mean_tokens"], curve[0.0]["mean_tokens"]
    margin = 0.1 * (hi - lo)
    inside = [
        w
        for w, p in curve.items()
        if 0 < w < 1 and lo + margin <= p["mean_tokens"] <= hi - margin
    ]
    assert len(inside) >= 3, curve
