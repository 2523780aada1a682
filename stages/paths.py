"""Where the repository root, the sweep cache and the MLflow store live.

Under `dvc exp run --temp` or a queued experiment, DVC runs the pipeline in a copy of
the workspace below `<root>/.dvc/tmp/exps/`; the cache and the MLflow store must stay
those of `<root>`, so every lookup goes through `repo_root()`.
"""

from pathlib import Path

EXPS_MARKER = (".dvc", "tmp", "exps")


def repo_root(start: Path | None = None) -> Path:
    """The repository that owns `start` (default: the cwd), outside any DVC exp copy."""
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - len(EXPS_MARKER) + 1):
        if parts[i : i + len(EXPS_MARKER)] == EXPS_MARKER:
            return Path(*parts[:i])
    for d in (here, *here.parents):
        if (d / "dvc.yaml").exists() or (d / ".dvc").is_dir():
            return d
    return here


def cache_dir(start: Path | None = None) -> Path:
    """Per-point sweep results, keyed by their inputs; deleting it loses only time."""
    return repo_root(start) / ".cache" / "mergesweep"


def mlflow_db(start: Path | None = None) -> Path:
    return repo_root(start) / "mlflow.db"


def mlflow_artifacts(start: Path | None = None) -> Path:
    return repo_root(start) / "mlartifacts"
