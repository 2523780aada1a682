"""The release folder: mergekit's exact tensors, donor files, atomicity, provenance."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import _merge_fixtures as fx
import pytest
import torch
import yaml

from stages import release as R
from stages.checkpoint import Checkpoint
from stages.merging import LM_HEAD, MergeError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("constituents")
    return {
        "len": fx.write_tiny(root / "len", seed=1, shards=2),
        "acc": fx.write_tiny(root / "acc", seed=2),
        "len_tied": fx.write_tiny(root / "len_tied", seed=1, tied=True),
        "acc_tied": fx.write_tiny(root / "acc_tied", seed=2, tied=True),
        "len_f32": fx.write_tiny(root / "len_f32", seed=1, dtype=torch.float32),
        "acc_v100": fx.write_tiny(root / "acc_v100", seed=2, vocab=100),
    }


def _mergekit_agrees(rel: Path, tmp: Path) -> None:
    mk = fx.run_mergekit(rel / "mergekit_config.yml", tmp / "mergekit-out")
    assert fx.differing_tensors(rel, mk) == []


def test_release_is_bit_identical_to_mergekit(tiny: dict, tmp_path: Path) -> None:
    rel = R.write_release(tiny["len"], tiny["acc"], 0.3, tmp_path / "m" / "rel")
    cfg = yaml.safe_load((rel / "mergekit_config.yml").read_text())
    assert [m["model"] for m in cfg["models"]] == [str(tiny["len"]), str(tiny["acc"])]
    assert cfg["base_model"] == str(tiny["acc"])
    assert (cfg["dtype"], cfg["out_dtype"]) == ("float32", "bfloat16")
    _mergekit_agrees(rel, tmp_path)


@pytest.mark.parametrize("pair", [("len_tied", "acc"), ("len", "acc_tied")])
def test_one_tied_constituent_matches_mergekit(
    tiny: dict, tmp_path: Path, pair
) -> None:
    rel = R.write_release(tiny[pair[0]], tiny[pair[1]], 0.3, tmp_path / "rel")
    assert LM_HEAD in Checkpoint(rel).tensors
    config = json.loads((rel / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    _mergekit_agrees(rel, tmp_path)


def test_both_tied_stays_tied_and_matches_mergekit(tiny: dict, tmp_path: Path):
    rel = R.write_release(tiny["len_tied"], tiny["acc_tied"], 0.3, tmp_path / "rel")
    assert LM_HEAD not in Checkpoint(rel).tensors
    donor = (tiny["acc_tied"] / "config.json").read_text()
    assert (rel / "config.json").read_text() == donor
    _mergekit_agrees(rel, tmp_path)


def test_mixed_dtypes_refused_unless_dtype_given(tiny: dict, tmp_path: Path) -> None:
    with pytest.raises(MergeError, match="len has float32, acc has bfloat16"):
        R.write_release(tiny["len_f32"], tiny["acc"], 0.3, tmp_path / "rel")
    assert list(tmp_path.iterdir()) == []
    rel = R.write_release(
        tiny["len_f32"], tiny["acc"], 0.3, tmp_path / "rel", dtype="bfloat16"
    )
    assert Checkpoint(rel).dtypes() == {torch.bfloat16}
    _mergekit_agrees(rel, tmp_path)


def test_weights_zero_and_one_give_the_constituent_tensors(tiny: dict, tmp_path: Path):
    for w, want in ((1.0, "len"), (0.0, "acc")):
        rel = R.write_release(tiny["len"], tiny["acc"], w, tmp_path / f"w{w}")
        assert fx.differing_tensors(rel, tiny[want]) == []


def test_folder_contents_and_provenance(tiny: dict, tmp_path: Path) -> None:
    row = {"weight": 0.3, "accuracy": 0.625, "mean_tokens": 88.5, "n": 16}
    rel = R.write_release(
        tiny["len"],
        tiny["acc"],
        0.3,
        tmp_path / "rel",
        shard_size=10_000,
        eval_table=row,
    )
    names = sorted(p.name for p in rel.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in names
    for f in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert f in names
    assert {"mergekit_config.yml", "README.md", "provenance.json"} <= set(names)
    donor = (tiny["acc"] / "config.json").read_text()
    assert (rel / "config.json").read_text() == donor  # bfloat16 already: no change
    gen = tiny["acc"] / "generation_config.json"
    assert (rel / "generation_config.json").read_bytes() == gen.read_bytes()

    prov = json.loads((rel / "provenance.json").read_text())
    assert prov["format"] == "mergesweep-release/1" and prov["donor"] == "acc"
    assert prov["weights"] == {"len": 0.3, "acc": 0.7} and prov["dtype"] == "bfloat16"
    assert set(prov["files"]) == set(names) - {"provenance.json"}
    for name, entry in prov["files"].items():
        data = (rel / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    src = prov["constituents"]["len"]
    assert src["source"] == str(tiny["len"])
    assert src["resolved_revision"].startswith("local:")
    assert "model-00001-of-00002.safetensors" in src["files"]
    assert prov["packages"]["torch"] == torch.__version__
    assert prov["git_commit"] is None or len(prov["git_commit"]) == 40

    card = (rel / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == [str(tiny["len"]), str(tiny["acc"])]
    assert meta["library_name"] == "transformers" and "merge" in meta["tags"]
    assert "| all | 0.625 | 88.5 | 16 |" in card


def test_constituent_provenance_json_is_used(tiny: dict, tmp_path: Path) -> None:
    import shutil

    acc = tmp_path / "acc"
    shutil.copytree(tiny["acc"], acc)
    files = {
        p.name: {"sha256": "0" * 64, "size": p.stat().st_size} for p in acc.iterdir()
    }
    prov = {"format": "mergesweep-constituent/1", "name": "acc", "files": files}
    prov |= {"source": "hf://org/acc", "resolved_revision": "a" * 40}
    (acc / "provenance.json").write_text(json.dumps(prov))
    rel = R.write_release(tiny["len"], acc, 0.3, tmp_path / "rel")
    out = json.loads((rel / "provenance.json").read_text())
    assert out["constituents"]["acc"] == prov
    cfg = yaml.safe_load((rel / "mergekit_config.yml").read_text())
    assert cfg["base_model"] == f"org/acc@{'a' * 40}"
    meta = yaml.safe_load((rel / "README.md").read_text().split("---")[1])
    assert meta["base_model"][1] == "org/acc"
    (acc / "config.json").write_text("{}")
    with pytest.raises(MergeError, match="config.json: .*records .* bytes"):
        R.write_release(tiny["len"], acc, 0.3, tmp_path / "rel2")


def test_config_edit_changes_only_the_dtype() -> None:
    raw = '{\n  "sliding_window": 4096,\n  "torch_dtype": "bfloat16",\n  "x": null\n}\n'
    new = R.edit_config(raw, "float16")
    assert new == raw.replace('"bfloat16"', '"float16"')
    both = '{"dtype": "float32", "torch_dtype": "float32", "tie_word_embeddings": true}'
    assert R.edit_config(both, "bfloat16", untie=True) == (
        '{"dtype": "bfloat16", "torch_dtype": "bfloat16", "tie_word_embeddings": false}'
    )
    nested = '{"dtype": "float32", "text_config": {"dtype": "float32"}}'
    with pytest.raises(MergeError, match="cannot change top-level dtype alone"):
        R.edit_config(nested, "bfloat16")


def test_a_failed_merge_leaves_nothing(tiny: dict, tmp_path: Path) -> None:
    acc = tmp_path / "acc"
    acc.mkdir()
    for p in tiny["acc"].iterdir():
        (acc / p.name).write_bytes(p.read_bytes())
    ckpt = Checkpoint(acc)
    info = ckpt.tensors["model.norm.weight"]
    with open(info.file, "r+b") as f:  # the last tensor merged: earlier shards exist
        f.seek(info.offset)
        f.write(
            torch.tensor([float("inf")], dtype=torch.bfloat16).view(torch.uint8).numpy()
        )
    with pytest.raises(MergeError, match="model.norm.weight: the merge gives inf"):
        R.write_release(
            tiny["len"], acc, 0.3, tmp_path / "out" / "rel", shard_size=4000
        )
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_folder_only_replaced_when_a_release(
    tiny: dict, tmp_path: Path
) -> None:
    out = tmp_path / "rel"
    R.write_release(tiny["len"], tiny["acc"], 0.3, out)
    R.write_release(tiny["len"], tiny["acc"], 0.5, out)
    assert json.loads((out / "provenance.json").read_text())["weights"]["len"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel"]
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(MergeError, match="exists and is not a mergesweep release"):
        R.write_release(tiny["len"], tiny["acc"], 0.3, other)


def test_cli_exit_codes_and_messages(tiny: dict, tmp_path: Path, capsys) -> None:
    base = ["--len", str(tiny["len"]), "--acc", str(tiny["acc"])]
    out = ["--out", str(tmp_path / "rel")]
    assert R.cli(base + out) == 2  # --weight missing
    assert R.cli(base + out + ["--weight", "1.5"]) == 2
    assert "weight must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert R.cli(base + out + ["--weight", "0.3", "--shard-size", "lots"]) == 2
    assert "--shard-size must be a byte count" in capsys.readouterr().err
    bad = ["--len", str(tiny["len"]), "--acc", str(tiny["acc_v100"])]
    assert R.cli(bad + out + ["--weight", "0.3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "embedding rows" in err and "100" in err
    args = (
        base + out + ["--weight", "1.5", "--allow-out-of-range", "--dtype", "float32"]
    )
    assert R.cli(args) == 0
    rel = Checkpoint(tmp_path / "rel")
    assert rel.dtypes() == {torch.float32}
    assert '"torch_dtype": "float32"' in (tmp_path / "rel" / "config.json").read_text()


def test_stage_main_reads_params_and_the_sweep_row(tiny: dict, tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["release"] |= {"weight": 0.3, "name": "tiny-rel", "shard_size": "1MB"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rows = [{"weight": w, "accuracy": 0.5 + w, "n": 8} for w in (0.0, 0.3, 1.0)]
    (tmp_path / "results.json").write_text(json.dumps(rows))
    out = R.main(
        ["--len", str(tiny["len"]), "--acc", str(tiny["acc"]), "--out", str(tmp_path)]
        + ["--results", str(tmp_path / "results.json")]
        + ["--params", str(tmp_path / "params.yaml")]
    )
    assert out == tmp_path / "tiny-rel"
    assert "| all | 0.8 | 8 |" in (out / "README.md").read_text()


@pytest.fixture(scope="session")
def realshape(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from benchmarks.realshape import make_checkpoints

    return make_checkpoints(tmp_path_factory.mktemp("realshape"), layers=1)


def test_real_shapes_match_mergekit(
    realshape: tuple[Path, Path], tmp_path: Path
) -> None:
    rel = R.write_release(*realshape, 0.3, tmp_path / "rel", shard_size=500_000_000)
    assert len(list(rel.glob("*.safetensors"))) == 3
    _mergekit_agrees(rel, tmp_path)


def test_a_killed_run_leaves_no_release(realshape: tuple[Path, Path], tmp_path: Path):
    out = tmp_path / "models" / "rel"
    cmd = [sys.executable, "-c", "import sys; from stages.release import cli; cli()"]
    cmd += ["--len", str(realshape[0]), "--acc", str(realshape[1]), "--weight", "0.3"]
    proc = subprocess.Popen(
        cmd + ["--out", str(out)], cwd=ROOT, stderr=subprocess.DEVNULL, env=os.environ
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        tmps = list((tmp_path / "models").glob(".rel.tmp-*/*.safetensors"))
        if tmps and tmps[0].stat().st_size > 50_000_000:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmps, "the merge never started writing"
    assert not out.exists()
