"""The `mergesweep` command: merge, audit, suites, ui, lock, recipe."""

import argparse
import importlib
import logging
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import NoReturn

from stages import paths, tracking
from stages.fetch import LOCK, hub_source, local_manifest, local_revision
from stages.lockfile import Pin, write_lock
from stages.params import ParamsError, load_params

log = logging.getLogger(__name__)

# What to run after `mergesweep recipe NAME`.
RECIPE_NEXT = {
    "real": "mergesweep suites --out data/suites && mergesweep lock && dvc repro",
    "embedded": "mergesweep lock && dvc repro",
}

# Subcommands that parse their own arguments: name -> (module, entry point, help).
DELEGATED = {
    "merge": ("stages.release", "cli", "write a release folder: a linear merge"),
    "audit": ("stages.audit", "cli", "check that a model is the merge it claims to be"),
    "suites": ("stages.suites", "main", "fetch the real recipe's math test sets"),
}


def lock(params_path: Path, lock_path: Path) -> dict[str, Pin]:
    """Resolve every constituent to an exact revision and write the lock file."""
    params = load_params(params_path)
    pins = {}
    for name, c in params.constituents.items():
        hub_repo = hub_source(c.source)
        if hub_repo is None:
            resolved = local_revision(local_manifest(Path(c.source)))
        else:
            from stages import hub

            resolved = hub.resolve_revision(
                hub_repo[0], c.revision or "main", repo_type=hub_repo[1]
            )
        pins[name] = Pin(source=c.source, revision=c.revision, resolved=resolved)
        log.info("%s: %s@%s -> %s", name, c.source, c.revision or "-", resolved)
    write_lock(lock_path, pins)
    return pins


def apply_recipe(name: str, root: Path, params_path: Path) -> Path:
    """Replace params.yaml by a checked-in recipe, keeping the old file as .bak."""
    recipe = root / "recipes" / f"{name}.yaml"
    if not recipe.exists():
        known = sorted(p.stem for p in (root / "recipes").glob("*.yaml"))
        raise ParamsError(f"no recipe {name!r}; known recipes: {', '.join(known)}")
    load_params(recipe)
    if params_path.exists() and params_path.read_bytes() != recipe.read_bytes():
        shutil.copyfile(params_path, params_path.with_suffix(".yaml.bak"))
    shutil.copyfile(recipe, params_path)
    return recipe


def check_port_free(host: str, port: int) -> None:
    """Fail now, not inside mlflow's server (which logs the error and exits 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise RuntimeError(
                f"cannot serve on {host}:{port} ({e.strerror}); another UI may be "
                "running there: pass --port with a free port"
            ) from None


def serve_ui(host: str, port: int, workers: int) -> NoReturn:
    """Serve the MLflow UI for this project's store, on loopback by default."""
    check_port_free(host, port)
    uri = tracking.tracking_uri()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    cmd += ["--host", host, "--port", str(port), "--workers", str(workers)]
    if "MLFLOW_TRACKING_URI" not in os.environ:
        cmd += ["--default-artifact-root", paths.mlflow_artifacts().as_uri()]
    # The UI needs no background job runner (it serves GenAI features and forks a
    # dozen consumers); without it a local UI starts in seconds.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    log.info("MLflow UI for %s at http://%s:%d (Ctrl-C stops it)", uri, host, port)
    os.execv(sys.executable, cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergesweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, _, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    ui = sub.add_parser(
        "ui",
        help="serve the MLflow UI for this project's store",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ui.add_argument("--port", type=int, default=5000, help="port to listen on")
    ui.add_argument("--workers", type=int, default=1, help="server worker processes")
    lk = sub.add_parser("lock", help="pin each constituent's revision for DVC")
    lk.add_argument("--params", type=Path, default=Path("params.yaml"))
    lk.add_argument("--lock", type=Path, default=LOCK)
    rc = sub.add_parser("recipe", help="switch params.yaml to a checked-in recipe")
    rc.add_argument("name", help="embedded (the default) or real")
    rc.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if argv and argv[0] in DELEGATED:
        module, entry, _ = DELEGATED[argv[0]]
        return getattr(importlib.import_module(module), entry)(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    try:
        if args.command == "ui":
            return serve_ui(args.host, args.port, args.workers)
        if args.command == "lock":
            lock(args.params, args.lock)
            return 0
        if args.command == "recipe":
            recipe = apply_recipe(args.name, paths.repo_root(), args.params)
            then = RECIPE_NEXT.get(args.name, RECIPE_NEXT["embedded"])
            print(f"params.yaml is now {recipe.name}; next: {then}")
            return 0
    except (ParamsError, ValueError, RuntimeError) as e:
        print(f"mergesweep {args.command}: {e}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
