import copy
from pathlib import Path

import pytest
import yaml

from stages.params import ParamsError, load_params, parse_params, parse_size

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(path: str, value: object) -> dict:
    raw = copy.deepcopy(DEFAULT)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[last] = value
    return raw


def test_default_params_are_valid_and_complete():
    p = load_params(ROOT / "params.yaml")
    assert p.sweep.weights == tuple(round(0.1 * i, 1) for i in range(11))
    assert p.release.weight == 0.3
    assert 0.3 in p.sweep.weights
    assert set(p.constituents) == {"len", "acc"}
    assert p.eval.until == ()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("sweep.weights", [0.0, "0.5"], "sweep.weights[1] must be a number, got '0.5'"),
        ("sweep.weights", [0.0, 1.2], "sweep.weights[1] must be in [0, 1], got 1.2"),
        ("sweep.weights", [0.5, 0.1, 0.5], "sweep.weights[2] = 0.5 duplicates"),
        ("release.weight", -0.1, "release.weight must be in [0, 1], got -0.1"),
        ("release.weight", True, "release.weight must be a number, got True"),
        ("eval.max_gen_toks", "256", "eval.max_gen_toks must be an integer"),
        ("eval.max_gen_toks", 0, "eval.max_gen_toks must be at least 1, got 0"),
        ("eval.until", "\n\n", "eval.until must be a list"),
        ("merge.dtype", "fp8", "merge.dtype must be null or one of"),
        ("release.name", "a/b", "release.name must be a folder name"),
        ("release.shard_size", "lots", "release.shard_size must be a byte count"),
        ("eval.tempreature", 0.7, "eval.tempreature is not a known key"),
        ("constituents.base", {"source": "x"}, "constituents.base is not a known key"),
    ],
)
def test_bad_values_name_key_value_and_rule(path, value, message):
    with pytest.raises(ParamsError) as err:
        parse_params(with_change(path, value))
    assert message in str(err.value)


def test_missing_key_is_named():
    raw = copy.deepcopy(DEFAULT)
    del raw["release"]["weight"]
    with pytest.raises(ParamsError, match=r"release\.weight is missing"):
        parse_params(raw)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("sweep: [unclosed\n")
    with pytest.raises(ParamsError, match="params.yaml: not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match="cannot read params file"):
        load_params(tmp_path / "absent.yaml")


def test_sizes():
    assert parse_size("2GB", "k") == 2_000_000_000
    assert parse_size("500MB", "k") == 500_000_000
    assert parse_size(1234, "k") == 1234
    with pytest.raises(ParamsError, match="k must be positive"):
        parse_size(0, "k")


def test_weights_are_sorted():
    p = parse_params(with_change("sweep.weights", [1.0, 0.0, 0.5]))
    assert p.sweep.weights == (0.0, 0.5, 1.0)


def test_stage_entry_point_reports_bad_params_without_traceback(tmp_path):
    import subprocess
    import sys

    raw = with_change("sweep.weights", [0.0, 1.5])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.report",
            "--results",
            "r",
            "--samples",
            "s",
            "--len",
            "l",
            "--acc",
            "a",
            "--out",
            "o",
            "--markdown",
            "m",
            "--params",
            str(tmp_path / "params.yaml"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.strip().endswith(
        "params.yaml: sweep.weights[1] must be in [0, 1], got 1.5"
    )
    assert "Traceback" not in done.stderr
