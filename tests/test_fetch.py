import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stages.cli import lock
from stages.fetch import FetchError, fetch, local_revision
from stages.hashing import sha256_file
from stages.lockfile import Pin, read_lock
from stages.params import Constituent


def model_folder(root: Path, seed: int = 0) -> Path:
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(4, 4, generator=g)}, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (root / "tokenizer.json").write_text("{}")
    (root / "train.py").write_text("print('never copied')\n")
    return root


def test_local_fetch_copies_safe_files_and_records_hashes(tmp_path):
    src = model_folder(tmp_path / "src")
    out = tmp_path / "data" / "constituents" / "len"
    prov = fetch("len", Constituent(str(src), None), None, out)

    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "provenance.json",
        "tokenizer.json",
    ]
    assert prov["files"]["model.safetensors"]["sha256"] == sha256_file(
        src / "model.safetensors"
    )
    on_disk = json.loads((out / "provenance.json").read_text())
    assert on_disk == prov
    assert on_disk["resolved_revision"] == local_revision(prov["files"])
    assert on_disk["resolved_revision"].startswith("local:")
    assert not list(out.parent.glob(".len.tmp-*"))


def test_content_id_changes_with_one_byte(tmp_path):
    a = fetch(
        "a",
        Constituent(str(model_folder(tmp_path / "a")), None),
        None,
        tmp_path / "out-a",
    )
    b = fetch(
        "b",
        Constituent(str(model_folder(tmp_path / "b", seed=1)), None),
        None,
        tmp_path / "out-b",
    )
    assert a["resolved_revision"] != b["resolved_revision"]


def test_pickle_only_folder_is_refused(tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    (src / "config.json").write_text("{}")
    with pytest.raises(FetchError, match=r"only pickle weights \(pytorch_model.bin\)"):
        fetch("len", Constituent(str(src), None), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_changed_source_after_lock_is_refused_with_the_fix(tmp_path):
    src = model_folder(tmp_path / "src")
    c = Constituent(str(src), None)
    out = tmp_path / "out"
    first = fetch("len", c, None, out)
    pin = Pin(str(src), None, first["resolved_revision"])
    save_file({"w": torch.zeros(4, 4)}, src / "model.safetensors")
    with pytest.raises(
        FetchError, match="changed since it was locked.*mergesweep lock"
    ):
        fetch("len", c, pin, out)
    assert json.loads((out / "provenance.json").read_text()) == first


def test_lock_pins_local_sources(tmp_path):
    src_len = model_folder(tmp_path / "len")
    src_acc = model_folder(tmp_path / "acc", seed=1)
    root = Path(__file__).resolve().parents[1]
    params = (root / "params.yaml").read_text()
    params = params.replace("data/embedded/len", str(src_len))
    params = params.replace("data/embedded/acc", str(src_acc))
    (tmp_path / "params.yaml").write_text(params)
    lock(tmp_path / "params.yaml", tmp_path / "constituents.lock.yaml")
    pins = read_lock(tmp_path / "constituents.lock.yaml")
    assert pins["len"].source == str(src_len)
    out = fetch("len", Constituent(str(src_len), None), pins["len"], tmp_path / "o")
    assert out["resolved_revision"] == pins["len"].resolved
    assert pins["acc"].resolved != pins["len"].resolved


def test_stage_ends_with_one_line_when_the_hub_is_offline(tmp_path):
    root = Path(__file__).resolve().parents[1]
    params = (root / "params.yaml").read_text()
    params = params.replace("data/embedded/len", "hf://org/len-model")
    (tmp_path / "params.yaml").write_text(params)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-m", "stages.fetch", "len", "--out", "data/len"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: fetch@len: model org/len-model@main")
    assert "HF_HUB_OFFLINE is set" in last
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data/len").exists()
