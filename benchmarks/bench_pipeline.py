"""Print the wall time of `dvc repro` on the embedded default from a clean clone, and
the sweep's per-point overhead (everything but generation) as a share of generation.

Targets: at most 3 minutes on 2 cores; overhead at most 5%.
Usage: python benchmarks/bench_pipeline.py [--keep DIR]. The clone (and the log of its
`dvc repro`) is deleted afterwards unless --keep names where to put it.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", type=Path, help="clone here and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        measure(work / "repo")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept the clone and its log (repro.log) in {work}")


def measure(repo: Path) -> None:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    head = subprocess.run(
        ["git", "log", "-1", "--format=%h %s"], cwd=repo, text=True, capture_output=True
    ).stdout.strip()
    print(f"measuring the last commit (a clean clone): {head}")
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        text=True,
        capture_output=True,
    ).stdout
    if dirty:
        print("note: the working tree has uncommitted changes, which are not measured")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
    )

    start = time.perf_counter()
    with open(repo.parent / "repro.log", "w") as log:
        done = subprocess.run(
            ["dvc", "repro"], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (repo.parent / "repro.log").read_text().splitlines()[-20:]
        sys.exit("dvc repro failed:\n" + "\n".join(tail))

    points = json.loads((repo / "reports/sweep/results.json").read_text())
    t = {k: sum(p["timing"][k] for p in points) for k in points[0]["timing"]}
    gen = t["generate_s"]
    once = t["load_s"] + t["setup_s"]
    per_point = t["total_s"] - gen - once
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}")
    print(f"dvc repro from a clean clone: {wall:.1f} s (target <= 180 s)")
    print(f"sweep points: {len(points)}, generation {gen:.2f} s")
    print(
        f"per-point overhead (merge, lm-eval's bookkeeping and scoring, samples, "
        f"cache write), summed over the points: {per_point:.3f} s "
        f"({per_point / len(points):.4f} s a point) = {100 * per_point / gen:.2f}% "
        f"of generation (target <= 5%)"
    )
    print(
        f"one-time, for the whole sweep: load {t['load_s']:.3f} s, prompts built and "
        f"tokenized {t['setup_s']:.3f} s = {100 * once / gen:.2f}% of generation"
    )
    print(
        f"all but generation, one-time included: {per_point + once:.3f} s = "
        f"{100 * (per_point + once) / gen:.2f}% of generation"
    )
    print("  weight  generate  load   setup  merge  score  write (s)")
    for p in points:
        pt = p["timing"]
        print(
            f"  {p['weight']:.2f}    {pt['generate_s']:.3f}     {pt['load_s']:.3f}  "
            f"{pt['setup_s']:.3f}  {pt['merge_s']:.3f}  {pt['score_s']:.3f}  "
            f"{pt['write_s']:.3f}"
        )


if __name__ == "__main__":
    main()
