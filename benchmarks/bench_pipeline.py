"""Print the wall time of `dvc repro` on the embedded default from a clean clone, and
the sweep's per-point overhead (everything but generation) as a share of generation.

Targets (issue 3): at most 3 minutes on 2 cores; overhead at most 5%.
Usage: python benchmarks/bench_pipeline.py [--keep DIR]
"""

import argparse
import json
import os
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
    repo = work / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
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
    subprocess.run(["dvc", "repro", "-q"], cwd=repo, env=env, check=True)
    wall = time.perf_counter() - start

    points = json.loads((repo / "reports/sweep/results.json").read_text())
    gen = sum(p["timing"]["generate_s"] for p in points)
    total = sum(p["timing"]["total_s"] for p in points)
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}")
    print(f"dvc repro from a clean clone: {wall:.1f} s (target <= 180 s)")
    print(
        f"sweep points: {len(points)}, generation {gen:.1f} s, "
        f"per-point total {total:.1f} s"
    )
    print(
        f"per-point overhead: {total - gen:.2f} s = "
        f"{100 * (total - gen) / gen:.2f}% of generation (target <= 5%)"
    )
    load = sum(p["timing"]["load_s"] for p in points)
    print(
        f"  of which the one-time load, shared out: {load:.2f} s; without it "
        f"{100 * (total - gen - load) / gen:.2f}%"
    )
    for p in points:
        t = p["timing"]
        print(
            f"  w={p['weight']:.2f}  generate {t['generate_s']:.2f} s  "
            f"overhead {t['total_s'] - t['generate_s']:.2f} s"
        )


if __name__ == "__main__":
    main()
