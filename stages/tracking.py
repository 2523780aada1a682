"""MLflow: the store's location, valid metric names, and the runs each stage logs.

The store is `sqlite:///<repo root>/mlflow.db` (the same file under `dvc exp run`, whose
temporary workspaces would otherwise get their own) unless MLFLOW_TRACKING_URI is set.
"""

import logging
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stages import paths
from stages.hashing import sha256_file

log = logging.getLogger(__name__)

RELEASED_ALIAS = "released"
# The sha256 of the release folder's provenance.json, on its model version: what ties a
# registered version to one written folder (a rerun writes another provenance).
PROVENANCE_TAG = "mergesweep.provenance_sha256"
_INVALID = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_name(name: str) -> str:
    """`exact_match,none` (lm-eval) becomes `exact_match__none`: no commas in MLflow."""
    return _INVALID.sub("_", name.replace(",", "__"))


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.mlflow_db()}"


def experiment(name: str) -> str:
    """Point MLflow at the project's store and return the experiment's id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if "MLFLOW_TRACKING_URI" not in os.environ:
        location = (paths.mlflow_artifacts() / name).as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=paths.repo_root(),
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def run_tags(revisions: dict[str, str]) -> dict[str, str]:
    """Tags every run carries: code commit, DVC experiment, constituent revisions."""
    tags = {"mergesweep.git_commit": git_commit() or "unknown"}
    if exp := os.environ.get("DVC_EXP_NAME"):
        tags["mergesweep.dvc_experiment"] = exp
    for name, rev in sorted(revisions.items()):
        tags[f"mergesweep.{name}.revision"] = rev
    return tags


def metrics_of(point: dict) -> dict[str, float]:
    """The numeric metrics of a sweep point, lm-eval's raw ones under valid names."""
    keys = (
        "accuracy",
        "mean_tokens",
        "median_tokens",
        "p90_tokens",
        "format_rate",
        "truncation_rate",
    )
    out = {k: float(point[k]) for k in keys}
    for name, value in point.get("lm_eval", {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[f"lm_eval/{metric_name(name)}"] = float(value)
    for ds, metrics in point.get("datasets", {}).items():
        for k in keys:
            if k in metrics:
                out[f"{metric_name(ds)}/{k}"] = float(metrics[k])
    return out


@contextmanager
def parent_run(
    experiment_name: str, run_name: str, tags: dict[str, str]
) -> Iterator[str]:
    import mlflow

    exp_id = experiment(experiment_name)
    mlflow.set_experiment(experiment_id=exp_id)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags) as run:
        yield run.info.run_id


def log_point(
    parent_id: str,
    point: dict,
    params: dict[str, object],
    tags: dict[str, str],
    artifacts: list[Path],
) -> str:
    """One child run per sweep weight: its params, metrics and files."""
    import mlflow

    parent = mlflow.get_run(parent_id)
    with mlflow.start_run(
        experiment_id=parent.info.experiment_id,
        run_name=f"w={point['weight']:.2f}",
        nested=True,
        parent_run_id=parent_id,
        tags=tags,
    ) as run:
        mlflow.log_params({k: str(v) for k, v in params.items()})
        mlflow.log_metrics(metrics_of(point))
        for path in artifacts:
            mlflow.log_artifact(str(path))
        return run.info.run_id


def register_release(
    experiment_name: str,
    name: str,
    model_dir: Path,
    params: dict[str, object],
    metrics: dict[str, float],
    tags: dict[str, str],
) -> dict[str, object]:
    """Log the release as a run and register it as `name`@released, by reference.

    Returns the record the release stage writes: name, version, run id, source, and
    the provenance hash the version is tagged with.
    """
    import mlflow
    from mlflow import MlflowClient

    provenance = sha256_file(model_dir / "provenance.json")
    exp_id = experiment(experiment_name)
    with mlflow.start_run(
        experiment_id=exp_id, run_name=f"release {name}", tags=tags
    ) as run:
        mlflow.log_params({k: str(v) for k, v in params.items()})
        if metrics:
            mlflow.log_metrics(metrics)
        for f in ("provenance.json", "README.md", "mergekit_config.yml"):
            if (model_dir / f).exists():
                mlflow.log_artifact(str(model_dir / f), artifact_path="release")
        client = MlflowClient()
        if client.search_registered_models(filter_string=f"name = '{name}'") == []:
            client.create_registered_model(name)
        # The weights stay where the release stage wrote them: the version points there.
        version = client.create_model_version(
            name,
            source=model_dir.resolve().as_uri(),
            run_id=run.info.run_id,
            tags=tags | {PROVENANCE_TAG: provenance},
        )
        client.set_registered_model_alias(name, RELEASED_ALIAS, version.version)
    log.info("registered %s version %s as @%s", name, version.version, RELEASED_ALIAS)
    return {
        "name": name,
        "version": version.version,
        "run_id": run.info.run_id,
        "source": version.source,
        "provenance_sha256": provenance,
    }


def tag_release_version(name: str, model_dir: Path, tags: dict[str, str]) -> str | None:
    """Set tags (e.g. the audit's verdict) on the version registered from `model_dir`:
    the one tagged with its provenance.json's hash. Returns that version, or None (and
    says why) when no version of `name` was registered from this folder."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    provenance = sha256_file(model_dir / "provenance.json")
    found = client.search_model_versions(
        f"name = '{name}' and tags.`{PROVENANCE_TAG}` = '{provenance}'"
    )
    if not found:
        log.warning(
            "not tagging: no version of %s was registered from %s (provenance sha256 "
            "%s); `dvc repro -f release` registers it",
            name,
            model_dir,
            provenance[:12],
        )
        return None
    version = str(max(int(v.version) for v in found))
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    released = str(client.get_model_version_by_alias(name, RELEASED_ALIAS).version)
    if released != version:
        log.warning(
            "tagged %s version %s (this folder); @%s is version %s",
            name,
            version,
            RELEASED_ALIAS,
            released,
        )
    return version
