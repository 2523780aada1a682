"""`dvc repro` end to end, in a temporary copy of the repository (minutes)."""

import csv
import json
from pathlib import Path

import pytest
import yaml
from _repo import copy_repo, edit_params, run, stages_run

LIMIT = 40  # problems per point: enough for real numbers, small enough for CI

pytestmark = pytest.mark.slow


def repro(repo: Path) -> str:
    return run(repo, "dvc", "repro")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = copy_repo(tmp_path_factory.mktemp("pipeline"))
    edit_params(repo, {"task.limit": LIMIT})
    log = repro(repo)
    assert stages_run(log) == {
        "fetch@len",
        "fetch@acc",
        "sweep",
        "report",
        "release",
        "audit",
    }
    return repo


def mlflow_runs(repo: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["mergesweep"])


def test_outputs_present_and_sane(repo):
    for name in ("len", "acc"):
        prov = json.loads(
            (repo / f"data/constituents/{name}/provenance.json").read_text()
        )
        assert prov["resolved_revision"].startswith("local:")
        assert any(f.endswith(".safetensors") for f in prov["files"])

    rows = list(csv.DictReader(open(repo / "reports/sweep/points.csv")))
    assert [float(r["weight"]) for r in rows] == [i / 10 for i in range(11)]
    acc0, acc1 = float(rows[0]["accuracy"]), float(rows[-1]["accuracy"])
    tok0, tok1 = float(rows[0]["mean_tokens"]), float(rows[-1]["mean_tokens"])
    # w = 0 is `acc` alone, w = 1 is `len` alone: the trade-off the sweep exists for.
    assert acc0 > acc1 and tok0 > tok1
    for r in rows:
        assert 0 <= float(r["accuracy"]) <= 1 and 0 <= float(r["format_rate"]) <= 1
        assert float(r["median_tokens"]) <= float(r["p90_tokens"])

    samples = sorted(p.name for p in (repo / "reports/sweep/samples").iterdir())
    assert len(samples) == 11 and "w0.30.jsonl" in samples
    lines = (repo / "reports/sweep/samples/w0.30.jsonl").read_text().splitlines()
    assert len(lines) == LIMIT
    assert {"prompt", "response", "tokens", "extracted", "correct"} <= set(
        json.loads(lines[0])
    )

    pngs = sorted(p.name for p in (repo / "reports/sweep/plots").glob("*.png"))
    assert len(pngs) == 3
    assert "| 0.30" in (repo / "reports/sweep.md").read_text()
    metrics = json.loads((repo / "reports/sweep/metrics.json").read_text())
    assert metrics["release"]["weight"] == 0.3

    release = (
        repo
        / "models"
        / yaml.safe_load((repo / "params.yaml").read_text())["release"]["name"]
    )
    prov = json.loads((release / "provenance.json").read_text())
    assert prov["weights"] == {"len": 0.3, "acc": 0.7}
    audit = json.loads((repo / "reports/audit.json").read_text())
    assert audit["ok"] is True


def test_mlflow_has_a_child_run_per_weight_and_the_release(repo):
    from mlflow import MlflowClient

    runs = mlflow_runs(repo)
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(children) == 11
    assert sorted(children["params.weight"].astype(float)) == [
        i / 10 for i in range(11)
    ]
    name = yaml.safe_load((repo / "params.yaml").read_text())["release"]["name"]
    version = MlflowClient().get_model_version_by_alias(name, "released")
    assert version.source.endswith(f"/models/{name}")
    assert version.tags.get("audit.ok") == "true"


def test_second_repro_runs_no_stage(repo):
    assert stages_run(repro(repo)) == set()


def test_eval_change_reruns_sweep_not_fetch(repo):
    edit_params(repo, {"eval.max_gen_toks": 150})
    stages = stages_run(repro(repo))
    assert "sweep" in stages
    assert not stages & {"fetch@len", "fetch@acc"}


def test_added_weight_evaluates_one_point(repo):
    weights = [i / 10 for i in range(11)] + [0.35]
    edit_params(repo, {"sweep.weights": weights})
    stages = stages_run(repro(repo))
    assert "sweep" in stages
    results = json.loads((repo / "reports/sweep/results.json").read_text())
    assert len(results) == 12
    assert [p["weight"] for p in results if not p["cached"]] == [0.35]


def released(repo: Path):
    """The version aliased `released`, and the provenance hash of the folder."""
    from mlflow import MlflowClient

    from stages.hashing import sha256_file

    mlflow_runs(repo)  # points MLflow at the copy's store
    name = yaml.safe_load((repo / "params.yaml").read_text())["release"]["name"]
    version = MlflowClient().get_model_version_by_alias(name, "released")
    return version, sha256_file(repo / "models" / name / "provenance.json")


def test_the_released_version_is_the_folder_and_carries_its_audit(repo):
    # The tests above changed results.json, so the release was registered again.
    version, provenance = released(repo)
    assert version.tags["mergesweep.provenance_sha256"] == provenance
    assert version.tags["audit.ok"] == "true"
    record = json.loads((repo / "reports/release.json").read_text())
    assert str(record["version"]) == str(version.version)
    assert record["provenance_sha256"] == provenance


def test_a_release_weight_set_back_is_registered_and_audited_again(repo):
    edit_params(repo, {"release.weight": 0.4})
    assert {"release", "audit"} <= stages_run(repro(repo))
    edit_params(repo, {"release.weight": 0.3})
    # Run again, not restored from DVC's run cache: that would skip the registration.
    assert {"release", "audit"} <= stages_run(repro(repo))
    version, provenance = released(repo)
    assert version.tags["mergesweep.provenance_sha256"] == provenance
    assert abs(float(version.tags["audit.inferred_w"]) - 0.3) < 1e-4


def test_exp_run_in_a_temp_workspace_logs_to_the_main_store(repo):
    before = len(mlflow_runs(repo))
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "s")
    run(
        repo,
        "dvc",
        "exp",
        "run",
        "--temp",
        "-n",
        "probe",
        "-S",
        "sweep.weights=[0.0,0.3,1.0]",
    )
    runs = mlflow_runs(repo)
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    probe = parents[parents["tags.mergesweep.dvc_experiment"] == "probe"]
    assert len(runs) - before == 3 + 1 + 1  # three points, their sweep, the release
    assert len(probe) == 2  # the sweep's parent run and the release run
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
