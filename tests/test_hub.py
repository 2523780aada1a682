"""stages.hub against tests/hubserver.py: revisions, verified downloads, errors.

huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME once, at import, so each
client call runs in a fresh subprocess started with the environment the test set.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hubserver import HubServer
from safetensors.torch import save

from stages import hub as hubmod

ROOT = Path(__file__).resolve().parents[1]
READER, OUTSIDER = "hf_reader_token", "hf_outsider_token"
CHUNK = 10 * 1024 * 1024  # huggingface_hub's DOWNLOAD_CHUNK_SIZE: unit of resume
RUNNER = """
import dataclasses, json, sys
from pathlib import Path
from stages import hub
outs = []
for spec in json.loads(sys.argv[1]):
    args = [Path(a[5:]) if str(a).startswith("path:") else a for a in spec["args"]]
    try:
        out = getattr(hub, spec["fn"])(*args, **spec["kwargs"])
        outs.append({"ok": out})
    except hub.HubError as err:
        outs.append({"error": type(err).__name__, "message": str(err)})
print(json.dumps(outs, default=dataclasses.astuple))
"""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sharded_model(seed: int = 0) -> dict[str, bytes]:
    """A two-shard safetensors model with index, config, tokenizer and unsafe extras."""
    g = torch.Generator().manual_seed(seed)
    shard1 = save({"embed.weight": torch.randn(8, 4, generator=g)})
    shard2 = save({"lm_head.weight": torch.randn(8, 4, generator=g)})
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {
        "metadata": {"total_size": 2 * 8 * 4 * 4},
        "weight_map": {"embed.weight": names[0], "lm_head.weight": names[1]},
    }
    return {
        names[0]: shard1,
        names[1]: shard2,
        hubmod.INDEX_NAME: json.dumps(index).encode(),
        "config.json": json.dumps({"model_type": "qwen2", "seed": seed}).encode(),
        "generation_config.json": b'{"do_sample": true}',
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": b'{"chat_template": "<think>"}',
        "README.md": b"# tiny\n",
        "consolidated.safetensors": shard1 + shard2,
        "modeling_qwen2.py": b"import os\n",
        "pytorch_model.bin": b"\x80\x04pickle",
        "docs/extra.safetensors": shard1,
    }


def big_model() -> dict[str, bytes]:
    """One 12 MiB safetensors file: more than one download chunk, so resume shows."""
    g = torch.Generator().manual_seed(1)
    weights = save({"w": torch.randn(3 * 1024 * 1024, generator=g)})
    return {"model.safetensors": weights, "config.json": b"{}"}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    with HubServer(tokens={READER, OUTSIDER}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


def calls(*specs: tuple) -> list[dict]:
    """Run (fn, *args[, kwargs]) calls of stages.hub in one fresh interpreter.

    Each result is {"ok": value} or {"error": class name, "message": text}, plus the
    interpreter's "stderr".
    """
    payload = []
    for fn, *args in specs:
        kwargs = args.pop() if args and isinstance(args[-1], dict) else {}
        args = [f"path:{a}" if isinstance(a, Path) else a for a in args]
        payload.append({"fn": fn, "args": args, "kwargs": kwargs})
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(payload)],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = json.loads(proc.stdout.strip().splitlines()[-1])
    return [dict(out, stderr=proc.stderr) for out in outs]


def call(fn: str, *args: object, **kwargs: object) -> dict:
    """One call of stages.hub.<fn> in a fresh interpreter."""
    return calls((fn, *args, kwargs))[0]


def expected_manifest(files: dict[str, bytes], names: list[str]) -> dict[str, dict]:
    return {n: {"sha256": sha256(files[n]), "size": len(files[n])} for n in names}


SAFE = sorted(
    [
        "README.md",
        "config.json",
        "generation_config.json",
        hubmod.INDEX_NAME,
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
)


# Sources and revisions


@pytest.mark.parametrize(
    ("source", "parsed"),
    [
        (
            "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
            ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "model"),
        ),  # noqa: E501
        ("hf://datasets/HuggingFaceH4/MATH-500", ("HuggingFaceH4/MATH-500", "dataset")),
        ("hf://models/o/m", ("o/m", "model")),
        ("data/embedded/len", None),
        ("/abs/path", None),
    ],
)
def test_parse_source(source: str, parsed: tuple[str, str] | None) -> None:
    assert hubmod.parse_source(source) == parsed


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("hf://", "malformed"),
        ("hf://gpt2", "malformed"),
        ("hf://a/b/c/d", "malformed"),
        ("hf:/o/m", "malformed"),
        ("hf://o/m@main", "revision"),
        ("hf://spaces/o/m", "spaces"),
        ("hf://o/a--b", "'--'"),
        ("hf://o/-bad", "malformed"),
    ],
)
def test_parse_source_rejects(source: str, says: str) -> None:
    with pytest.raises(hubmod.HubSourceError, match=says) as err:
        hubmod.parse_source(source)
    assert repr(source) in str(err.value)


def test_resolve_branch_tag_and_commit(hub: HubServer) -> None:
    hub.add_repo("o/m")
    first = hub.commit("o/m", sharded_model(0), tag="v1")
    second = hub.commit("o/m", sharded_model(1))
    main, v1, pinned, missing, nope = calls(
        ("resolve_revision", "o/m", "main"),
        ("resolve_revision", "o/m", "v1"),
        ("resolve_revision", "o/m", first.upper()),
        ("resolve_revision", "o/m", "f" * 40),
        ("resolve_revision", "o/m", "nope"),
    )
    assert (main["ok"], v1["ok"], pinned["ok"]) == (second, first, first)
    assert missing["error"] == "HubNotFoundError"
    assert "revision" in missing["message"] and "check the branch" in missing["message"]
    assert nope["error"] == "HubNotFoundError"


def test_short_sha_refused_before_any_request(hub: HubServer) -> None:
    hub.add_repo("o/m")
    sha = hub.commit("o/m", sharded_model())
    out = call("resolve_revision", "o/m", sha[:7])
    assert out["error"] == "HubRevisionError"
    assert "full 40-hex commit" in out["message"] and sha[:7] in out["message"]
    assert hub.seen(contains="/api/models/") == []


def test_branch_that_moves_between_runs(hub: HubServer, tmp_path: Path) -> None:
    hub.add_repo("o/m")
    old_files, new_files = sharded_model(0), sharded_model(1)
    old = hub.commit("o/m", old_files)
    assert call("resolve_revision", "o/m", "main")["ok"] == old
    new = hub.commit("o/m", new_files)
    assert call("resolve_revision", "o/m", "main")["ok"] == new != old

    got_new, got_old = (
        out["ok"]
        for out in calls(
            ("download_snapshot", "o/m", new, tmp_path / "new"),
            ("download_snapshot", "o/m", old, tmp_path / "old"),
        )
    )
    assert got_new == expected_manifest(new_files, SAFE)
    assert got_old == expected_manifest(old_files, SAFE)
    assert (tmp_path / "old/config.json").read_bytes() == old_files["config.json"]
    assert (tmp_path / "new/config.json").read_bytes() == new_files["config.json"]


# Downloads


def test_snapshot_takes_only_safe_files_verified(
    hub: HubServer, tmp_path: Path
) -> None:
    hub.page_size = 3  # the tree listing comes in pages, as on the hub
    hub.add_repo("o/m")
    files = sharded_model()
    sha = hub.commit("o/m", files)
    dest = tmp_path / "constituents" / "len"
    out = call("download_snapshot", "o/m", sha, dest)["ok"]

    assert out == expected_manifest(files, SAFE)
    assert sorted(p.name for p in dest.iterdir()) == SAFE
    for name in SAFE:
        assert (dest / name).read_bytes() == files[name]
    fetched = {s.path for s in hub.seen("GET")} | {s.path for s in hub.seen("HEAD")}
    for unsafe in ("modeling_qwen2.py", "pytorch_model.bin", "consolidated", "docs/"):
        assert not any(unsafe in p for p in fetched), unsafe
    assert len(hub.seen("GET", "cursor=")) >= 2
    assert sorted(p.name for p in dest.parent.iterdir()) == ["len"]


def test_dataset_files(hub: HubServer, tmp_path: Path) -> None:
    hub.add_repo("o/d", repo_type="dataset")
    data = {"test.jsonl": b'{"problem": "1+1", "answer": "2"}\n', "README.md": b"x"}
    sha = hub.commit("o/d", data, repo_type="dataset")
    assert call("resolve_revision", "o/d", "main", repo_type="dataset")["ok"] == sha
    out = call(
        "download_files",
        "o/d",
        sha,
        ["test.jsonl"],
        tmp_path / "d",
        repo_type="dataset",
    )
    assert out["ok"] == expected_manifest(data, ["test.jsonl"])
    assert hub.seen("GET", "/datasets/o/d/resolve/")


def test_pickle_only_repo_refused(hub: HubServer, tmp_path: Path) -> None:
    hub.add_repo("o/old")
    sha = hub.commit("o/old", {"pytorch_model.bin": b"\x80\x04", "config.json": b"{}"})
    out = call("download_snapshot", "o/old", sha, tmp_path / "m")
    assert out["error"] == "HubUnsafeRepoError"
    assert "only pickle weights (pytorch_model.bin)" in out["message"]
    assert hub.seen(contains="/resolve/") == []
    assert not (tmp_path / "m").exists()


def test_index_names_a_missing_shard(hub: HubServer, tmp_path: Path) -> None:
    files = sharded_model()
    del files["model-00002-of-00002.safetensors"]
    hub.add_repo("o/m")
    sha = hub.commit("o/m", files)
    out = call("download_snapshot", "o/m", sha, tmp_path / "m")
    assert out["error"] == "HubIncompleteError"
    assert "model-00002-of-00002.safetensors" in out["message"]
    assert hub.seen(contains="model-00001") == []
    assert not (tmp_path / "m").exists()


def test_short_shard_named(hub: HubServer, tmp_path: Path) -> None:
    files = sharded_model()
    name = "model-00002-of-00002.safetensors"
    files[name] = files[name][:-16]
    hub.add_repo("o/m")
    sha = hub.commit("o/m", files)
    out = call("download_snapshot", "o/m", sha, tmp_path / "m")
    assert out["error"] == "HubIncompleteError"
    assert f"shard {name} is short" in out["message"]
    assert not (tmp_path / "m").exists()


def test_wrong_bytes_detected_then_clean_rerun(hub: HubServer, tmp_path: Path) -> None:
    files = sharded_model()
    name = "model-00001-of-00002.safetensors"
    hub.add_repo("o/m")
    sha = hub.commit("o/m", files)
    hub.faults.corrupt.add(name)
    dest = tmp_path / "m"
    out = call("download_snapshot", "o/m", sha, dest)
    assert out["error"] == "HubIntegrityError"
    assert (
        name in out["message"] and f"expected {sha256(files[name])}" in out["message"]
    )
    assert not dest.exists()
    staging = hubmod.partial_dir(dest, "o/m", sha, repo_type="model")
    assert not (staging / name).exists()
    assert not (staging / (name + ".incomplete")).exists()

    hub.faults.corrupt.clear()
    assert call("download_snapshot", "o/m", sha, dest)["ok"] == expected_manifest(
        files, SAFE
    )


def test_dropped_connection_resumes_within_the_call(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = big_model()
    hub.add_repo("o/big")
    sha = hub.commit("o/big", files)
    hub.faults.drop_after["model.safetensors"] = [CHUNK + 1000]
    monkeypatch.setenv("TQDM_POSITION", "-1")  # bars on, though stderr is no tty
    out = call("download_snapshot", "o/big", sha, tmp_path / "m")
    assert out["ok"] == expected_manifest(files, ["config.json", "model.safetensors"])
    ranges = [s.headers.get("Range") for s in hub.seen("GET", "/lfs/")]
    assert ranges == [None, f"bytes={CHUNK}-"]
    # A bar for the 12 MiB file, none for the 2-byte config.
    assert "model.safetensors" in out["stderr"] and "100%" in out["stderr"]
    assert "config.json: " not in out["stderr"]


def test_interrupted_download_resumes_on_next_run(
    hub: HubServer, tmp_path: Path
) -> None:
    files = big_model()
    hub.add_repo("o/big")
    sha = hub.commit("o/big", files)
    hub.faults.drop_after["model.safetensors"] = [CHUNK + 1000] * 20
    dest = tmp_path / "m"
    first = call("download_snapshot", "o/big", sha, dest)
    assert first["error"] == "HubInterruptedError"
    assert "run again to resume" in first["message"]
    assert not dest.exists()
    staging = hubmod.partial_dir(dest, "o/big", sha, repo_type="model")
    part = staging / "model.safetensors.incomplete"
    assert part.stat().st_size == CHUNK
    assert not str(part).startswith(str(dest) + os.sep)

    hub.faults.drop_after.clear()
    before = len(hub.seen("GET", "/lfs/"))
    second = call("download_snapshot", "o/big", sha, dest)
    assert second["ok"] == expected_manifest(
        files, ["config.json", "model.safetensors"]
    )
    resumed = hub.seen("GET", "/lfs/")[before:]
    assert [s.headers.get("Range") for s in resumed] == [f"bytes={CHUNK}-"]
    assert not staging.exists()


def test_disk_space_checked_before_first_byte(hub: HubServer, tmp_path: Path) -> None:
    hub.add_repo("o/m")
    sha = hub.commit("o/m", sharded_model())
    hub.faults.advertised_size["model-00002-of-00002.safetensors"] = 10**16
    out = call("download_snapshot", "o/m", sha, tmp_path / "m")
    assert out["error"] == "HubDiskSpaceError"
    assert "10000000.00 GB" in out["message"] and "free" in out["message"]
    assert hub.seen(contains="model-0000") == []


def test_destination_must_be_empty(hub: HubServer, tmp_path: Path) -> None:
    hub.add_repo("o/m")
    sha = hub.commit("o/m", sharded_model())
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "stale.txt").write_text("x")
    out = call("download_snapshot", "o/m", sha, tmp_path / "m")
    assert out["error"] == "HubDestinationError"
    (tmp_path / "m" / "stale.txt").unlink()
    assert "ok" in call("download_snapshot", "o/m", sha, tmp_path / "m")


# Errors a person can act on


def test_private_repo_needs_a_token(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_repo("o/private", private=True, readers={READER})
    hub.commit("o/private", sharded_model())
    out = call("resolve_revision", "o/private", "main")
    assert out["error"] == "HubAuthError"
    assert "HF_TOKEN" in out["message"] and "hf auth login" in out["message"]
    assert len(hub.seen(contains="/api/models/o/private")) == 1  # no retry on a 4xx

    monkeypatch.setenv("HF_TOKEN", "hf_revoked")
    out = call("resolve_revision", "o/private", "main")
    assert out["error"] == "HubAuthError"
    monkeypatch.setenv("HF_TOKEN", READER)
    assert "ok" in call("resolve_revision", "o/private", "main")


def test_gated_repo_says_accept_the_terms(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hub.add_repo("o/gated", gated=True, readers={READER})
    files = sharded_model()
    hub.commit("o/gated", files)
    # As on the hub, a gated repo's metadata is public; its files are not.
    sha = call("resolve_revision", "o/gated", "main")["ok"]
    for token in (None, OUTSIDER):
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        before = len(hub.requests)
        out = call("download_snapshot", "o/gated", sha, tmp_path / "m")
        assert out["error"] == "HubGatedError"
        assert "accept its terms" in out["message"] and "HF_TOKEN" in out["message"]
        assert f"{hub.endpoint}/o/gated" in out["message"]
        resolves = [s for s in hub.requests[before:] if "/resolve/" in s.path]
        assert [s.method for s in resolves] == ["HEAD"]
        assert not (tmp_path / "m").exists()
    monkeypatch.setenv("HF_TOKEN", READER)
    out = call("download_snapshot", "o/gated", sha, tmp_path / "m")
    assert out["ok"] == expected_manifest(files, SAFE)


def test_missing_repo(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without a token the hub answers 401 for a missing repo, as for a private one.
    out = call("resolve_revision", "o/nothing", "main")
    assert out["error"] == "HubAuthError" and "does not exist" in out["message"]
    monkeypatch.setenv("HF_TOKEN", READER)
    out = call("resolve_revision", "o/nothing", "main")
    assert out["error"] == "HubNotFoundError"
    assert "check the owner/name" in out["message"]
    assert len(hub.seen(contains="/api/models/o/nothing")) == 2


def test_missing_file(hub: HubServer, tmp_path: Path) -> None:
    hub.add_repo("o/d", repo_type="dataset")
    sha = hub.commit("o/d", {"a.jsonl": b"{}\n"}, repo_type="dataset")
    out = call(
        "download_files", "o/d", sha, ["b.jsonl"], tmp_path / "d", repo_type="dataset"
    )
    assert out["error"] == "HubNotFoundError" and "b.jsonl" in out["message"]


def test_offline_mode_sends_nothing(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_repo("o/m")
    hub.commit("o/m", sharded_model())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = call("resolve_revision", "o/m", "main")
    assert out["error"] == "HubOfflineError"
    assert "unset HF_HUB_OFFLINE" in out["message"]
    assert hub.requests == []


def test_network_down(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = call("resolve_revision", "o/m", "main")
    assert out["error"] == "HubOfflineError"
    assert "check the network" in out["message"]


def test_server_paths_info_matches_tree(hub: HubServer) -> None:
    """The paths-info endpoint answers huggingface_hub's own client the same way."""
    hub.add_repo("o/m")
    files = sharded_model()
    sha = hub.commit("o/m", files)
    code = (
        "import json; from huggingface_hub import HfApi; "
        f"r = HfApi().get_paths_info('o/m', ['config.json', "
        f"'model-00001-of-00002.safetensors', 'absent'], revision='{sha}'); "
        "print(json.dumps([[f.path, f.size, f.blob_id, f.lfs and f.lfs.sha256] "
        "for f in r]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    got = json.loads(proc.stdout)
    listed = call("list_files", "o/m", sha)["ok"]
    name = "model-00001-of-00002.safetensors"
    assert got == [
        ["config.json", *listed["config.json"][1:3], None],
        [name, len(files[name]), listed[name][2], sha256(files[name])],
    ]


def test_hub_down_5xx_is_its_own_error(hub: HubServer) -> None:
    hub.add_repo("o/m")
    hub.commit("o/m", sharded_model())
    hub.faults.status["/api/models/o/m"] = 503
    out = call("resolve_revision", "o/m", "main")
    assert out["error"] == "HubServerError" and "503" in out["message"]


def test_rerun_reuses_verified_files_and_refetches_damaged_ones(
    hub: HubServer, tmp_path: Path
) -> None:
    files = sharded_model()
    first, second = (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    )
    hub.add_repo("o/m")
    sha = hub.commit("o/m", files)
    hub.faults.corrupt.add(second)
    dest = tmp_path / "m"
    assert call("download_snapshot", "o/m", sha, dest)["error"] == "HubIntegrityError"
    staged = hubmod.partial_dir(dest, "o/m", sha, repo_type="model") / first
    damaged = bytearray(staged.read_bytes())
    damaged[-1] ^= 0xFF
    staged.write_bytes(bytes(damaged))

    hub.faults.corrupt.clear()
    before = len(hub.requests)
    out = call("download_snapshot", "o/m", sha, dest)
    assert out["ok"] == expected_manifest(files, SAFE)
    again = [s.path for s in hub.requests[before:] if s.method == "GET"]
    assert any(first in p for p in again) and any(second in p for p in again)
    assert not any(p.endswith("/config.json") for p in again)
