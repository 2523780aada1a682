"""Stage suites: the real recipe's six math test sets, fetched pinned from the hub.

Writes `<out>/<name>.jsonl` ({"question", "answer"} per line) and
`<out>/provenance.json` (repo, requested and resolved commit, file hashes, rows).
"""

import argparse
import io
import json
import logging
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow.parquet as pq

from stages import hub
from stages.grading import GradingError, boxed_answers, check_gold
from stages.hashing import manifest, write_json

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


class SuiteError(ValueError):
    """A dataset whose files or rows cannot be turned into the task's jsonl."""


@dataclass(frozen=True)
class Suite:
    """Where one test set lives on the hub and which fields hold question and answer.

    `answer_from_solution`: the `answer` field is a worked solution; the gold answer is
    its last `\\boxed{}`. `files`: the data files of the split; empty means the files
    the hub's naming convention gives the split (`data/<split>-*.parquet`, ...).
    """

    name: str
    repo: str
    revision: str
    split: str
    question: str
    answer: str
    answer_from_solution: bool = False
    files: tuple[str, ...] = ()


# The evaluation copies Open-RS (knoveleng/open-rs, src/open_r1/evaluate.py) loads, with
# the fields its prompt functions read. The two pinned commits and file names are the
# ones recorded with sha256s in a public provenance note for the same files; the others
# follow "main" and the stage records the commit it got.
SUITES: tuple[Suite, ...] = (
    Suite(
        "aime24",
        "HuggingFaceH4/aime_2024",
        "2fe88a2f1091d5048c0f36abc874fb997b3dd99a",
        "train",
        "problem",
        "answer",
        files=("data/train-00000-of-00001.parquet",),
    ),
    Suite("aime25", "yentinglin/aime_2025", "main", "train", "problem", "answer"),
    Suite("amc23", "knoveleng/AMC-23", "main", "train", "problem", "answer"),
    Suite(
        "math500",
        "HuggingFaceH4/MATH-500",
        "6e4ed1a2a79af7d8630a6b768ec859cb5af4d3be",
        "test",
        "problem",
        "answer",
        files=("test.jsonl",),
    ),
    Suite(
        "minerva",
        "knoveleng/Minerva-Math",
        "main",
        "train",
        "problem",
        "solution",
        answer_from_solution=True,
    ),
    Suite(
        "olympiadbench",
        "knoveleng/OlympiadBench",
        "main",
        "train",
        "question",
        "answer",
    ),
)


def split_files(paths: Iterable[str], split: str, *, where: str) -> list[str]:
    """The data files of `split`, by the names `datasets` gives splits on the hub."""
    data = sorted(p for p in paths if p.endswith(DATA_SUFFIXES))
    pattern = re.compile(rf"{re.escape(split)}([-_.].*)?")
    chosen = []
    for path in data:
        pure = PurePosixPath(path)
        stem = pure.name.split(".")[0]
        if pattern.fullmatch(stem) or split in pure.parent.parts:
            chosen.append(path)
    if not chosen and split == "train" and len(data) == 1:
        chosen = data  # a single data file is the train split
    if not chosen:
        raise SuiteError(
            f"{where}: no data file for split {split!r} among {data or 'no files'}; "
            "name the files in the suite's `files`"
        )
    return chosen


def read_rows(path: Path) -> list[dict]:
    """Rows of a parquet, jsonl or json (list of objects) file."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise SuiteError(f"{path}: expected a JSON list of rows")
        return rows
    rows = []
    for n, line in enumerate(io.StringIO(text), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise SuiteError(f"{path}:{n}: not JSON ({err})") from err
    return rows


def answer_text(value: object, *, where: str) -> str:
    """The gold answer as text: 27.0 -> "27", ["1", "2"] -> "1, 2", \\boxed{x} -> x."""
    if isinstance(value, bool) or value is None:
        raise SuiteError(f"{where}: answer is {value!r}, expected a string or number")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, list | tuple):
        if not value:
            raise SuiteError(f"{where}: answer is an empty list")
        return ", ".join(answer_text(v, where=where) for v in value)
    if not isinstance(value, str):
        raise SuiteError(f"{where}: answer has type {type(value).__name__}")
    boxed = boxed_answers(value)
    text = boxed[-1] if boxed else value.strip()
    if not text:
        raise SuiteError(f"{where}: answer is empty")
    return text


def convert(suite: Suite, rows: Sequence[dict], *, where: str) -> list[dict]:
    """Rows -> [{"question", "answer"}], naming the row and field of any bad value."""
    out = []
    for i, row in enumerate(rows):
        at = f"{where} row {i}"
        for key in (suite.question, suite.answer):
            if key not in row:
                raise SuiteError(f"{at}: no field {key!r}; fields are {sorted(row)}")
        question = row[suite.question]
        if not isinstance(question, str) or not question.strip():
            raise SuiteError(f"{at}: {suite.question!r} is {question!r}, not text")
        value = row[suite.answer]
        if suite.answer_from_solution:
            boxed = boxed_answers(value) if isinstance(value, str) else []
            if not boxed:
                raise SuiteError(f"{at}: {suite.answer!r} has no \\boxed{{}} answer")
            value = boxed[-1]
        answer = answer_text(value, where=f"{at} field {suite.answer!r}")
        try:
            check_gold(answer)
        except GradingError as e:
            raise SuiteError(f"{at} field {suite.answer!r}: {e}") from None
        out.append({"question": question.strip(), "answer": answer})
    if not out:
        raise SuiteError(f"{where}: no rows")
    return out


def fetch_suite(suite: Suite, raw: Path) -> tuple[list[dict], dict]:
    """Resolve, download and convert one suite; rows and its provenance entry."""
    commit = hub.resolve_revision(suite.repo, suite.revision, repo_type="dataset")
    where = f"{suite.name} (dataset {suite.repo}@{commit})"
    listing = hub.list_files(suite.repo, commit, repo_type="dataset")
    files = list(suite.files) or split_files(listing, suite.split, where=where)
    dest = raw / suite.name / commit
    shutil.rmtree(dest, ignore_errors=True)
    got = hub.download_files(suite.repo, commit, files, dest, repo_type="dataset")
    rows = [r for f in files for r in read_rows(dest / f)]
    converted = convert(suite, rows, where=where)
    entry = {
        "source": f"hf://datasets/{suite.repo}",
        "requested_revision": suite.revision,
        "resolved_revision": commit,
        "split": suite.split,
        "question_field": suite.question,
        "answer_field": suite.answer,
        "answer_from": "last \\boxed{}" if suite.answer_from_solution else "field",
        "files": got,
        "rows": len(converted),
    }
    return converted, entry


def write_suites(out: Path, suites: Sequence[Suite]) -> dict:
    """Fetch every suite and replace `out` with the jsonl files, all or nothing."""
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.parent / f".{out.name}.raw"
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        provenance = {"format": "mergesweep-suites/1", "suites": {}}
        for suite in suites:
            rows, entry = fetch_suite(suite, raw)
            with open(tmp / f"{suite.name}.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            provenance["suites"][suite.name] = entry
            log.info("%s: %d rows from %s", suite.name, len(rows), entry["source"])
        provenance["outputs"] = manifest(tmp)
        write_json(tmp / "provenance.json", provenance)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(raw, ignore_errors=True)
    return provenance


def _replace_dir(new: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        out.rename(old)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _select(only: str | None) -> list[Suite]:
    if not only:
        return list(SUITES)
    known = {s.name: s for s in SUITES}
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--only: unknown suite(s) {unknown}; known: {sorted(known)}")
    return [known[n] for n in names]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", help="comma-separated suite names (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    suites = _select(args.only)
    started = time.monotonic()
    try:
        provenance = write_suites(args.out, suites)
    except (hub.HubError, SuiteError) as err:
        raise SystemExit(f"suites: {err}") from err
    rows = sum(e["rows"] for e in provenance["suites"].values())
    log.info(
        "%d suites, %d rows -> %s in %.1fs",
        len(suites),
        rows,
        args.out,
        time.monotonic() - started,
    )


if __name__ == "__main__":
    main()
