"""Stage release + `mergesweep merge`: merge `len` and `acc`, write the release folder.

Reads params `merge` and `release`; writes `<out>/<release.name>/` (design.md "Release
folder"), taking the eval table from the sweep's results.json when it has the point.
"""

import argparse
import importlib.metadata
import json
import logging
import math
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from stages import modelcard, modelfiles
from stages.checkpoint import (
    DTYPE_NAMES,
    Checkpoint,
    CheckpointError,
    ShardedWriter,
    TensorSpec,
    dtype_from_name,
    dtype_name,
)
from stages.fetch import constituent_record, local_revision
from stages.hashing import manifest, sha256_file, write_json
from stages.merging import (
    LM_HEAD,
    NAMES,
    MergeError,
    MergePlan,
    check_weight,
    plan_merge,
    stream_merge,
)
from stages.params import Params, ParamsError, load_params_or_exit, parse_size

log = logging.getLogger(__name__)

DONOR = "acc"
DONOR_FILES = ("generation_config.json", *modelfiles.TOKENIZER_FILES)
PACKAGES = ("torch", "safetensors", "transformers", "tokenizers", "numpy", "mergekit")
DEFAULT_SHARD_SIZE = 5_000_000_000


def constituent_provenance(name: str, folder: Path) -> dict:
    """`<folder>/provenance.json`, or a manifest of the folder when it has none."""
    path = folder / "provenance.json"
    if path.exists():
        prov = json.loads(path.read_text())
        for rel, entry in prov.get("files", {}).items():
            f = folder / rel
            if not f.is_file() or f.stat().st_size != entry["size"]:
                raise MergeError(
                    f"{f}: {path} records {entry['size']} bytes, the folder has "
                    f"{f.stat().st_size if f.is_file() else 'no such file'}; "
                    "fetch the constituent again"
                )
        return prov
    files = manifest(folder, exclude=("provenance.json",))
    return constituent_record(name, str(folder), None, local_revision(files), files)


def _set_json_value(raw: str, key: str, value: object, expected: dict) -> str:
    pattern = re.compile(rf'("{re.escape(key)}"\s*:\s*)("[^"]*"|true|false|null)')
    new = pattern.sub(lambda m: m.group(1) + json.dumps(value), raw)
    if json.loads(new) != expected:
        raise MergeError(
            f"config.json: cannot change top-level {key} alone (it also appears "
            "nested); edit the donor's config.json by hand"
        )
    return new


def edit_config(raw: str, dtype: str, *, untie: bool = False) -> str:
    """The donor's config.json text with only its dtype values replaced, in place.

    `untie` also sets `tie_word_embeddings` to false: the release gained an lm_head.
    """
    config = json.loads(raw)
    changes = {k: dtype for k in ("dtype", "torch_dtype") if k in config}
    if untie and config.get("tie_word_embeddings"):
        changes["tie_word_embeddings"] = False
    expected = dict(config)
    for key, value in changes.items():
        expected[key] = value
        raw = _set_json_value(raw, key, value, expected)
    return raw


def mergekit_config(
    refs: dict[str, str], weights: dict[str, float], dtype: str, normalize: bool
) -> str:
    """The mergekit-yaml config giving the same tensors: len first, acc the base."""
    config = {
        "merge_method": "linear",
        "base_model": refs[DONOR],
        "models": [
            {"model": refs[n], "parameters": {"weight": weights[n]}} for n in NAMES
        ],
        "parameters": {"normalize": normalize},
        # `dtype` is the dtype tensors are loaded in, `out_dtype` the one written:
        # float32 in, then one rounding, as stages.merging does.
        "dtype": "float32",
        "out_dtype": dtype,
    }
    return yaml.safe_dump(config, sort_keys=False)


def mergekit_ref(prov: dict, folder: Path) -> str:
    """How mergekit-yaml names the constituent: `OWNER/NAME@commit`, or its path."""
    source = prov.get("source", "")
    if source.startswith("hf://"):
        return f"{source.removeprefix('hf://')}@{prov['resolved_revision']}"
    return str(folder)


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    sha = res.stdout.strip()
    return sha if res.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def _write_weights(
    tmp: Path,
    plan: MergePlan,
    ckpts: list[Checkpoint],
    weights: dict[str, float],
    normalize: bool,
    shard_size: int,
) -> dict[str, str]:
    specs = [TensorSpec(j.name, j.dtype, j.shape) for j in plan.jobs]
    writer = ShardedWriter(tmp, specs, shard_size, background=True)
    bar = tqdm(total=plan.nbytes, unit="B", unit_scale=True, desc="merge", delay=1)
    try:
        stream_merge(
            plan,
            ckpts,
            [weights[n] for n in NAMES],
            writer.write,
            normalize=normalize,
            progress=bar.update,
        )
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return writer.sha256


def _copy_donor(tmp: Path, donor: Path, plan: MergePlan, dtype: str) -> None:
    untie = "acc" in plan.tied and any(j.name == LM_HEAD for j in plan.jobs)
    raw = (donor / "config.json").read_text()
    (tmp / "config.json").write_text(edit_config(raw, dtype, untie=untie))
    for name in DONOR_FILES:
        if (donor / name).is_file():
            shutil.copyfile(donor / name, tmp / name)


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place, replacing an earlier release only."""
    tmp.chmod(0o755)
    if not out.exists():
        tmp.rename(out)
        return
    prov = out / "provenance.json"
    is_release = prov.is_file() and '"mergesweep-release/1"' in prov.read_text()
    if not is_release:
        raise MergeError(f"{out} exists and is not a mergesweep release; not replacing")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    out.rename(old / out.name)
    tmp.rename(out)
    shutil.rmtree(old)


def write_release(
    len_dir: Path,
    acc_dir: Path,
    weight: float,
    out: Path,
    *,
    dtype: str | None = None,
    normalize: bool = True,
    shard_size: int = DEFAULT_SHARD_SIZE,
    allow_out_of_range: bool = False,
    eval_table: dict | None = None,
) -> Path:
    """Merge `len` (share `weight`) with `acc` and write the release folder `out`."""
    start = time.perf_counter()
    check_weight(weight, allow_out_of_range=allow_out_of_range)
    weights = {"len": weight, "acc": 1.0 - weight}
    dirs = {"len": len_dir, "acc": acc_dir}
    provs = {n: constituent_provenance(n, d) for n, d in dirs.items()}
    ckpts = [Checkpoint(dirs[n]) for n in NAMES]
    plan = plan_merge(ckpts, dtype=dtype_from_name(dtype) if dtype else None)
    out_dtype = dtype_name(plan.dtype)
    log.info(
        "merging %s (w=%g) and %s (w=%g) on cpu: %d tensors, %.2f GB of %s, "
        "normalize=%s",
        len_dir,
        weights["len"],
        acc_dir,
        weights["acc"],
        len(plan.jobs),
        plan.nbytes / 1e9,
        out_dtype,
        normalize,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shard_hashes = _write_weights(tmp, plan, ckpts, weights, normalize, shard_size)
        _copy_donor(tmp, dirs[DONOR], plan, out_dtype)
        refs = {n: mergekit_ref(provs[n], dirs[n]) for n in NAMES}
        mk_yaml = mergekit_config(refs, weights, out_dtype, normalize)
        (tmp / "mergekit_config.yml").write_text(mk_yaml)
        card = modelcard.render(
            out.name,
            sources={n: provs[n].get("source", str(dirs[n])) for n in NAMES},
            weights=weights,
            dtype=out_dtype,
            mergekit_yaml=mk_yaml,
            eval_row=eval_table,
        )
        (tmp / "README.md").write_text(card)
        _write_provenance(tmp, provs, weights, out_dtype, normalize, shard_hashes)
        _install(tmp, out)
        log.info("merged in %.2f s: %s", time.perf_counter() - start, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for c in ckpts:
            c.close()
    return out


def _write_provenance(
    tmp: Path,
    provs: dict[str, dict],
    weights: dict[str, float],
    dtype: str,
    normalize: bool,
    shard_hashes: dict[str, str],
) -> None:
    files = {}
    for p in sorted(tmp.iterdir()):
        digest = shard_hashes.get(p.name) or sha256_file(p)
        files[p.name] = {"sha256": digest, "size": p.stat().st_size}
    prov = {
        "format": "mergesweep-release/1",
        "method": "linear",
        "normalize": normalize,
        "weights": weights,
        "dtype": dtype,
        "donor": DONOR,
        "constituents": provs,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "files": files,
    }
    (tmp / "provenance.json").write_text(json.dumps(prov, indent=2, sort_keys=True))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergesweep merge",
        description="Linear-merge two fine-tunes into a release folder "
        "(mergekit 0.1.5 `linear`, bit for bit).",
    )
    p.add_argument("--len", dest="len_dir", type=Path, required=True)
    p.add_argument("--acc", dest="acc_dir", type=Path, required=True)
    p.add_argument("--weight", type=float, required=True, help="the share of len")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", choices=[d for d in DTYPE_NAMES if d != "float64"])
    p.add_argument("--shard-size", default=str(DEFAULT_SHARD_SIZE), help="e.g. 2GB")
    p.add_argument("--no-normalize", dest="normalize", action="store_false")
    p.add_argument("--allow-out-of-range", action="store_true")
    return p


def _say(message: str) -> None:
    sys.stderr.write(f"mergesweep merge: error: {message}\n")


def cli(argv: list[str] | None = None) -> int:
    """`mergesweep merge ...`: 0 when written, 2 on bad usage, 1 on a refused merge."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        shard_size = parse_size(args.shard_size, "--shard-size")
        check_weight(args.weight, allow_out_of_range=args.allow_out_of_range)
    except (ParamsError, MergeError) as e:
        _say(str(e))
        return 2
    for d in (args.len_dir, args.acc_dir):
        if not d.is_dir():
            _say(f"{d} is not a directory")
            return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        out = write_release(
            args.len_dir,
            args.acc_dir,
            args.weight,
            args.out,
            dtype=args.dtype,
            normalize=args.normalize,
            shard_size=shard_size,
            allow_out_of_range=args.allow_out_of_range,
        )
    except (MergeError, CheckpointError) as e:
        _say(str(e))
        return 1
    _log_done(out, start)
    return 0


def _log_done(out: Path, start: float) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    log.info(
        "wrote %s in %.1f s (max RSS %.2f GB, mapped inputs included)",
        out,
        time.perf_counter() - start,
        peak,
    )


def eval_row(results: Path, weight: float) -> dict | None:
    """The sweep point at `weight` from results.json, if the sweep evaluated it."""
    if not results.exists():
        return None
    for row in json.loads(results.read_text()):
        if math.isclose(row.get("weight", math.nan), weight, abs_tol=1e-9):
            return row
    return None


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__)
    for flag in ("--len", "--acc", "--results", "--out"):
        p.add_argument(flag, type=Path, required=True)
    p.add_argument(
        "--record",
        type=Path,
        help="write the registered model version here (JSON: name, version, run_id, "
        "source, provenance_sha256)",
    )
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params_or_exit(args.params)
    start = time.perf_counter()
    row = eval_row(args.results, params.release.weight)
    if row is None:
        log.warning(
            "release.weight %s is not a point of the sweep in %s: the model card gets "
            "no evaluation and metrics.json no release entry; add it to sweep.weights",
            params.release.weight,
            args.results,
        )
    out = write_release(
        args.len,
        args.acc,
        params.release.weight,
        args.out / params.release.name,
        dtype=params.merge.dtype,
        normalize=params.merge.normalize,
        shard_size=params.release.shard_size,
        eval_table=row,
    )
    _log_done(out, start)
    record = register(out, params, row)
    if args.record is not None:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.record, record)
    return out


def register(out: Path, params: Params, row: dict | None) -> dict[str, object]:
    """Log the release to MLflow and register it as `release.name`@released."""
    from stages import tracking

    prov = json.loads((out / "provenance.json").read_text())
    revisions = {
        name: c["resolved_revision"] for name, c in prov["constituents"].items()
    }
    keys = [k for k, _ in modelcard.EVAL_COLUMNS]
    metrics = {k: float(row[k]) for k in keys if k in (row or {})}
    return tracking.register_release(
        params.mlflow.experiment,
        params.release.name,
        out,
        {
            "weight.len": prov["weights"]["len"],
            "weight.acc": prov["weights"]["acc"],
            "dtype": prov["dtype"],
            "normalize": prov["normalize"],
        },
        metrics,
        tracking.run_tags(revisions),
    )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    try:
        main()
    except (MergeError, CheckpointError) as e:
        log.error("release refused: %s", e)
        sys.exit(1)
