"""Run the real pipeline in a temporary copy of this repository."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def copy_repo(dest: Path) -> Path:
    """The committed and untracked-but-not-ignored files, as a fresh git repository."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, (r.decode() for r in listed)):
        src = ROOT / rel
        if src.is_file() and rel != "dvc.lock":
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


def edit_params(repo: Path, changes: dict[str, object]) -> None:
    """Set dotted keys (`eval.max_gen_toks`) in the copy's params.yaml."""
    path = repo / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = raw
        for key in parents:
            node = node[key]
        node[last] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def run(repo: Path, *cmd: str, env: dict[str, str] | None = None) -> str:
    """Run a command of this venv in the copy, without the caller's MLflow store."""
    env = dict(env or os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def stages_run(log: str) -> set[str]:
    """Names of the stages a `dvc repro` log says it ran."""
    return {
        line.split("'")[1] for line in log.splitlines() if "Running stage '" in line
    }
