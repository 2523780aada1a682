import csv
import json
from pathlib import Path

import pytest

from stages import report, tracking

ROOT = Path(__file__).resolve().parents[1]


def point(w: float, acc: float, tokens: float) -> dict:
    return {
        "weight": w,
        "accuracy": acc,
        "mean_tokens": tokens,
        "median_tokens": tokens,
        "p90_tokens": tokens * 1.5,
        "format_rate": 1.0,
        "truncation_rate": 0.0,
        "n": 10,
        "lm_eval": {"exact_match,none": acc, "alias": "arith"},
        "datasets": {"arith": {"accuracy": acc, "mean_tokens": tokens}},
    }


POINTS = [
    point(0.0, 0.9, 60.0),
    point(0.5, 0.6, 30.0),
    point(0.7, 0.5, 40.0),
    point(1.0, 0.4, 8.0),
]


def test_pareto_front_drops_dominated_points():
    front = report.pareto_front(POINTS)
    assert [p["weight"] for p in front] == [0.0, 0.5, 1.0]


def test_points_csv_has_the_promised_columns(tmp_path):
    report.write_csv(tmp_path / "points.csv", POINTS)
    rows = list(csv.DictReader(open(tmp_path / "points.csv")))
    assert list(rows[0]) == list(report.COLUMNS)
    assert [float(r["weight"]) for r in rows] == [0.0, 0.5, 0.7, 1.0]
    assert float(rows[3]["p90_tokens"]) == 12.0


def test_metrics_pick_the_released_point():
    front = report.pareto_front(POINTS)
    m = report.metrics(POINTS, front, 0.5)
    assert m["release"]["accuracy"] == 0.6 and m["release"]["weight"] == 0.5
    assert m["sweep"]["best_accuracy_weight"] == 0.0
    assert m["sweep"]["pareto_weights"] == [0.0, 0.5, 1.0]
    assert m["sweep"]["mean_tokens_range"] == [8.0, 60.0]
    assert "release" not in report.metrics(POINTS, front, 0.3)


def test_metric_names_are_valid_for_mlflow():
    assert tracking.metric_name("exact_match,none") == "exact_match__none"
    assert tracking.metric_name("acc,strict-match") == "acc__strict-match"
    m = tracking.metrics_of(POINTS[0])
    assert m["lm_eval/exact_match__none"] == 0.9
    assert "lm_eval/alias" not in m
    assert m["arith/mean_tokens"] == 60.0


def test_plots_and_markdown(tmp_path):
    from stages.params import load_params

    pngs = report.render_plots(POINTS, report.pareto_front(POINTS), tmp_path / "plots")
    assert [p.name for p in pngs] == [
        "accuracy_vs_weight.png",
        "tokens_vs_weight.png",
        "accuracy_vs_tokens.png",
    ]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = report.markdown(
        POINTS,
        report.pareto_front(POINTS),
        load_params(ROOT / "params.yaml"),
        pngs,
        tmp_path / "sweep.md",
    )
    assert "| 0.50* | 0.600 | 30.0 |" in md
    assert "| 0.70 | 0.500 | 40.0 |" in md
    assert "![accuracy vs tokens](plots/accuracy_vs_tokens.png)" in md


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_sweep_logs_a_parent_and_a_child_per_weight(tmp_path, store):
    import mlflow

    from stages.params import load_params

    samples = tmp_path / "samples"
    samples.mkdir()
    for p in POINTS:
        (samples / f"w{p['weight']:.2f}.jsonl").write_text(json.dumps({"x": 1}) + "\n")
    params = load_params(ROOT / "params.yaml")
    tags = tracking.run_tags({"len": "local:aa", "acc": "local:bb"})
    report.log_to_mlflow(params, POINTS, samples, [], tags)

    runs = mlflow.search_runs(experiment_names=[params.mlflow.experiment])
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(runs) == 5 and len(children) == 4
    assert sorted(children["metrics.accuracy"]) == [0.4, 0.5, 0.6, 0.9]
    assert set(children["tags.mergesweep.len.revision"]) == {"local:aa"}
    child = children[children["params.weight"] == "0.5"].iloc[0]
    files = [f.path for f in mlflow.MlflowClient().list_artifacts(child["run_id"])]
    assert files == ["w0.50.jsonl"]


def test_weight_labels_do_not_cover_each_other():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The embedded sweep's crowded ends: w=0.9 and 1.0 are 0.1 tokens apart.
    xy = [(29.0, 1.0), (28.8, 0.98), (28.5, 0.945), (28.3, 0.913), (28.1, 0.903)]
    xy += [(12.0, 0.447), (9.1, 0.40), (8.1, 0.38), (8.0, 0.377)]
    points = [
        {"weight": i / 10, "mean_tokens": x, "accuracy": y}
        for i, (x, y) in enumerate(xy)
    ]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(*zip(*xy, strict=True))
    report.label_points(ax, points)
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.texts]
    assert [t.get_text() for t in ax.texts] == [f"{p['weight']:.2f}" for p in points]
    for i, a in enumerate(boxes):
        assert ax.get_window_extent().contains(a.x0, a.y0), ax.texts[i].get_text()
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (ax.texts[i].get_text(), a, b)
    plt.close(fig)
