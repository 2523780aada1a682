"""hf:// constituents through DVC, against the local hub of tests/hubserver.py."""

import json
import os
from pathlib import Path

import pytest
import torch
from _repo import copy_repo, edit_params, run, stages_run
from hubserver import HubServer
from safetensors.torch import save

from stages.lockfile import read_lock


def model(seed: int) -> dict[str, bytes]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.safetensors": save({"w": torch.randn(8, 8, generator=g)}),
        "config.json": json.dumps({"model_type": "qwen2", "seed": seed}).encode(),
        "tokenizer.json": b'{"version": "1.0"}',
        "pytorch_model.bin": b"\x80\x04never taken",
    }


@pytest.fixture
def hub(tmp_path: Path):
    with HubServer() as server:
        env = dict(os.environ, HF_ENDPOINT=server.endpoint)
        env["HF_HOME"] = str(tmp_path / "hf_home")
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
            env.pop(key, None)
        yield server, env


def test_moved_branch_refetches_that_constituent_only(hub, tmp_path):
    server, env = hub
    for name, seed in (("len", 0), ("acc", 1)):
        server.add_repo(f"o/{name}")
        server.commit(f"o/{name}", model(seed))
    repo = copy_repo(tmp_path / "repo")
    edit_params(
        repo,
        {
            "constituents.len.source": "hf://o/len",
            "constituents.len.revision": "main",
            "constituents.acc.source": "hf://o/acc",
            "constituents.acc.revision": "main",
        },
    )
    fetches = ("fetch@len", "fetch@acc")
    run(repo, "mergesweep", "lock", env=env)
    first = read_lock(repo / "constituents.lock.yaml")
    assert stages_run(run(repo, "dvc", "repro", *fetches, env=env)) == set(fetches)
    prov = json.loads((repo / "data/constituents/len/provenance.json").read_text())
    assert prov["resolved_revision"] == first["len"].resolved
    assert prov["requested_revision"] == "main"
    assert "pytorch_model.bin" not in prov["files"]

    moved = server.commit("o/len", model(2))
    # Until the lock moves, DVC has nothing to rerun: the pipeline stays pinned.
    assert stages_run(run(repo, "dvc", "repro", *fetches, env=env)) == set()
    run(repo, "mergesweep", "lock", env=env)
    second = read_lock(repo / "constituents.lock.yaml")
    assert second["len"].resolved == moved != first["len"].resolved
    assert second["acc"] == first["acc"]
    assert stages_run(run(repo, "dvc", "repro", *fetches, env=env)) == {"fetch@len"}
    prov = json.loads((repo / "data/constituents/len/provenance.json").read_text())
    assert prov["resolved_revision"] == moved
