"""`mergesweep audit`: each fault of issue 6 is caught and named; honest weight fits."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import _audit_fixtures as fx
import pytest
import torch
from safetensors.torch import load_file

from stages import audit as A
from stages.checkpoint import read_header
from stages.hashing import manifest

UP = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="session")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return fx.make_constituents(tmp_path_factory.mktemp("constituents"))


@pytest.fixture
def release(pair: tuple[Path, Path], tmp_path: Path) -> Path:
    return fx.write_release(*pair, tmp_path / "models" / "rel")


def run_audit(model: Path, pair: tuple[Path, Path]) -> dict:
    return A.audit(model, len_dir=pair[0], acc_dir=pair[1])


def statuses(report: dict) -> dict[str, str]:
    return {name: c["status"] for name, c in report["checks"].items()}


def test_clean_release_passes_and_reads_each_byte_once(
    release: Path, pair: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    before = manifest(release)
    out = tmp_path / "reports" / "audit.json"
    argv = [str(release), "--len", str(pair[0]), "--acc", str(pair[1])]
    assert A.cli([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert set(statuses(report).values()) == {"pass"}
    inf = report["checks"]["inference"]
    lo, hi = inf["w_interval"]
    assert lo <= 0.3 <= hi and inf["uncertainty"] < 1e-4
    assert inf["disagreeing_tensors"] == {}
    assert report["checks"]["recompute"]["tensors_compared"] == len(fx.shapes())
    assert report["weight_bytes_read"] == report["weight_bytes"] > 3_000_000
    assert manifest(release) == before
    words = capsys.readouterr().out
    assert "linear merge at w=0.3" in words and "OK" in words


def test_rl_like_differences_bias_least_squares_not_intervals(
    release: Path, pair: tuple[Path, Path]
) -> None:
    tl = load_file(str(pair[0] / "model.safetensors"))
    ta = load_file(str(pair[1] / "model.safetensors"))
    ulps = torch.cat(
        [
            (tl[n].view(torch.int16) - ta[n].view(torch.int16)).abs().flatten()
            for n in tl
        ]
    )
    assert (ulps <= 4).float().mean() > 0.95 and (ulps == 0).float().mean() > 0.5
    inf = run_audit(release, pair)["checks"]["inference"]
    assert abs(inf["least_squares_pooled"] - 0.3) > 0.1
    assert inf["least_squares"]["max"] < 0.2
    lo, hi = inf["w_interval"]
    assert lo <= 0.3 <= hi


@pytest.mark.parametrize("bit", [0, 15])
def test_one_flipped_bit_is_named(
    release: Path, pair: tuple[Path, Path], bit: int
) -> None:
    shard = fx.flip_bit(release, UP, 1234, bit)
    report = run_audit(release, pair)
    assert statuses(report) == {
        "integrity": "fail",
        "lineage": "pass",
        "recompute": "fail",
        "inference": "fail",
    }
    changed = report["checks"]["integrity"]["changed"]
    assert [c["file"] for c in changed] == [shard.name]
    mism = report["checks"]["recompute"]["mismatches"]
    assert list(mism) == [UP]
    assert mism[UP]["elements"] == 1 and mism[UP]["first_flat_index"] == 1234
    assert mism[UP]["max_abs_diff"] > 0
    inf = report["checks"]["inference"]
    assert inf["disagreeing_tensors"] == {UP: 1}
    assert inf["w_interval"][0] <= 0.3 <= inf["w_interval"][1]
    assert UP in inf["verdict"] and inf["verdict"].startswith("not a linear merge")


def test_merge_at_031_presented_as_03_is_inferred_and_flagged(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    model = fx.write_release(*pair, tmp_path / "rel", weight=0.31, recorded=0.3)
    report = run_audit(model, pair)
    assert statuses(report) == {
        "integrity": "pass",
        "lineage": "pass",
        "recompute": "fail",
        "inference": "fail",
    }
    inf = report["checks"]["inference"]
    assert abs(inf["w"] - 0.31) < 0.001
    lo, hi = inf["w_interval"]
    assert lo <= 0.31 <= hi and not lo <= 0.3 <= hi
    assert inf["w_recorded"] == 0.3 and "records w=0.3, outside" in inf["verdict"]
    assert inf["disagreeing_tensors"] == {}
    assert len(report["checks"]["recompute"]["mismatches"]) > 10


def test_edited_config_fails_integrity_only(
    release: Path, pair: tuple[Path, Path]
) -> None:
    config = release / "config.json"
    config.write_text(
        config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05')
    )
    report = run_audit(release, pair)
    assert statuses(report) == {
        "integrity": "fail",
        "lineage": "pass",
        "recompute": "pass",
        "inference": "pass",
    }
    assert [c["file"] for c in report["checks"]["integrity"]["changed"]] == [
        "config.json"
    ]
    assert "config.json" in report["checks"]["integrity"]["summary"]


def test_missing_shard_is_named(release: Path, pair: tuple[Path, Path]) -> None:
    shard = sorted(release.glob("model-*.safetensors"))[1]
    lost = set(read_header(shard))
    shard.unlink()
    report = run_audit(release, pair)
    assert report["ok"] is False
    assert report["checks"]["integrity"]["missing"] == [shard.name]
    recompute = report["checks"]["recompute"]
    assert recompute["status"] == "fail" and shard.name in recompute["summary"]
    assert recompute["tensors_compared"] == len(fx.shapes()) - len(lost)
    inf = report["checks"]["inference"]
    assert inf["status"] == "fail" and set(inf["unexamined_tensors"]) == lost


def test_provenance_forged_to_match_tampered_weights(
    release: Path, pair: tuple[Path, Path]
) -> None:
    fx.flip_bit(release, "model.norm.weight", 5, 0)
    fx.rehash(release)
    report = run_audit(release, pair)
    assert report["checks"]["integrity"]["status"] == "pass"
    recompute = report["checks"]["recompute"]
    assert recompute["status"] == "fail"
    assert list(recompute["mismatches"]) == ["model.norm.weight"]
    assert "model.norm.weight: 1 element differ" in recompute["summary"]


def test_changed_constituent_fails_lineage(
    release: Path, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    acc = tmp_path / "acc"
    shutil.copytree(pair[1], acc)
    (acc / "tokenizer_config.json").write_text('{"model_max_length": 4096}\n')
    report = A.audit(release, len_dir=pair[0], acc_dir=acc)
    lineage = report["checks"]["lineage"]
    assert lineage["status"] == "fail"
    assert [c["file"] for c in lineage["acc"]["changed"]] == ["tokenizer_config.json"]
    assert lineage["len"]["changed"] == [] and "constituent acc" in lineage["summary"]
    assert report["checks"]["recompute"]["status"] == "pass"


def test_release_stage_output_with_tied_acc_passes(tmp_path: Path) -> None:
    from stages.release import write_release

    pair = fx.make_constituents(tmp_path / "c", tie_acc=True)
    out = write_release(*pair, 0.3, tmp_path / "models" / "rel", shard_size=400_000)
    assert len(list(out.glob("model-*.safetensors"))) > 2
    report = run_audit(out, pair)
    assert statuses(report) == dict.fromkeys(A.CHECKS, "pass")
    assert report["weight_bytes_read"] == report["weight_bytes"]
    fits = report["checks"]["inference"]["per_tensor"]
    assert fits["lm_head.weight"]["disagreeing_elements"] == 0


def test_exact_zeros_are_explained_and_a_changed_zero_is_caught(
    tmp_path: Path,
) -> None:
    tl, ta = fx.rl_pair(drift=1.5e-5, seed=3)
    for t in (tl, ta):
        t["model.embed_tokens.weight"][:5] = 0.0  # unused vocabulary rows
    t["model.embed_tokens.weight"][5, :3] = -0.0
    pair = (
        fx.write_constituent(tmp_path / "len", tl, "len"),
        fx.write_constituent(tmp_path / "acc", ta, "acc"),
    )
    out = fx.write_release(*pair, tmp_path / "rel")
    report = run_audit(out, pair)
    assert statuses(report) == dict.fromkeys(A.CHECKS, "pass")
    fx.flip_bit(out, "model.embed_tokens.weight", 7, 0)  # 0 -> smallest subnormal
    fx.rehash(out)
    report = run_audit(out, pair)
    assert (
        report["checks"]["recompute"]["mismatches"]["model.embed_tokens.weight"][
            "first_flat_index"
        ]
        == 7
    )
    inf = report["checks"]["inference"]
    assert inf["disagreeing_tensors"] == {"model.embed_tokens.weight": 1}


def test_constituent_found_by_recorded_source(release: Path) -> None:
    report = A.audit(release)
    assert statuses(report) == dict.fromkeys(A.CHECKS, "pass")


def test_mergekit_merge_is_inferred_without_provenance(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    config = tmp_path / "merge.yml"
    config.write_text(
        f"merge_method: linear\nbase_model: {pair[1]}\ndtype: bfloat16\nmodels:\n"
        f"  - model: {pair[0]}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {pair[1]}\n    parameters: {{weight: 0.7}}\n"
    )
    out = tmp_path / "hub-merge"
    exe = Path(sys.executable).with_name("mergekit-yaml")
    subprocess.run([str(exe), str(config), str(out)], check=True, capture_output=True)
    report = run_audit(out, pair)
    assert statuses(report) == {
        "integrity": "skip",
        "lineage": "skip",
        "recompute": "skip",
        "inference": "pass",
    }
    assert report["ok"] is True
    lo, hi = report["checks"]["inference"]["w_interval"]
    assert lo <= 0.3 <= hi and hi - lo < 1e-4
    assert A.audit(out)["ok"] is False


def test_identical_constituents_fit_any_weight(pair: tuple[Path, Path]) -> None:
    report = A.audit(pair[0], len_dir=pair[0], acc_dir=pair[0])
    inf = report["checks"]["inference"]
    assert inf["status"] == "pass" and "any w" in inf["verdict"]
    assert inf["informative_tensors"] == 0


def small_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sample the fixture's tensors of more than 4096 elements: 512 of every 4096."""
    monkeypatch.setattr(A, "FULL_FIT", 4096)
    monkeypatch.setattr(A, "SAMPLE_BLOCK", 512)
    monkeypatch.setattr(A, "SAMPLE_EVERY", 8)


def test_sampled_fit_gives_an_interval_holding_the_full_one(
    release: Path, pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    full = run_audit(release, pair)["checks"]["inference"]
    assert full["elements_examined"] == full["elements"]
    small_sample(monkeypatch)
    report = run_audit(release, pair)
    assert set(statuses(report).values()) == {"pass"}
    inf = report["checks"]["inference"]
    assert inf["elements"] == full["elements"]
    assert inf["elements_examined"] < inf["elements"] / 4
    per = inf["per_tensor"][UP]
    assert (per["elements"], per["elements_examined"]) == (32768, 4096)
    (lo, hi), (full_lo, full_hi) = inf["w_interval"], full["w_interval"]
    assert lo <= full_lo <= 0.3 <= full_hi <= hi and hi - lo < 1e-3
    assert f"sample of {inf['elements_examined']:,} of" in inf["summary"]
    assert "sample" not in full["summary"]


def test_sampled_fit_refits_a_mismatching_tensor_in_full(
    release: Path, pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    small_sample(monkeypatch)
    fx.flip_bit(release, UP, 1234, 0)  # outside UP's sample: elements 0..511, 4096..
    report = run_audit(release, pair)
    assert statuses(report)["recompute"] == "fail"
    inf = report["checks"]["inference"]
    assert inf["status"] == "fail" and inf["disagreeing_tensors"] == {UP: 1}
    assert inf["per_tensor"][UP]["elements_examined"] == 32768
    assert inf["elements_examined"] < inf["elements"] / 4


def test_usage_errors_exit_2(
    release: Path, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    assert A.cli([str(release), "--len", str(pair[0])]) == 2
    assert A.cli([str(tmp_path / "nowhere")]) == 2
    assert A.cli([str(release), "--json", str(release / "audit.json")]) == 2
    assert not (release / "audit.json").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_neighbours_are_the_adjacent_representable_values(dtype: torch.dtype) -> None:
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    every = every.view(dtype)
    finite = every[torch.isfinite(every)].double().unique()  # sorted; -0 == +0
    picks = torch.tensor(
        [
            1.0,
            -1.0,
            0.75,
            -0.75,
            2.0**-14,
            -(2.0**-20),
            3.0e-3,
            1e-38,
            0.0,
            -0.0,
            100.0,
        ],
        dtype=dtype,
    )
    away, toward = A.neighbours(picks, picks.float())
    for v, up, down in zip(picks.tolist(), away.tolist(), toward.tolist(), strict=True):
        i = int(torch.searchsorted(finite, v))
        below, above = finite[i - 1].item(), finite[i + 1].item()
        if v == 0:
            assert {up, down} == {below, above}, v
        else:
            assert (up, down) == ((above, below) if v > 0 else (below, above)), v


def test_out_of_order_reads_are_correct_and_counted(pair: tuple[Path, Path]) -> None:
    tensors = load_file(str(pair[0] / "model.safetensors"))
    for cap, reread in ((A.PENDING_BYTES, False), (0, True)):
        ckpt = A.WeightStream(pair[0], pending_bytes=cap)
        for name in sorted(tensors, reverse=True):
            assert torch.equal(ckpt.get(name), tensors[name]), name
        ckpt.finish()
        assert (ckpt.bytes_read > ckpt.size) is reread


def test_stage_exits_nonzero_and_tags_the_release_version(
    release: Path, pair: tuple[Path, Path], tmp_path: Path, monkeypatch
) -> None:
    from stages import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.register_release("audit-test", release.name, release, {}, {}, {})
    out = tmp_path / "audit.json"
    argv = [str(release), "--len", str(pair[0]), "--acc", str(pair[1])]
    with pytest.raises(SystemExit) as exit_:
        A.main([*argv, "--json", str(out)])
    assert exit_.value.code == 0
    from mlflow import MlflowClient

    version = MlflowClient().get_model_version_by_alias(release.name, "released")
    assert version.tags["audit.ok"] == "true"
    assert version.tags["audit.recompute"] == "pass"
    assert abs(float(version.tags["audit.inferred_w"]) - 0.3) < 1e-4

    fx.flip_bit(release, UP, 7, 15)
    env = os.environ | {"PYTHONPATH": str(Path(A.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "stages.audit", *argv, "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 1, done.stderr
    assert "FAILED" in done.stdout and UP in done.stdout
    assert json.loads(out.read_text())["ok"] is False
    version = MlflowClient().get_model_version_by_alias(release.name, "released")
    assert version.tags["audit.ok"] == "false"


def test_the_verdict_goes_to_the_version_registered_from_this_folder(
    pair: tuple[Path, Path], tmp_path: Path, monkeypatch
) -> None:
    # A folder restored to an earlier release (as DVC's run cache would) while
    # @released names a later one: the verdict must not land on the later one.
    from mlflow import MlflowClient

    from stages import tracking
    from stages.release import write_release

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    rel = tmp_path / "models" / "rel"
    first = tracking.register_release(
        "t", "rel", write_release(*pair, 0.3, rel), {}, {}, {}
    )
    kept = tmp_path / "kept"
    shutil.copytree(rel, kept)
    second = tracking.register_release(
        "t", "rel", write_release(*pair, 0.4, rel), {}, {}, {}
    )
    assert first["provenance_sha256"] != second["provenance_sha256"]
    shutil.rmtree(rel)
    shutil.copytree(kept, rel)
    argv = [str(rel), "--len", str(pair[0]), "--acc", str(pair[1])]
    with pytest.raises(SystemExit) as exit_:
        A.main([*argv, "--json", str(tmp_path / "audit.json")])
    assert exit_.value.code == 0
    client = MlflowClient()
    assert (
        client.get_model_version_by_alias("rel", "released").version
        == second["version"]
    )
    tagged = client.get_model_version("rel", first["version"]).tags
    assert abs(float(tagged["audit.inferred_w"]) - 0.3) < 1e-4
    assert "audit.ok" not in client.get_model_version("rel", second["version"]).tags
