"""The sweep on tiny random constituents: in-place merge, lm-eval, counts, cache."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _sweep_fixtures import (
    PROBLEMS,
    build_constituent,
    build_tokenizer,
    params_dict,
    write_eval,
)
from transformers import Qwen2ForCausalLM

from stages import sweep
from stages.checkpoint import Checkpoint
from stages.merging import linear_merge, plan_merge
from stages.params import parse_params
from stages.tasks.mergesweep_math import EvalDataError, read_jsonl

REPO = Path(__file__).resolve().parents[1]
MAX_GEN = 12
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep")
    return {
        # len ends every response at once; acc never ends one.
        "len": build_constituent(root / "len", seed=1, eos_push=20.0, dtype=BF16),
        "acc": build_constituent(root / "acc", seed=2, eos_push=-20.0, dtype=BF16),
        "newline": build_constituent(
            root / "newline", seed=5, eos_push=-20.0, newline_push=20.0, dtype=BF16
        ),
        "tied_len": build_constituent(root / "tied_len", seed=3, eos_push=0, tie=True),
        "tied_acc": build_constituent(root / "tied_acc", seed=4, eos_push=0, tie=True),
        "eval": write_eval(root / "eval.jsonl"),
        "root": root,
    }


def make_params(world: dict[str, Path], weights: list[float], **eval_overrides):
    raw = params_dict({"toy": str(world["eval"])}, max_gen_toks=MAX_GEN)
    raw["eval"] |= eval_overrides
    raw["sweep"]["weights"] = weights
    return parse_params(raw)


@pytest.fixture(scope="module")
def evaluator(world: dict[str, Path]) -> sweep.PointEvaluator:
    return sweep.PointEvaluator(make_params(world, [0.0]), world["len"], world["acc"])


# --- counting generated ids -----------------------------------------------------------


def test_count_stops_at_first_eos_and_includes_it() -> None:
    gen = sweep.count_generated([5, 6, 9, 7, 9], frozenset({9}), pad_id=0, max_new=5)
    assert (gen.ids, gen.tokens, gen.truncated) == ((5, 6, 9), 3, False)


def test_count_stops_at_whichever_eos_comes_first() -> None:
    for row, n in (([5, 8, 6, 9], 2), ([5, 9, 6, 8], 2), ([9, 8], 1)):
        gen = sweep.count_generated(row, frozenset({9, 8}), pad_id=0, max_new=4)
        assert (gen.ids, gen.tokens, gen.truncated) == (tuple(row[:n]), n, False)


def test_count_without_eos_at_the_limit_is_truncated() -> None:
    gen = sweep.count_generated([5, 6, 7], frozenset({9}), pad_id=0, max_new=3)
    assert (gen.tokens, gen.truncated) == (3, True)


def test_count_drops_the_padding_after_a_stop_string() -> None:
    gen = sweep.count_generated([5, 6, 0, 0], frozenset({9}), pad_id=0, max_new=4)
    assert (gen.ids, gen.tokens, gen.truncated) == ((5, 6), 2, False)


# --- the in-memory merge --------------------------------------------------------------


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_in_memory_model_is_linear_merge_bit_for_bit(
    evaluator: sweep.PointEvaluator, world: dict[str, Path], w: float
) -> None:
    ev = evaluator
    sweep.merge_into(ev.targets, ev.plan, ev.len_state, ev.acc_state, w, normalize=True)
    state = ev.model.state_dict()
    a, b = Checkpoint(world["len"]), Checkpoint(world["acc"])
    assert set(a.tensors) <= set(state)
    for name in a.tensors:
        want = linear_merge([a.tensor(name), b.tensor(name)], [w, 1 - w])
        assert torch.equal(state[name], want), name
    assert state["lm_head.weight"].dtype == torch.bfloat16
    if w == 0.0:
        assert torch.equal(state["lm_head.weight"], b.tensor("lm_head.weight"))
    if w == 1.0:
        assert torch.equal(state["lm_head.weight"], a.tensor("lm_head.weight"))
    if w == 0.3:
        assert not torch.equal(state["lm_head.weight"], a.tensor("lm_head.weight"))
        assert not torch.equal(state["lm_head.weight"], b.tensor("lm_head.weight"))


def test_tied_embeddings_are_merged_through_the_checkpoint_names(
    world: dict[str, Path],
) -> None:
    params = make_params(world, [0.3])
    ev = sweep.PointEvaluator(params, world["tied_len"], world["tied_acc"])
    assert "lm_head.weight" not in ev.len_state
    sweep.merge_into(
        ev.targets, ev.plan, ev.len_state, ev.acc_state, 0.3, normalize=True
    )
    want = linear_merge(
        [
            ev.len_state["model.embed_tokens.weight"],
            ev.acc_state["model.embed_tokens.weight"],
        ],
        [0.3, 0.7],
    )
    assert torch.equal(ev.model.lm_head.weight, want)
    assert torch.equal(ev.model.model.embed_tokens.weight, want)


def test_untied_len_with_tied_acc_gets_its_own_lm_head(world: dict[str, Path]) -> None:
    raw = params_dict({"toy": str(world["eval"])})
    raw["merge"]["dtype"] = "bfloat16"
    ev = sweep.PointEvaluator(parse_params(raw), world["len"], world["tied_acc"])
    sweep.merge_into(
        ev.targets, ev.plan, ev.len_state, ev.acc_state, 0.3, normalize=True
    )
    want = linear_merge(
        [ev.len_state["lm_head.weight"], ev.acc_state["model.embed_tokens.weight"]],
        [0.3, 0.7],
        out_dtype=torch.bfloat16,
    )
    assert not ev.model.config.tie_word_embeddings
    assert torch.equal(ev.model.lm_head.weight, want)


def test_release_equals_the_in_memory_merge(
    evaluator: sweep.PointEvaluator, world: dict[str, Path], tmp_path: Path
) -> None:
    from stages.release import write_release

    ev = evaluator
    out = write_release(world["len"], world["acc"], 0.3, tmp_path / "release")
    sweep.merge_into(
        ev.targets, ev.plan, ev.len_state, ev.acc_state, 0.3, normalize=True
    )
    state = ev.model.state_dict()
    released = Checkpoint(out)
    assert set(released.tensors) == {j.name for j in ev.plan.jobs}
    for name in released.tensors:
        assert torch.equal(state[name], released.tensor(name)), name

    # The model the sweep builds without reading weights is the release as
    # transformers loads it: every parameter and buffer, the config, the outputs.
    loaded = Qwen2ForCausalLM.from_pretrained(out, dtype=ev.dtype).eval()
    ours = dict(ev.model.named_parameters()) | dict(ev.model.named_buffers())
    theirs = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert torch.equal(ours[name], t), name
    assert ev.model.generation_config.to_dict() == loaded.generation_config.to_dict()
    assert ev.model.generation_config.eos_token_id is not None
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.inference_mode():
        assert torch.equal(ev.model(ids).logits, loaded(ids).logits)


def donor_copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_generation_settings_in_config_json_are_kept_as_from_pretrained_keeps_them(
    world: dict[str, Path], tmp_path: Path
) -> None:
    # An older checkpoint: no generation_config.json, its settings in config.json.
    donor = donor_copy(world["acc"], tmp_path / "acc")
    (donor / "generation_config.json").unlink()
    config = json.loads((donor / "config.json").read_text())
    config |= {"repetition_penalty": 3.0, "no_repeat_ngram_size": 2}
    (donor / "config.json").write_text(json.dumps(config))
    plan = plan_merge([Checkpoint(world["len"]), Checkpoint(donor)])
    ours = sweep.build_model(donor, plan, torch.device("cpu")).generation_config
    theirs = Qwen2ForCausalLM.from_pretrained(donor).generation_config
    assert ours.repetition_penalty == 3.0 and ours.no_repeat_ngram_size == 2
    assert ours.to_dict() == theirs.to_dict()


def test_a_broken_generation_config_is_an_error_naming_it(
    world: dict[str, Path], tmp_path: Path
) -> None:
    donor = donor_copy(world["acc"], tmp_path / "acc")
    (donor / "generation_config.json").write_text('{"eos_token_id": 257,')
    plan = plan_merge([Checkpoint(world["len"]), Checkpoint(donor)])
    with pytest.raises(sweep.SweepError, match="generation_config.json: not a valid"):
        sweep.build_model(donor, plan, torch.device("cpu"))


def test_model_tensors_outside_the_checkpoint_are_an_error(
    evaluator: sweep.PointEvaluator,
) -> None:
    names = [n for n in evaluator.len_state if n != "model.norm.weight"]
    with pytest.raises(sweep.SweepError, match="model.norm.weight"):
        sweep.merge_targets(evaluator.model, names, evaluator.dtype)


# --- lm-eval wiring -------------------------------------------------------------------


def test_task_generation_settings_come_from_params(world: dict[str, Path]) -> None:
    params = make_params(world, [0.0], do_sample=True, temperature=0.6, top_p=0.95)
    task = sweep.load_tasks(params)["toy"]
    assert task.config.generation_kwargs == {
        "until": [],
        "max_gen_toks": MAX_GEN,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.95,
    }
    assert len(task.eval_docs) == 6


def test_templated_prompt_is_encoded_with_one_bos(
    evaluator: sweep.PointEvaluator,
) -> None:
    tok = build_tokenizer()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    # The tokenizer alone would double it: that is the trap being avoided.
    assert tok(prompt)["input_ids"][:2] == [tok.bos_token_id] * 2
    ids, _ = evaluator.lm.tok_batch_encode([prompt])
    assert (ids[0] == tok.bos_token_id).sum().item() == 1
    assert ids[0, 0].item() == tok.bos_token_id


def test_fast_decode_gives_the_tokenizers_text(
    evaluator: sweep.PointEvaluator,
) -> None:
    lm, tok = evaluator.lm, evaluator.lm.tokenizer
    assert lm._plain_decoder is not None
    rows = torch.randint(
        0, len(tok), (50, 30), generator=torch.Generator().manual_seed(0)
    )
    rows = rows.tolist() + [tok.encode("<think>7 - 3</think> \\boxed{4}")]
    for row in rows:
        for skip in (True, False):
            want = tok.decode(row, skip_special_tokens=skip)
            assert lm.tok_decode(row, skip_special_tokens=skip) == want


def test_a_prompt_with_two_bos_is_refused(evaluator: sweep.PointEvaluator) -> None:
    with pytest.raises(sweep.SweepError, match="2 BOS"):
        evaluator.lm.tok_batch_encode(["<|bos|><|User|>hi<|bos|>"])


def test_a_prompt_too_long_for_max_gen_toks_is_refused(
    evaluator: sweep.PointEvaluator,
) -> None:
    with pytest.raises(sweep.SweepError, match="leaves no room"):
        evaluator.lm.tok_batch_encode(["x" * 300], left_truncate_len=200)


def test_bad_eval_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n{"question": "q"}\n')
    with pytest.raises(EvalDataError, match=r"bad.jsonl:2: needs a string 'answer'"):
        read_jsonl(path)


def test_colliding_weight_labels_are_refused() -> None:
    with pytest.raises(sweep.SweepError, match="w0.12"):
        sweep.check_labels((0.12, 0.123))


# --- whole sweeps ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(world: dict[str, Path]) -> tuple[list[dict], dict, Path]:
    cache = world["root"] / "cache"
    points, samples = sweep.run_sweep(
        make_params(world, [0.0, 1.0]), world["len"], world["acc"], cache
    )
    return points, samples, cache


def test_points_count_tokens_from_generated_ids(swept) -> None:
    points, samples, _ = swept
    at = {p["weight"]: p for p in points}
    # w=0 is acc (never emits EOS): every response runs to max_gen_toks.
    assert at[0.0]["truncation_rate"] == 1.0
    assert at[0.0]["mean_tokens"] == at[0.0]["p90_tokens"] == MAX_GEN
    # w=1 is len (EOS first): one token each, the EOS, and nothing truncated.
    assert at[1.0]["truncation_rate"] == 0.0
    assert at[1.0]["mean_tokens"] == 1.0
    assert all(s["response"] == "" and s["tokens"] == 1 for s in samples[1.0])


def test_blank_lines_do_not_stop_generation(world: dict[str, Path]) -> None:
    # lm-eval's default `until` is ["\n\n"]: it would end this model's "\n\n\n..."
    # after two tokens and grade an empty response.
    points, samples = sweep.run_sweep(
        make_params(world, [1.0]), world["newline"], world["acc"], world["root"] / "nl"
    )
    assert points[0]["truncation_rate"] == 1.0
    assert {(s["response"], s["tokens"]) for s in samples[1.0]} == {
        ("\n" * MAX_GEN, MAX_GEN)
    }


@pytest.mark.parametrize("sampled", [False, True])
def test_a_reused_evaluator_gives_what_a_fresh_one_gives(
    world: dict[str, Path], sampled: bool
) -> None:
    # lm-eval's requests are built at the first point and reused: the next point must
    # see none of the last one's responses, and (sampling) the same random state.
    params = make_params(world, [0.0, 0.3], do_sample=sampled, temperature=1.0)
    reused = sweep.PointEvaluator(params, world["len"], world["acc"])
    _, at_0 = reused.evaluate(0.0)
    task = reused.tasks["toy"]
    built = [id(i) for i in task.instances]
    _, at_3 = reused.evaluate(0.3)
    assert [id(i) for i in task.instances] == built
    assert all(len(i.resps) == 1 for i in task.instances)
    _, fresh = sweep.PointEvaluator(params, world["len"], world["acc"]).evaluate(0.3)
    assert at_3 == fresh
    assert [s["response"] for s in at_3] != [s["response"] for s in at_0]
    if sampled:  # a fresh evaluator's first point is the reused one's first point
        _, again = sweep.PointEvaluator(params, world["len"], world["acc"]).evaluate(
            0.0
        )
        assert again == at_0


def test_set_config_after_a_point_applies_to_the_next(world: dict[str, Path]) -> None:
    ev = sweep.PointEvaluator(make_params(world, [0.0]), world["len"], world["acc"])
    assert ev.evaluate(0.0)[0]["mean_tokens"] == MAX_GEN
    task = ev.tasks["toy"]
    task.set_config(
        "generation_kwargs", sweep.gen_kwargs(ev.params) | {"max_gen_toks": 5}
    )
    assert ev.evaluate(0.0)[0]["mean_tokens"] == 5
    assert task.dump_config()["generation_kwargs"]["max_gen_toks"] == 5


def test_a_response_lm_eval_scored_differently_stops_the_sweep(
    world: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ev = sweep.PointEvaluator(make_params(world, [0.0]), world["len"], world["acc"])
    task = ev.tasks["toy"]
    apply_filters = task.apply_filters

    def altering_filter() -> None:  # a filter that rewrites one response
        apply_filters()
        task.instances[2].filtered_resps["none"] += " \\boxed{1}"

    monkeypatch.setattr(task, "apply_filters", altering_filter)
    with pytest.raises(sweep.SweepError, match="toy doc 2: lm-eval scored"):
        ev.evaluate(0.0)


def test_the_task_builds_again_when_the_arguments_change(
    evaluator: sweep.PointEvaluator,
) -> None:
    task = sweep.load_tasks(evaluator.params)["toy"]
    task.build_all_requests(limit=None)
    assert len(task.instances) == len(PROBLEMS)
    task.build_all_requests(limit=2)
    assert len(task.instances) == 2
    assert task.build_s > 0


def test_datasets_are_split_and_pooled_with_a_system_prompt(
    world: dict[str, Path], tmp_path: Path
) -> None:
    # The same problems under two names: identical prompts in two lm-eval tasks.
    small = write_eval(tmp_path / "small.jsonl", PROBLEMS[:2])
    raw = params_dict({"toy": str(world["eval"]), "dup": str(small)}, max_gen_toks=3)
    raw["sweep"]["weights"] = [0.0]
    raw["task"]["system_prompt"] = "Be brief."
    points, samples = sweep.run_sweep(
        parse_params(raw), world["len"], world["acc"], tmp_path / "cache"
    )
    p = points[0]
    assert (p["n"], p["datasets"]["toy"]["n"], p["datasets"]["dup"]["n"]) == (8, 6, 2)
    assert p["lm_eval"]["exact_match,none"] == p["accuracy"] == 0.0
    assert p["datasets"]["dup"]["lm_eval"] == {
        "exact_match,none": 0.0,
        "formatted,none": 0.0,
    }
    assert [s["dataset"] for s in samples[0.0]] == ["toy"] * 6 + ["dup"] * 2
    assert all(s["tokens"] == 3 and s["truncated"] for s in samples[0.0])
    prompt = "<|bos|>Be brief.<|User|>What is 2 + 3?<|Assistant|><think>\n"
    assert samples[0.0][0]["prompt"] == samples[0.0][6]["prompt"] == prompt


def test_pooled_metrics_weigh_datasets_by_size() -> None:
    per = {
        "a": {"n": 6, "lm_eval": {"exact_match,none": 0.5, "only_a,none": 1.0}},
        "b": {"n": 2, "lm_eval": {"exact_match,none": 1.0}},
    }
    assert sweep.pooled(per) == {"exact_match,none": 0.625}


def test_points_carry_every_field_the_report_reads(swept) -> None:
    points, samples, _ = swept
    assert [p["weight"] for p in points] == [0.0, 1.0]
    for p in points:
        assert p["n"] == 6 and p["cached"] is False
        t = p["timing"]
        parts = ("load_s", "setup_s", "merge_s", "generate_s", "score_s", "write_s")
        assert set(t) == {*parts, "total_s"}
        assert t["total_s"] == pytest.approx(sum(t[k] for k in parts), abs=1e-9)
        assert all(t[k] > 0 for k in parts if k != "setup_s")
        assert p["lm_eval"]["exact_match,none"] == p["accuracy"]
        assert p["lm_eval"]["formatted,none"] == p["format_rate"]
        assert p["datasets"]["toy"]["n"] == 6
    # The first point builds and tokenizes the prompts; the next reuses them.
    assert points[0]["timing"]["setup_s"] > 0
    assert points[1]["timing"]["setup_s"] == 0
    row = samples[0.0][0]
    assert set(row) == {
        "dataset", "doc_id", "question", "prompt", "response", "tokens",
        "truncated", "extracted", "gold", "correct", "formatted",
    }  # fmt: skip
    assert row["prompt"] == "<|bos|><|User|>What is 2 + 3?<|Assistant|><think>\n"
    assert (row["dataset"], row["doc_id"], row["gold"]) == ("toy", 0, "5")


def test_unchanged_points_come_from_the_cache(swept, world: dict[str, Path]) -> None:
    points, samples, cache = swept
    again, again_samples = sweep.run_sweep(
        make_params(world, [0.0, 1.0]), world["len"], world["acc"], cache
    )
    assert [p["cached"] for p in again] == [True, True]
    assert again_samples == samples

    def strip(p: dict) -> dict:
        # A point's cache write is timed after the write: only results.json has it.
        timing = {
            k: v for k, v in p["timing"].items() if k not in ("write_s", "total_s")
        }
        return {k: v for k, v in p.items() if k != "cached"} | {"timing": timing}

    assert [strip(p) for p in again] == [strip(p) for p in points]
    for old, new in zip(points, again, strict=True):
        assert new["timing"]["write_s"] == 0.0
        fresh = old["timing"]["total_s"] - old["timing"]["write_s"]
        assert new["timing"]["total_s"] == pytest.approx(fresh, rel=1e-12)


def test_an_added_weight_evaluates_one_point(swept, world: dict[str, Path]) -> None:
    _, _, cache = swept
    points, _ = sweep.run_sweep(
        make_params(world, [0.0, 0.6, 1.0]), world["len"], world["acc"], cache
    )
    assert [(p["weight"], p["cached"]) for p in points] == [
        (0.0, True),
        (0.6, False),
        (1.0, True),
    ]


def test_a_changed_eval_setting_misses_the_cache(swept, world: dict[str, Path]) -> None:
    _, _, cache = swept
    points, _ = sweep.run_sweep(
        make_params(world, [1.0], batch_size=3), world["len"], world["acc"], cache
    )
    assert points[0]["cached"] is False


def test_deleting_the_cache_loses_only_time(swept, world: dict[str, Path]) -> None:
    points, samples, _ = swept
    fresh = world["root"] / "fresh-cache"
    again, again_samples = sweep.run_sweep(
        make_params(world, [0.0, 1.0]), world["len"], world["acc"], fresh
    )
    assert [p["cached"] for p in again] == [False, False]
    assert again_samples == samples
    keys = ("accuracy", "mean_tokens", "p90_tokens", "truncation_rate", "lm_eval")
    assert [{k: p[k] for k in keys} for p in again] == [
        {k: p[k] for k in keys} for p in points
    ]


def test_a_corrupt_cache_entry_is_evaluated_again(
    swept, world: dict[str, Path], tmp_path: Path
) -> None:
    points, _, cache = swept
    copy = tmp_path / "cache"
    copy.mkdir()
    for f in cache.glob("*.json"):
        (copy / f.name).write_bytes(f.read_bytes())
    params = make_params(world, [0.0, 1.0])
    key = sweep.point_key(sweep.sweep_inputs(params, world["len"], world["acc"]), 1.0)
    (copy / f"{key}.json").write_text('{"format": "mergesweep-point/1", "ke')
    again, _ = sweep.run_sweep(params, world["len"], world["acc"], copy)
    assert [p["cached"] for p in again] == [True, False]
    assert again[1]["mean_tokens"] == points[1]["mean_tokens"]
    assert json.loads((copy / f"{key}.json").read_text())["key"] == key


def test_provenance_manifest_is_used_only_when_it_matches(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    entry = {"sha256": "0" * 64, "size": 2}
    prov = {"files": {"config.json": entry}}
    (tmp_path / "provenance.json").write_text(json.dumps(prov))
    assert sweep.constituent_files(tmp_path) == {"config.json": entry}
    (tmp_path / "config.json").write_text('{"a": 1}')
    hashed = sweep.constituent_files(tmp_path)
    assert hashed["config.json"]["size"] == 8
    assert hashed["config.json"]["sha256"] != "0" * 64


def test_outputs_replace_old_samples_and_leave_no_temporaries(
    swept, tmp_path: Path
) -> None:
    points, samples, _ = swept
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "w0.50.jsonl").write_text("stale\n")
    sweep.write_outputs(tmp_path, points, samples)
    assert sorted(os.listdir(tmp_path)) == ["results.json", "samples"]
    assert sorted(os.listdir(tmp_path / "samples")) == ["w0.00.jsonl", "w1.00.jsonl"]
    lines = (tmp_path / "samples" / "w0.00.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == samples[0.0]
    assert json.loads((tmp_path / "results.json").read_text()) == points


def test_bad_eval_data_ends_the_stage_with_one_line(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"question": "q", "answer": "1"}\n{"question": "q", "answer": ""}\n'
    )
    raw = params_dict({"toy": str(bad)})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    args = ["--len", str(world["len"]), "--acc", str(world["acc"]), "--out", "out"]
    with pytest.raises(SystemExit) as exc:
        sweep.main(args)
    assert str(exc.value).startswith(f"error: {bad}:2: gold answer '' cannot be parsed")
    assert not (tmp_path / "out").exists()


def test_stage_command_line_writes_results_and_cache(
    world: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    raw = params_dict({"toy": str(world["eval"])}, max_gen_toks=4)
    raw["sweep"]["weights"] = [1.0]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = os.environ | {"PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "stages.sweep", "--len", str(world["len"])]
    cmd += ["--acc", str(world["acc"]), "--out", "reports/sweep"]
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    results = json.loads((tmp_path / "reports/sweep/results.json").read_text())
    assert [(p["weight"], p["n"], p["mean_tokens"]) for p in results] == [(1.0, 6, 1.0)]
    assert (tmp_path / "reports/sweep/samples/w1.00.jsonl").exists()
    assert len(list((tmp_path / ".cache/mergesweep/points").glob("*.json"))) == 1
