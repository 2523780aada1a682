import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from stages.cli import apply_recipe, main
from stages.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_default_params_are_the_embedded_recipe():
    assert (ROOT / "params.yaml").read_text() == (
        ROOT / "recipes" / "embedded.yaml"
    ).read_text()


def test_recipe_switch_keeps_the_old_params(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text() + "# my edit\n")
    apply_recipe("real", ROOT, params)
    p = load_params(params)
    assert p.constituents["len"].source.startswith("hf://Zachary1150/len_")
    assert p.eval.max_gen_toks == 4096
    assert (tmp_path / "params.yaml.bak").read_text().endswith("# my edit\n")
    with pytest.raises(ParamsError, match="no recipe 'fast'; known recipes: embedded"):
        apply_recipe("fast", ROOT, params)


def test_unknown_command_is_bad_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["frobnicate"])
    assert exit_.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_store_on_loopback(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    port = free_port()
    cmd = [sys.executable, "-m", "stages.cli", "ui", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline, body = time.monotonic() + 120, b""
        while time.monotonic() < deadline and not body:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
                    body = r.read()
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
                time.sleep(0.5)
        assert body == b"OK"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_ui_on_a_port_in_use_fails_and_says_what_to_do(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"cannot serve on 127.0.0.1:{port}" in err and "--port" in err


def test_recipe_switch_names_the_next_steps(tmp_path, capsys, monkeypatch):
    params = tmp_path / "params.yaml"
    monkeypatch.chdir(ROOT)
    assert main(["recipe", "real", "--params", str(params)]) == 0
    assert "next: mergesweep suites --out data/suites && mergesweep lock" in (
        capsys.readouterr().out
    )
