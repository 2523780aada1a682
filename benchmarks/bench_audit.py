"""The audit's time against the merge's own, on the 1.5B-shaped release.

`nice -n 5 python -m benchmarks.bench_audit [--root DIR] [--out DIR] [--layers N
--vocab V] [--full-fit]` writes the release of benchmarks.realshape's two checkpoints
(in ROOT) with stages.release.write_release, audits it with stages.audit.audit, each in
its own process, and prints wall and CPU seconds, peak RSS, bytes read per weight byte,
the ratios and the load average.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.realshape import DEFAULT_ROOT, LAYERS, VOCAB, make_checkpoints


def constituents(root: Path, out: Path) -> Path:
    """Hard links to ROOT/len and ROOT/acc plus provenance.json, as the fetch stage
    leaves them (so that the merge, like the pipeline's, hashes no inputs)."""
    from stages.hashing import write_json
    from stages.release import constituent_provenance

    for name in ("len", "acc"):
        dest = out / "constituents" / name
        if (dest / "provenance.json").exists():
            continue
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for f in (root / name).iterdir():
            (dest / f.name).hardlink_to(f)
        write_json(dest / "provenance.json", constituent_provenance(name, dest))
    return out / "constituents"


def phase(name: str, root: Path, out: Path) -> dict:
    """Run one phase in this process; return its figures."""
    len_dir, acc_dir = root / "len", root / "acc"
    wall, cpu = time.perf_counter(), time.process_time()
    figures: dict = {}
    if name == "merge":
        from stages.release import write_release

        shutil.rmtree(out, ignore_errors=True)
        write_release(len_dir, acc_dir, 0.3, out)
    else:
        from stages import audit as stage

        if name == "audit-full":
            # Every element's interval, as in the audit of a merge without provenance.
            stage.FULL_FIT = sys.maxsize
        report = stage.audit(out, len_dir=len_dir, acc_dir=acc_dir)
        inference = report["checks"]["inference"]
        figures = {
            "statuses": {k: c["status"] for k, c in report["checks"].items()},
            "read_per_byte": report["weight_bytes_read"] / report["weight_bytes"],
            "weight_gb": report["weight_bytes"] / 1e9,
            "verdict": inference["summary"],
        }
    return figures | {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


def run_phase(name: str, root: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_audit", "--phase", name]
    done = subprocess.run(
        [*cmd, "--root", str(root), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    p.add_argument(
        "--out", type=Path, default=DEFAULT_ROOT.with_name("mergesweep-audit-bench")
    )
    p.add_argument("--layers", type=int, default=LAYERS)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument(
        "--full-fit",
        action="store_true",
        help="fit every element, as the audit of a merge without provenance does "
        "(default: a sample of the large tensors, beside the bit-exact recompute)",
    )
    p.add_argument(
        "--phase", choices=("merge", "audit", "audit-full"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.root, args.out)))
        return
    make_checkpoints(args.root, layers=args.layers, vocab=args.vocab)
    pair = constituents(args.root, args.out)
    release = args.out / "release"
    merge = run_phase("merge", pair, release)
    audit = run_phase("audit-full" if args.full_fit else "audit", pair, release)
    for name, f in (("merge", merge), ("audit", audit)):
        print(
            f"{name:6s} {f['wall_s']:7.1f} s wall {f['cpu_s']:7.1f} s cpu "
            f"peak RSS {f['peak_rss_gb']:5.2f} GB"
        )
    print(
        f"audit/merge wall time: {audit['wall_s'] / merge['wall_s']:.2f}, "
        f"cpu time: {audit['cpu_s'] / merge['cpu_s']:.2f}; load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    print(
        f"weights {audit['weight_gb']:.2f} GB, bytes read per byte "
        f"{audit['read_per_byte']:.3f}; checks {audit['statuses']}"
    )
    print(f"inference: {audit['verdict']}")


if __name__ == "__main__":
    main()
