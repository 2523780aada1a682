"""stages.suites: the six math suites, fetched from tests/hubserver.py and converted."""

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hubserver import HubServer

from stages import suites

ROOT = Path(__file__).resolve().parents[1]


def parquet(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


TRAIN = "data/train-00000-of-00001.parquet"

# Each repo laid out and typed as on the hub (fields from the Open-RS loaders).
REPOS: dict[str, dict[str, bytes]] = {
    "HuggingFaceH4/aime_2024": {
        TRAIN: parquet(
            [
                {
                    "id": 60,
                    "problem": "Find $x$. ",
                    "solution": "... \\boxed{204}",
                    "answer": "204",
                    "url": "u",
                    "year": "2024",
                },
                {
                    "id": 61,
                    "problem": "Find $y$.",
                    "solution": "no box",
                    "answer": "025",
                    "url": "u",
                    "year": "2024",
                },
            ]
        ),
        "README.md": b"aime 2024\n",
    },
    "yentinglin/aime_2025": {
        "data/train-00000-of-00001-243207c6c994e1bd.parquet": parquet(
            [{"problem": "P1", "answer": 70}, {"problem": "P2", "answer": 588}]
        ),
    },
    "knoveleng/AMC-23": {
        TRAIN: parquet(
            [
                {"id": 0, "url": "u", "question": "q", "problem": "A1", "answer": 27.0},
                {"id": 1, "url": "u", "question": "q", "problem": "A2", "answer": 0.5},
            ]
        ),
    },
    "HuggingFaceH4/MATH-500": {
        "test.jsonl": jsonl(
            [
                {
                    "problem": "M1",
                    "solution": "so \\boxed{\\frac{1}{2}}",
                    "answer": "\\frac{1}{2}",
                    "subject": "Algebra",
                    "level": 2,
                    "unique_id": "test/algebra/1.json",
                },
            ]
        ),
    },
    "knoveleng/Minerva-Math": {
        TRAIN: parquet(
            [
                {
                    "problem": "Mi1",
                    "type": "t",
                    "idx": 0,
                    "solution": "first \\boxed{1} then \\boxed{\\frac{a}{b^{2}}}.",
                },
                {
                    "problem": "Mi2",
                    "type": "t",
                    "idx": 1,
                    "solution": "Thus $\\boxed{1.3 \\times 10^{-7}}$",
                },
            ]
        ),
    },
    "knoveleng/OlympiadBench": {
        TRAIN: parquet(
            [
                {
                    "id": 1,
                    "question": "O1",
                    "solution": ["s"],
                    "final_answer": ["$\\frac{\\sqrt{3}}{2}$"],
                    "answer": "$\\frac{\\sqrt{3}}{2}$",
                    "is_multiple_answer": False,
                },
            ]
        ),
        "data/test-00000-of-00001.parquet": parquet(
            [{"id": 2, "question": "not this split", "answer": "0"}]
        ),
    },
}

EXPECTED = {
    "aime24": [
        {"question": "Find $x$.", "answer": "204"},
        {"question": "Find $y$.", "answer": "025"},
    ],
    "aime25": [{"question": "P1", "answer": "70"}, {"question": "P2", "answer": "588"}],
    "amc23": [{"question": "A1", "answer": "27"}, {"question": "A2", "answer": "0.5"}],
    "math500": [{"question": "M1", "answer": "\\frac{1}{2}"}],
    "minerva": [
        {"question": "Mi1", "answer": "\\frac{a}{b^{2}}"},
        {"question": "Mi2", "answer": "1.3 \\times 10^{-7}"},
    ],
    "olympiadbench": [{"question": "O1", "answer": "$\\frac{\\sqrt{3}}{2}$"}],
}


def serve(server: HubServer, repos: dict[str, dict[str, bytes]]) -> dict[str, str]:
    """Publish the repos; pinned suites get their pinned commit, then a newer main."""
    commits = {}
    for suite in suites.SUITES:
        server.add_repo(suite.repo, repo_type="dataset")
        pinned = len(suite.revision) == 40
        sha = suite.revision if pinned else None
        commits[suite.name] = server.commit(
            suite.repo, repos[suite.repo], repo_type="dataset", sha=sha
        )
        if pinned:
            server.commit(suite.repo, {"README.md": b"moved on"}, repo_type="dataset")
    return commits


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


def run_suites(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stages.suites", "--out", str(out), *extra],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_six_suites_fetched_pinned_and_converted(hub: HubServer, tmp_path: Path):
    commits = serve(hub, REPOS)
    out = tmp_path / "data" / "suites"
    proc = run_suites(out)
    assert proc.returncode == 0, proc.stderr[-3000:]

    names = sorted(EXPECTED)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.jsonl" for n in names] + ["provenance.json"]
    )
    for name, rows in EXPECTED.items():
        lines = (out / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows, name
    prov = json.loads((out / "provenance.json").read_text())
    for suite in suites.SUITES:
        entry = prov["suites"][suite.name]
        assert entry["resolved_revision"] == commits[suite.name]
        assert entry["requested_revision"] == suite.revision
        assert entry["rows"] == len(EXPECTED[suite.name])
        for rel, meta in entry["files"].items():
            data = REPOS[suite.repo][rel]
            assert meta == {
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
            }
    assert (
        "data/test-00000-of-00001.parquet"
        not in prov["suites"]["olympiadbench"]["files"]
    )
    for rel, meta in prov["outputs"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == meta["sha256"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["suites"]


def test_bad_row_names_itself_and_keeps_old_output(hub: HubServer, tmp_path: Path):
    repos = dict(REPOS)
    repos["knoveleng/Minerva-Math"] = {
        TRAIN: parquet(
            [
                {"problem": "ok", "solution": "\\boxed{1}"},
                {"problem": "bad", "solution": "the answer is 2"},
            ]
        )
    }
    serve(hub, repos)
    out = tmp_path / "suites"
    out.mkdir()
    (out / "aime24.jsonl").write_text("old\n")
    proc = run_suites(out, "--only", "aime24,minerva")
    assert proc.returncode != 0
    assert "minerva" in proc.stderr and "row 1" in proc.stderr
    assert "'solution' has no \\boxed{} answer" in proc.stderr
    assert (out / "aime24.jsonl").read_text() == "old\n"
    # Downloads stay in the hidden .raw sibling, to resume; no half-written output.
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_only_selects_suites(hub: HubServer, tmp_path: Path):
    serve(hub, REPOS)
    proc = run_suites(tmp_path / "s", "--only", "math500")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "math500.jsonl",
        "provenance.json",
    ]
    assert "unknown suite" in run_suites(tmp_path / "t", "--only", "gsm8k").stderr


@pytest.mark.parametrize(
    ("paths", "split", "chosen"),
    [
        (["README.md", TRAIN, "data/test-00000-of-00001.parquet"], "train", [TRAIN]),
        (["test.jsonl", "train.jsonl"], "test", ["test.jsonl"]),
        (
            ["train/0.parquet", "train/1.parquet", "x.py"],
            "train",
            ["train/0.parquet", "train/1.parquet"],
        ),
        (["aime_2025_problems.parquet"], "train", ["aime_2025_problems.parquet"]),
    ],
)
def test_split_files(paths: list[str], split: str, chosen: list[str]):
    assert suites.split_files(paths, split, where="w") == chosen


def test_split_files_none_found():
    with pytest.raises(suites.SuiteError, match="no data file for split 'test'"):
        suites.split_files(["a.parquet", "b.parquet"], "test", where="w")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (27.0, "27"),
        (0.5, "0.5"),
        (588, "588"),
        (" 025 ", "025"),
        (["1", "2"], "1, 2"),
        ("so \\boxed{x^{2}}", "x^{2}"),
    ],
)
def test_answer_text(value: object, text: str):
    assert suites.answer_text(value, where="w") == text


@pytest.mark.parametrize("value", [None, True, [], "  "])
def test_answer_text_rejects(value: object):
    with pytest.raises(suites.SuiteError, match="w: answer"):
        suites.answer_text(value, where="w")


def test_convert_names_missing_field():
    suite = suites.SUITES[0]
    with pytest.raises(suites.SuiteError, match=r"row 0: no field 'answer'"):
        suites.convert(suite, [{"problem": "p"}], where="aime24")


@pytest.mark.network
def test_pinned_suites_on_the_real_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The two pinned files hash as the public provenance note says (needs network)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    want = {
        "aime24": "26139847601a5037c237d5928b195e7260ca8074cf4f264b794af42847f79ccf",
        "math500": "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132",
    }
    proc = run_suites(tmp_path / "s", "--only", "aime24,math500")
    assert proc.returncode == 0, proc.stderr[-3000:]
    prov = json.loads((tmp_path / "s" / "provenance.json").read_text())
    for name, digest in want.items():
        (meta,) = prov["suites"][name]["files"].values()
        assert meta["sha256"] == digest, name
    assert prov["suites"]["aime24"]["rows"] == 30
    assert prov["suites"]["math500"]["rows"] == 500
