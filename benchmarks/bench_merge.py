"""Benchmark `mergesweep merge` against the I/O floor and `mergekit-yaml`, real shapes.

`nice -n 5 python -m benchmarks.bench_merge [ROOT]` from the repository root (ROOT:
mergesweep-bench in the temp dir) prints wall times, peak anonymous memory and
issue 4's ratios.
"""

import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from benchmarks.realshape import DEFAULT_ROOT, make_checkpoints
from stages.checkpoint import Checkpoint
from stages.hashing import manifest, manifest_id, write_json

log = logging.getLogger(__name__)

BUF = 16 << 20
CLI = "import sys; from stages.release import cli; sys.exit(cli())"


def _with_provenance(len_dir: Path, acc_dir: Path, work: Path) -> tuple[Path, Path]:
    """Symlinked copies of the inputs plus provenance.json, as fetch leaves them."""
    out = []
    for name, src in (("len", len_dir), ("acc", acc_dir)):
        dst = work / "in" / name
        dst.mkdir(parents=True)
        for p in src.iterdir():
            (dst / p.name).symlink_to(p)
        files = manifest(src)
        prov = {"format": "mergesweep-constituent/1", "name": name, "files": files}
        prov |= {"source": str(src), "requested_revision": None}
        prov["resolved_revision"] = "local:" + manifest_id(files)
        write_json(dst / "provenance.json", prov)
        out.append(dst)
    return out[0], out[1]


def read_files(files: list[Path]) -> float:
    """Seconds to read `files` sequentially into one reused buffer."""
    buf = bytearray(BUF)
    view = memoryview(buf)
    start = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - start


def copy_file(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    shutil.copyfile(src, dst)
    return time.perf_counter() - start


def run_measured(cmd: list[str], **kwargs: object) -> dict:
    """Wall time and peak RssAnon and VmRSS of one command.

    Peaks are the maxima of /proc/<pid>/status sampled every 5 ms: pages mapped from
    the input files count in RssFile, not RssAnon, so RssAnon is the anonymous memory.
    """
    peak = {"RssAnon": 0, "VmRSS": 0}
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs
    )

    def sample() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                text = status.read_text()
            except OSError:
                return
            for key in peak:
                if m := re.search(rf"{key}:\s+(\d+) kB", text):
                    peak[key] = max(peak[key], int(m.group(1)) * 1024)
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    t.join()
    if proc.returncode:
        raise RuntimeError(
            f"{cmd[0]} failed ({proc.returncode}):\n{err.decode()[-3000:]}"
        )
    return {
        "wall": wall,
        "rss_anon_peak": peak["RssAnon"],
        "rss_peak": peak["VmRSS"],
        "stderr": err.decode(),
    }


def mergekit_yaml(len_dir: Path, acc_dir: Path, weight: float) -> str:
    from stages.release import mergekit_config

    refs = {"len": str(len_dir), "acc": str(acc_dir)}
    return mergekit_config(refs, {"len": weight, "acc": 1 - weight}, "bfloat16", True)


def same_tensors(a: Path, b: Path) -> tuple[int, int]:
    """(tensors compared, tensors whose bytes differ)."""
    ca, cb = Checkpoint(a), Checkpoint(b)
    names = sorted(set(ca.tensors) | set(cb.tensors))
    bad = 0
    for n in names:
        if n not in ca.tensors or n not in cb.tensors:
            bad += 1
            continue
        x, y = ca.tensor(n), cb.tensor(n)
        if x.dtype != y.dtype or not torch.equal(
            x.view(torch.uint8), y.view(torch.uint8)
        ):
            bad += 1
    return len(names), bad


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_ROOT
    len_dir, acc_dir = make_checkpoints(root)
    inputs = sorted(len_dir.glob("*.safetensors")) + sorted(
        acc_dir.glob("*.safetensors")
    )
    size = sum(f.stat().st_size for f in inputs)
    work = root.parent / f"{root.name}-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        figures = _measure(len_dir, acc_dir, inputs, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures["input_bytes"] = size
    _report(figures)


def _measure(len_dir: Path, acc_dir: Path, inputs: list[Path], work: Path) -> dict:
    f: dict = {}
    read_files(inputs)  # into the page cache
    f["read_both"] = read_files(inputs)
    f["copy_one"] = copy_file(inputs[0], work / "copy.safetensors")
    (work / "copy.safetensors").unlink()
    f["floor"] = f["read_both"] + f["copy_one"]

    cfg = work / "mergekit.yml"
    cfg.write_text(mergekit_yaml(len_dir, acc_dir, 0.3))
    exe = str(Path(sys.executable).with_name("mergekit-yaml"))
    read_files(inputs)
    mk = run_measured(
        [exe, str(cfg), str(work / "mk"), "--no-copy-tokenizer", "--quiet"]
    )
    f["mergekit"] = mk

    for label, dirs in (
        ("ours", _with_provenance(len_dir, acc_dir, work)),
        ("ours_plain", (len_dir, acc_dir)),
    ):
        read_files(inputs)
        cmd = [sys.executable, "-c", CLI, "--len", str(dirs[0]), "--acc", str(dirs[1])]
        cmd += ["--weight", "0.3", "--out", str(work / label)]
        res = run_measured(cmd, cwd=Path.cwd())
        m = re.search(r"merged in ([\d.]+) s", res["stderr"])
        res["merge_wall"] = float(m.group(1)) if m else res["wall"]
        f[label] = res
    f["compared"], f["differing"] = same_tensors(work / "ours", work / "mk")
    shutil.rmtree(work / "ours_plain")
    return f


def _report(f: dict) -> None:
    ours, plain, mk = f["ours"], f["ours_plain"], f["mergekit"]
    gb = 1e9
    rows = [
        ("inputs", f"{f['input_bytes'] / gb:.2f} GB (two bf16 checkpoints)"),
        ("read both inputs (page cache)", f"{f['read_both']:.2f} s"),
        ("copy one checkpoint", f"{f['copy_one']:.2f} s"),
        ("floor = read both + copy one", f"{f['floor']:.2f} s"),
        ("mergekit-yaml, process wall", f"{mk['wall']:.2f} s"),
        ("mergekit-yaml, peak RssAnon / VmRSS",
         f"{mk['rss_anon_peak'] / gb:.2f} / {mk['rss_peak'] / gb:.2f} GB"),
        ("ours, process wall", f"{ours['wall']:.2f} s"),
        ("ours, write_release wall", f"{ours['merge_wall']:.2f} s"),
        ("ours, peak RssAnon / VmRSS",
         f"{ours['rss_anon_peak'] / gb:.3f} / {ours['rss_peak'] / gb:.2f} GB"),
        ("ours, plain folders (hashes inputs): process / write_release",
         f"{plain['wall']:.2f} / {plain['merge_wall']:.2f} s"),
        ("write_release / floor (target <= 2)",
         f"{ours['merge_wall'] / f['floor']:.2f}"),
        ("mergekit / ours, process walls (target >= 4)",
         f"{mk['wall'] / ours['wall']:.2f}"),
        ("ours peak RssAnon (target <= 0.5 GB)",
         f"{ours['rss_anon_peak'] / gb:.3f} GB"),
        ("tensors bit-identical to mergekit",
         f"{f['compared'] - f['differing']} of {f['compared']}"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    keep = ("read_both", "copy_one", "floor", "compared", "differing", "input_bytes")
    fields = ("wall", "merge_wall", "rss_anon_peak", "rss_peak")
    walls = {k: {x: f[k].get(x) for x in fields} for k in ("ours", "ours_plain")}
    walls["mergekit"] = {x: mk.get(x) for x in fields}
    print(json.dumps({k: f[k] for k in keep} | walls))


if __name__ == "__main__":
    main()
