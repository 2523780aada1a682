"""Stage report: the sweep's trade-off as a table, DVC metrics and plots, PNGs, MLflow.

Reads reports/sweep/results.json, the samples and the constituents' provenance; writes
points.csv, pareto.csv, metrics.json, plots/*.png and sweep.md; reads params `release`,
`eval`, `mlflow`.
"""

import argparse
import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from stages import tracking
from stages.hashing import write_json
from stages.params import Eval, Params, load_params_or_exit

log = logging.getLogger(__name__)

COLUMNS = (
    "weight",
    "accuracy",
    "mean_tokens",
    "median_tokens",
    "p90_tokens",
    "format_rate",
    "truncation_rate",
)


def pareto_front(points: list[dict]) -> list[dict]:
    """Points no other point beats on both accuracy (higher) and mean tokens (lower)."""

    def dominated(p: dict) -> bool:
        return any(
            q["accuracy"] >= p["accuracy"]
            and q["mean_tokens"] <= p["mean_tokens"]
            and (q["accuracy"] > p["accuracy"] or q["mean_tokens"] < p["mean_tokens"])
            for q in points
        )

    return [p for p in points if not dominated(p)]


def write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: round(float(row[k]), 6) for k in COLUMNS})
    tmp.replace(path)


def point_at(points: list[dict], weight: float) -> dict | None:
    return next((p for p in points if abs(p["weight"] - weight) < 1e-9), None)


def metrics(points: list[dict], front: list[dict], release_weight: float) -> dict:
    """DVC metrics, small enough for `dvc exp show`: the released point, a summary."""
    best = max(points, key=lambda p: (p["accuracy"], -p["mean_tokens"]))
    out: dict = {
        "sweep": {
            "points": len(points),
            "pareto_weights": sorted(p["weight"] for p in front),
            "best_accuracy": best["accuracy"],
            "best_accuracy_weight": best["weight"],
            "mean_tokens_range": [
                min(p["mean_tokens"] for p in points),
                max(p["mean_tokens"] for p in points),
            ],
        }
    }
    if (rel := point_at(points, release_weight)) is not None:
        out["release"] = {k: rel[k] for k in COLUMNS}
    return out


def render_plots(points: list[dict], front: list[dict], out: Path) -> list[Path]:
    """Three PNGs, rendered offline with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    w = [p["weight"] for p in points]
    files = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(w, [p["accuracy"] for p in points], "o-", label="accuracy")
    ax.plot(w, [p["format_rate"] for p in points], "s--", label="format rate")
    ax.set(xlabel="w (share of len)", ylabel="rate", ylim=(-0.02, 1.02))
    ax.set_title("Accuracy vs merge weight")
    ax.legend(loc="lower left")  # both rates start near 1 and accuracy falls with w
    files.append(_save(fig, out / "accuracy_vs_weight.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("mean_tokens", "o-"), ("median_tokens", "^--")):
        ax.plot(w, [p[key] for p in points], style, label=key.replace("_", " "))
    ax.plot(w, [p["p90_tokens"] for p in points], "v:", label="p90 tokens")
    ax.set(xlabel="w (share of len)", ylabel="response tokens")
    ax.set_title("Response length vs merge weight")
    ax.legend()
    files.append(_save(fig, out / "tokens_vs_weight.png"))

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([p["mean_tokens"] for p in points], [p["accuracy"] for p in points])
    front = sorted(front, key=lambda p: p["mean_tokens"])
    ax.plot(
        [p["mean_tokens"] for p in front],
        [p["accuracy"] for p in front],
        "r-",
        label="Pareto front",
    )
    ax.set(xlabel="mean response tokens", ylabel="accuracy")
    ax.set_title("Accuracy vs length (labels: w)")
    ax.legend()
    label_points(ax, points)
    files.append(_save(fig, out / "accuracy_vs_tokens.png"))
    return files


# Where a weight's label may go, in points from its marker, in order of preference.
LABEL_OFFSETS = tuple(
    (dx, dy) for dy in (4, -11, 14, -21, 24) for dx in (4, -26, 12, -34)
)


def label_points(ax: Any, points: list[dict]) -> None:
    """Label each point with its weight where the label covers the fewest other labels
    and markers: neighbouring weights often land on the same spot (here w=0.9 and 1.0
    differ by 0.1 tokens)."""
    ax.margins(x=0.1, y=0.08)  # room for labels beside the outermost points
    ax.autoscale_view()
    to_px = ax.transData.transform
    px = ax.figure.dpi / 72
    xy = [(p["mean_tokens"], p["accuracy"]) for p in points]
    markers = [tuple(to_px(v)) for v in xy]
    frame = ax.get_window_extent()
    taken: list[tuple[float, float, float, float]] = []

    def cost(box: tuple[float, float, float, float], own: int) -> float:
        x0, y0, x1, y1 = box
        if x0 < frame.x0 or y0 < frame.y0 or x1 > frame.x1 or y1 > frame.y1:
            return math.inf
        labels = sum(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in taken)
        dots = sum(
            x0 - 4 < mx < x1 + 4 and y0 - 4 < my < y1 + 4
            for i, (mx, my) in enumerate(markers)
            if i != own
        )
        return 2 * labels + dots

    for i, (p, (mx, my)) in enumerate(zip(points, markers, strict=True)):
        boxes = [
            (mx + dx * px, my + dy * px, mx + (dx + 22) * px, my + (dy + 8) * px)
            for dx, dy in LABEL_OFFSETS  # a box of "0.30" at 8 pt
        ]
        costs = [cost(b, i) for b in boxes]
        k = costs.index(min(costs))
        taken.append(boxes[k])
        ax.annotate(
            f"{p['weight']:.2f}",
            xy[i],
            textcoords="offset points",
            xytext=LABEL_OFFSETS[k],
            fontsize=8,
        )


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def decoding(e: Eval) -> str:
    if e.do_sample:
        return f"sampling at temperature {e.temperature}, top_p {e.top_p}"
    return "greedy decoding"


def markdown(
    points: list[dict], front: list[dict], params: Params, pngs: list[Path], md: Path
) -> str:
    on_front = {p["weight"] for p in front}
    c = params.constituents
    lines = [
        "# Sweep: accuracy vs response length",
        "",
        f"w is the share of `len` ({c['len'].source}); `acc` ({c['acc'].source}) "
        f"gets 1 - w. {decoding(params.eval).capitalize()}, max_gen_toks "
        f"{params.eval.max_gen_toks}, datasets: {', '.join(params.task.datasets)}. "
        "Points on the Pareto front (no other point is both more accurate and "
        "shorter) are marked *.",
        "",
        "| w | accuracy | mean tokens | median | p90 | format | truncated |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in points:
        star = "*" if p["weight"] in on_front else ""
        lines.append(
            f"| {p['weight']:.2f}{star} | {p['accuracy']:.3f} | {p['mean_tokens']:.1f} "
            f"| {p['median_tokens']:g} | {p['p90_tokens']:g} | {p['format_rate']:.3f} "
            f"| {p['truncation_rate']:.3f} |"
        )
    lines.append("")
    for png in pngs:
        rel = png.resolve().relative_to(md.parent.resolve())
        lines += [f"![{png.stem.replace('_', ' ')}]({rel.as_posix()})", ""]
    return "\n".join(lines)


def log_to_mlflow(
    params: Params, points: list[dict], samples: Path, pngs: list[Path], tags: dict
) -> None:
    """A parent run for the sweep and a child run per weight."""
    eval_params = {f"eval.{k}": v for k, v in vars(params.eval).items()}
    with tracking.parent_run(params.mlflow.experiment, "sweep", tags) as parent:
        import mlflow

        mlflow.log_params({**eval_params, "sweep.weights": list(params.sweep.weights)})
        for png in pngs:
            mlflow.log_artifact(str(png), artifact_path="plots")
        for p in points:
            sample_file = samples / f"w{p['weight']:.2f}.jsonl"
            files = [f for f in (sample_file, *pngs) if f.exists()]
            tracking.log_point(
                parent, p, {"weight": p["weight"], **eval_params}, tags, files
            )


def revisions(constituent_dirs: dict[str, Path]) -> dict[str, str]:
    out = {}
    for name, d in constituent_dirs.items():
        prov = json.loads((d / "provenance.json").read_text())
        out[name] = prov["resolved_revision"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--samples", type=Path, required=True)
    parser.add_argument("--len", dest="len_dir", type=Path, required=True)
    parser.add_argument("--acc", dest="acc_dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="reports/sweep")
    parser.add_argument("--markdown", type=Path, required=True, help="reports/sweep.md")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )

    start = time.perf_counter()
    params = load_params_or_exit(args.params)
    points = sorted(json.loads(args.results.read_text()), key=lambda p: p["weight"])
    front = pareto_front(points)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "points.csv", points)
    write_csv(args.out / "pareto.csv", sorted(front, key=lambda p: p["weight"]))
    write_json(args.out / "metrics.json", metrics(points, front, params.release.weight))
    pngs = render_plots(points, front, args.out / "plots")
    md = markdown(points, front, params, pngs, args.markdown)
    tmp = args.markdown.with_name(f".{args.markdown.name}.tmp")
    tmp.write_text(md + "\n")
    tmp.replace(args.markdown)

    revs = revisions({"len": args.len_dir, "acc": args.acc_dir})
    log_to_mlflow(params, points, args.samples, pngs, tracking.run_tags(revs))
    log.info(
        "reported %d points (%d on the Pareto front) in %.1f s",
        len(points),
        len(front),
        time.perf_counter() - start,
    )


if __name__ == "__main__":
    main()
