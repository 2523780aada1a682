"""lm-eval hooks of the mergesweep_math task: read a {"question", "answer"} jsonl,
prompt with the question as the user turn, grade with stages.grading.
"""

import copy
import json
import time
from pathlib import Path
from typing import Any

from lm_eval.api.task import ConfigurableTask

from stages.grading import EvalDataError, GradingError, check_gold, grade

__all__ = [
    "Docs",
    "EvalDataError",
    "MathTask",
    "doc_to_text",
    "load_docs",
    "process_results",
    "read_jsonl",
]


def read_jsonl(path: Path) -> list[dict[str, str]]:
    """The problems of an eval file; each line needs string `question` and `answer`."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}:{n}: not JSON ({e.msg})") from None
        for key in ("question", "answer"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str):
                raise EvalDataError(f"{path}:{n}: needs a string {key!r}, got {row!r}")
        try:
            check_gold(row["answer"])
        except GradingError as e:
            raise EvalDataError(f"{path}:{n}: {e}") from None
        rows.append({"question": row["question"], "answer": row["answer"]})
    if not rows:
        raise EvalDataError(f"{path}: no problems")
    return rows


class Docs(list):
    """The problems as plain dicts. lm-eval walks the docs twice a point, and an Arrow
    dataset costs 7 ms a walk for 320 rows; `features` is all it asks beyond a list."""

    features = {"question": None, "answer": None}


def load_docs(data_file: str | None = None, **_: Any) -> dict[str, Docs]:
    """custom_dataset: lm-eval passes the TaskManager's metadata as keywords."""
    if data_file is None:
        raise EvalDataError(
            "mergesweep_math needs TaskManager(metadata={'data_file': <jsonl path>})"
        )
    return {"test": Docs(read_jsonl(Path(data_file)))}


def doc_to_text(doc: dict[str, str]) -> str:
    return doc["question"]


def process_results(doc: dict[str, str], results: list[str]) -> dict[str, float]:
    verdict = grade(results[0], doc["answer"])
    return {
        "exact_match": float(verdict.correct),
        "formatted": float(verdict.formatted),
    }


class MathTask(ConfigurableTask):
    """The task, with the work lm-eval repeats at every evaluate() done once.

    A sweep asks the same prompts at every weight. lm-eval builds all requests again at
    each call (7 ms of templating and copying for 300 prompts, 1% to 4% of a point's
    generation) and serializes the task's config into each result, reading every hook's
    source with inspect (1.4 ms). The first build is kept, and a later call with the
    same arguments only clears the responses the previous point left on its requests;
    the dumped config is kept too. set_config drops both.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        # lm-eval hands a `class:` task its YAML config, `class` key included.
        super().__init__(config={k: v for k, v in config.items() if k != "class"})
        self._built_with: dict[str, Any] | None = None
        self._dumped: dict | None = None
        self.build_s = 0.0  # spent in builds, for the sweep's timing

    def build_all_requests(self, **kwargs: Any) -> None:
        if self._built_with == kwargs:
            for inst in self._instances:
                inst.resps.clear()
                inst.filtered_resps.clear()
            return
        start = time.perf_counter()
        super().build_all_requests(**kwargs)
        self._built_with = kwargs
        self.build_s += time.perf_counter() - start

    def set_config(self, key: str, value: Any, update: bool = False) -> None:
        # Requests carry copies of the config (generation_kwargs): build them again.
        self._built_with = None
        self._dumped = None
        super().set_config(key, value, update)

    def dump_config(self) -> dict:
        if self._dumped is None:
            self._dumped = super().dump_config()
        return copy.deepcopy(self._dumped)
