"""Stage sweep: merge `len` and `acc` in memory at each sweep weight, evaluate the point
with lm-eval (stages/tasks); write results.json and samples/w<weight>.jsonl.
Reads params sections task, eval, sweep and merge; known points come from a cache.
"""

import argparse
import functools
import hashlib
import json
import logging
import math
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lm_eval import evaluator
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from tqdm import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    Qwen2ForCausalLM,
)
from transformers.initialization import no_init_weights

from stages import paths
from stages.checkpoint import Checkpoint, CheckpointError, dtype_from_name
from stages.grading import EvalDataError, GradingError, grade
from stages.hashing import manifest, sha256_file, write_json
from stages.merging import LM_HEAD, MergeError, MergePlan, linear_merge, plan_merge
from stages.params import Params, load_params_or_exit

log = logging.getLogger(__name__)

STAGES = Path(__file__).resolve().parent
TASKS_DIR = STAGES / "tasks"
TASK = "mergesweep_math"
CODE_FILES = ("sweep.py", "grading.py", "merging.py", "checkpoint.py")
PACKAGES = ("torch", "transformers", "tokenizers", "lm_eval", "math-verify")
POINT_FORMAT = "mergesweep-point/1"
GENERATION_CONFIG = "generation_config.json"
# Generating with a tiny model on the CPU is all small matmuls and Python: one thread
# took 1.1 s where two took 14.1 s (64 prompts x 32 tokens, 2 cores shared, load 4.8).
CPU_EVAL_THREADS = 1


class SweepError(RuntimeError):
    """The sweep cannot run on these inputs; the message says which and why."""


def weight_label(w: float) -> str:
    """`0.30`: the label of a point in file names, as the report stage reads them."""
    return f"{w:.2f}"


def check_labels(weights: tuple[float, ...]) -> None:
    seen: dict[str, float] = {}
    for w in weights:
        if (label := weight_label(w)) in seen:
            raise SweepError(
                f"sweep.weights {seen[label]!r} and {w!r} share the file label "
                f"w{label}; use weights that differ in the first two decimals"
            )
        seen[label] = w


# --- the cache key --------------------------------------------------------------------


def constituent_files(root: Path) -> dict[str, dict]:
    """The folder's file manifest: provenance.json's when it matches the folder's
    files and sizes (fetch wrote it), else hashed here."""
    prov = root / "provenance.json"
    on_disk = {
        p.relative_to(root).as_posix(): p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and p.name != "provenance.json"
    }
    if prov.exists():
        files = json.loads(prov.read_text()).get("files", {})
        if {k: v.get("size") for k, v in files.items()} == on_disk:
            return files
        log.warning("%s does not match the folder's files; hashing them", prov)
    return manifest(root, exclude=("provenance.json",))


def code_version() -> str:
    """sha256 over the source of everything that shapes a point's numbers."""
    h = hashlib.sha256()
    files = [STAGES / f for f in CODE_FILES] + sorted(
        p for p in TASKS_DIR.iterdir() if p.suffix in (".py", ".yaml")
    )
    for f in files:
        h.update(f"{f.relative_to(STAGES).as_posix()}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def sweep_inputs(params: Params, len_dir: Path, acc_dir: Path) -> dict[str, Any]:
    """Everything but the weight that decides a point's result."""
    return {
        "constituents": {
            "len": constituent_files(len_dir),
            "acc": constituent_files(acc_dir),
        },
        "datasets": {
            name: sha256_file(Path(path))
            for name, path in sorted(params.task.datasets.items())
        },
        "task": {
            "limit": params.task.limit,
            "system_prompt": params.task.system_prompt,
        },
        "eval": asdict(params.eval),
        "merge": asdict(params.merge),
        "code": code_version(),
        "packages": {p: version(p) for p in PACKAGES},
    }


def point_key(inputs: dict[str, Any], weight: float) -> str:
    canon = json.dumps({**inputs, "weight": weight}, sort_keys=True, default=list)
    return hashlib.sha256(canon.encode()).hexdigest()


def read_cached(path: Path) -> dict | None:
    """A cached point, or None when absent or unreadable (it is then re-evaluated)."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable cache entry %s (%s)", path, e)
        return None
    if record.get("format") != POINT_FORMAT or record.get("key") != path.stem:
        log.warning("ignoring cache entry %s: not a %s record", path, POINT_FORMAT)
        return None
    return record


def write_cached(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    # json.dumps: json.dump streams through the pure-Python encoder, 3x slower here.
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record, sort_keys=True))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# --- generation records ---------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """One response as generated ids: `tokens` counts up to and including EOS."""

    ids: tuple[int, ...]
    tokens: int
    truncated: bool


def count_generated(
    row: list[int], eos_ids: frozenset[int], pad_id: int | None, max_new: int
) -> Generation:
    """Cut a generated row (prompt removed) at its first EOS.

    Without EOS, trailing pads are what generate() fills in after a stop string ended
    the row early; such a row is truncated only if it used all `max_new` tokens.
    """
    ends = [row.index(e) for e in eos_ids if e in row]
    if ends:
        n = min(ends) + 1
        return Generation(tuple(row[:n]), n, truncated=False)
    n = len(row)
    while n and pad_id is not None and row[n - 1] == pad_id:
        n -= 1
    return Generation(tuple(row[:n]), n, truncated=n >= max_new)


class RecordingHFLM(HFLM):
    """HFLM that keeps every generated row's ids, per prompt, and checks the prompts:
    exactly one BOS, and room for max_gen_toks without truncating the prompt."""

    def __init__(self, *args: Any, eos_ids: frozenset[int], **kwargs: Any) -> None:
        self.eos_ids = eos_ids
        self.records: dict[str, list[Generation]] = defaultdict(list)
        self.generate_s = 0.0
        self.generate_total_s = 0.0
        self.encode_s = 0.0  # tokenizing prompts the caches below had not seen
        self._contexts: list[str] = []
        self._templated: dict[tuple, str] = {}
        self._encoded: dict[tuple[str, bool | None, int | None], list[int]] = {}
        self._batches: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(*args, **kwargs)

    def tok_batch_encode(
        self,
        strings: list[str],
        padding_side: str = "left",
        left_truncate_len: int | None = None,
        truncation: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(strings), padding_side, left_truncate_len, truncation)
        if key not in self._batches:
            start = time.perf_counter()
            ids, mask = super().tok_batch_encode(
                strings, padding_side=padding_side, truncation=truncation
            )
            self._check_prompts(strings, ids, mask, left_truncate_len)
            self._batches[key] = ids, mask
            self.encode_s += time.perf_counter() - start
        self._contexts = list(strings)
        ids, mask = self._batches[key]
        return ids.clone(), mask.clone()

    def _check_prompts(
        self,
        strings: list[str],
        ids: torch.Tensor,
        mask: torch.Tensor,
        left_truncate_len: int | None,
    ) -> None:
        if left_truncate_len and ids.shape[1] > left_truncate_len:
            raise SweepError(
                f"a prompt of {ids.shape[1]} tokens leaves no room for max_gen_toks "
                f"in max_length {self.max_length}; shorten the prompt or lower "
                "eval.max_gen_toks"
            )
        bos = self.tokenizer.bos_token_id
        if bos is None:
            return
        counts = ((ids == bos) & mask.bool()).sum(dim=1).tolist()
        for s, n in zip(strings, counts, strict=True):
            if n != 1:
                raise SweepError(f"prompt carries {n} BOS tokens, not 1: {s[:80]!r}")

    def generate_until(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[str]:
        # The stage shows one bar for the sweep's points; a bar per point's requests
        # would cost 3 ms a point in tqdm's updates and drown it.
        return super().generate_until(requests, disable_tqdm=True)

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any
    ) -> torch.Tensor:
        start = time.perf_counter()
        out = super()._model_generate(context, max_length, stop, **kwargs)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        elapsed = time.perf_counter() - start
        self.generate_s += elapsed
        self.generate_total_s += elapsed
        width, max_new = context.shape[1], max_length - context.shape[1]
        rows = out[:, width:].tolist()
        pad = self.tokenizer.pad_token_id  # a lookup through the tokenizer: ~3 us
        for s, row in zip(self._contexts, rows, strict=True):
            self.records[s].append(count_generated(row, self.eos_ids, pad, max_new))
        return out

    # lm-eval renders and encodes every prompt again at each point; the tokenizer and
    # the prompts do not change within a sweep, so each is done once (tok_batch_encode
    # keeps its batches too: lm-eval forms the same ones at every point).
    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        key = (
            tuple(tuple(sorted(m.items())) for m in chat_history),
            add_generation_prompt,
        )
        if key not in self._templated:
            self._templated[key] = super().apply_chat_template(
                chat_history, add_generation_prompt
            )
        return self._templated[key]

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        if kwargs:
            return super().tok_encode(
                string, add_special_tokens, left_truncate_len, **kwargs
            )
        key = (string, add_special_tokens, left_truncate_len)
        if key not in self._encoded:
            start = time.perf_counter()
            self._encoded[key] = super().tok_encode(*key)
            self.encode_s += time.perf_counter() - start
        return list(self._encoded[key])

    def tok_decode(self, tokens: Any, skip_special_tokens: bool = True) -> str:
        # lm-eval decodes each response through the tokenizer's Python wrapper, which
        # spends most of its 20 us checking the ids' types; for a list of ids and no
        # clean-up, the Rust tokenizer it wraps returns the same text in a third of it.
        if isinstance(tokens, list) and self._plain_decoder is not None:
            return self._plain_decoder.decode(
                tokens, skip_special_tokens=skip_special_tokens
            )
        return super().tok_decode(tokens, skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def _plain_decoder(self) -> Any:
        """The Rust tokenizer, where decoding through it gives the wrapper's text."""
        tok = self.tokenizer
        if tok.is_fast and not tok.clean_up_tokenization_spaces:
            return tok.backend_tokenizer
        return None

    def take(self, context: str) -> Generation:
        """The oldest unclaimed record of `context`: lm-eval keeps request order."""
        if not self.records.get(context):
            raise SweepError(f"no generation recorded for prompt {context[:80]!r}")
        return self.records[context].pop(0)


# --- the model, merged in place -------------------------------------------------------


@contextmanager
def cpu_threads(device: torch.device, n: int) -> Iterator[None]:
    """Run with `n` intra-op threads when the model is on the CPU."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint as a CPU view of its memory-mapped file.

    The merge runs on the CPU, where the release runs it: mergekit's addcmul_ is a
    fused multiply-add there, and only the same device guarantees the same bits.
    """
    return {name: ckpt.tensor(name) for name in sorted(ckpt.tensors)}


def build_model(donor: Path, plan: MergePlan, device: torch.device) -> Qwen2ForCausalLM:
    """The donor's architecture and generation config in the merge dtype, untied when
    the merge has its own lm_head (as the release's config.json is).

    Its weights are left unset: the merge writes every one (merge_targets checks) before
    any point runs. Reading the donor's weights only to overwrite them took 0.13 s of
    the embedded sweep's 0.16 s load, most of it transformers' first from_pretrained.
    The model is built on the CPU, as from_pretrained does, so its rotary tables are the
    bits a loaded release has; then moved.
    """
    config = AutoConfig.from_pretrained(donor, trust_remote_code=False)
    if config.model_type != "qwen2":
        raise SweepError(
            f"{donor}/config.json: model_type must be qwen2, got {config.model_type!r}"
        )
    if any(j.name == LM_HEAD for j in plan.jobs):
        config.tie_word_embeddings = False
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(
            config, dtype=plan.dtype, trust_remote_code=False
        )
    model.tie_weights()  # init_weights, skipped above, is where construction ties
    model.generation_config = load_generation_config(donor)
    return model.to(device).eval().requires_grad_(False)


def load_generation_config(donor: Path) -> GenerationConfig:
    """The donor's generation settings as from_pretrained finds them: its
    generation_config.json, else those an older config.json carries.

    A generation_config.json that does not parse is an error here; from_pretrained
    would quietly fall back to config.json.
    """
    own = (donor / GENERATION_CONFIG).is_file()
    try:
        if own:
            return GenerationConfig.from_pretrained(donor)
        return GenerationConfig.from_pretrained(
            donor, config_file_name="config.json", _from_model_config=True
        )
    except (OSError, ValueError) as e:
        file = donor / (GENERATION_CONFIG if own else "config.json")
        raise SweepError(f"{file}: not a valid generation config ({e})") from None


def merge_targets(
    model: torch.nn.Module, names: list[str], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The model tensor each merged tensor is written to, checked to cover them all.

    Tied weights share storage, so a model's parameters() can hide a checkpoint name;
    going by the merge's names and then checking storage covers both cases.
    """
    state = model.state_dict()
    missing = [n for n in names if n not in state]
    if missing:
        raise SweepError(f"the model has no tensor {missing[0]} of the checkpoint")
    targets = {n: state[n] for n in names}
    for n, t in targets.items():
        if t.dtype != dtype:
            raise SweepError(f"model tensor {n} is {t.dtype}, the merge gives {dtype}")
    written = {t.untyped_storage().data_ptr() for t in targets.values()}
    unwritten = [
        n for n, t in state.items() if t.untyped_storage().data_ptr() not in written
    ]
    if unwritten:
        raise SweepError(
            f"model tensors {', '.join(unwritten[:5])} are in no constituent checkpoint"
        )
    return targets


@torch.no_grad()
def merge_into(
    targets: dict[str, torch.Tensor],
    plan: MergePlan,
    len_state: dict[str, torch.Tensor],
    acc_state: dict[str, torch.Tensor],
    w: float,
    *,
    normalize: bool,
) -> None:
    """Overwrite the model's weights with the linear merge at `w` (share of len)."""
    for job in plan.jobs:
        a, b = job.sources
        merged = linear_merge(
            [len_state[a], acc_state[b]],
            [w, 1.0 - w],
            normalize=normalize,
            out_dtype=plan.dtype,
        )
        targets[job.name].copy_(merged)


# --- one point ------------------------------------------------------------------------


def gen_kwargs(params: Params) -> dict[str, Any]:
    """Generation settings for the task, every one from params (none of lm-eval's)."""
    e = params.eval
    out: dict[str, Any] = {
        "until": list(e.until),
        "max_gen_toks": e.max_gen_toks,
        "do_sample": e.do_sample,
    }
    if e.do_sample:
        out |= {"temperature": e.temperature, "top_p": e.top_p}
    return out


def load_tasks(params: Params) -> dict[str, Any]:
    """One lm-eval task per dataset, keyed by the params' dataset name."""
    tasks = {}
    for name, path in params.task.datasets.items():
        manager = TaskManager(
            include_path=str(TASKS_DIR),
            include_defaults=False,
            metadata={"data_file": str(Path(path).resolve()), "dataset": name},
        )
        task = manager.load([TASK])["tasks"][TASK]
        task.set_config("generation_kwargs", gen_kwargs(params))
        tasks[name] = task
    return tasks


def summarize(samples: list[dict]) -> dict[str, Any]:
    n = len(samples)
    tokens = [s["tokens"] for s in samples]
    # Sums of counts are exact, so each mean is the correctly rounded quotient.
    return {
        "accuracy": sum(s["correct"] for s in samples) / n,
        "mean_tokens": sum(tokens) / n,
        "median_tokens": float(statistics.median(tokens)),
        "p90_tokens": float(np.percentile(tokens, 90)),
        "format_rate": sum(s["formatted"] for s in samples) / n,
        "truncation_rate": sum(s["truncated"] for s in samples) / n,
        "n": n,
    }


def check_agreement(name: str, result: dict, rows: list[dict]) -> None:
    """lm-eval's counts of correct and formatted answers equal this project's."""
    for metric, field in (
        ("exact_match,none", "correct"),
        ("formatted,none", "formatted"),
    ):
        ours = sum(r[field] for r in rows)
        theirs = result[metric] * len(rows)
        if abs(theirs - ours) > 0.5:
            raise SweepError(
                f"{name}: lm-eval's {metric} counts {theirs:.0f} of {len(rows)} "
                f"samples, stages.grading {ours}"
            )


def lm_eval_metrics(result: dict) -> dict[str, float]:
    """lm-eval's numeric metrics of one task, under lm-eval's own names."""
    return {
        k: float(v)
        for k, v in result.items()
        if "," in k and isinstance(v, int | float) and not isinstance(v, bool)
    }


def pooled(per_dataset: dict[str, dict], key: str = "lm_eval") -> dict[str, float]:
    """lm-eval's metrics over all datasets: means weighted by each dataset's n."""
    total = sum(d["n"] for d in per_dataset.values())
    names = set.intersection(*(set(d[key]) for d in per_dataset.values()))
    return {
        m: sum(d[key][m] * d["n"] for d in per_dataset.values()) / total
        for m in sorted(names)
    }


class PointEvaluator:
    """Holds the constituents, one model and lm-eval's tasks; evaluates weights."""

    def __init__(self, params: Params, len_dir: Path, acc_dir: Path) -> None:
        start = time.perf_counter()
        self.params = params
        self.device = resolve_device(params.merge.device)
        ckpts = [Checkpoint(len_dir), Checkpoint(acc_dir)]
        dtype = params.merge.dtype
        self.plan = plan_merge(ckpts, dtype=dtype_from_name(dtype) if dtype else None)
        self.dtype = self.plan.dtype
        self.len_state, self.acc_state = (load_state(c) for c in ckpts)
        # acc donates config, tokenizer and generation_config, as in the release.
        self.model = build_model(acc_dir, self.plan, self.device)
        names = [j.name for j in self.plan.jobs]
        self.targets = merge_targets(self.model, names, self.dtype)
        tokenizer = AutoTokenizer.from_pretrained(acc_dir, trust_remote_code=False)
        eos = self.model.generation_config.eos_token_id
        eos_ids = {tokenizer.eos_token_id} | set(
            eos if isinstance(eos, list) else [eos]
        )
        self.lm = RecordingHFLM(
            pretrained=self.model,
            tokenizer=tokenizer,
            batch_size=params.eval.batch_size,
            max_length=self.model.config.max_position_embeddings,
            eos_ids=frozenset(i for i in eos_ids if i is not None),
        )
        self.tasks = load_tasks(params)
        self.load_s = time.perf_counter() - start
        self.n_params = sum(math.prod(j.shape) for j in self.plan.jobs)

    def seed(self) -> None:
        s = self.params.eval.seed
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def evaluate(self, w: float) -> tuple[dict, list[dict]]:
        """The point at weight `w` and its samples, with its timing (seconds): merge,
        generation, setup (building and tokenizing the prompts, which the first point
        does for all), score (the rest: lm-eval's bookkeeping and metrics, the
        samples), total. run_sweep adds the cache write and a share of the load."""
        start = time.perf_counter()
        with cpu_threads(self.device, CPU_EVAL_THREADS):
            merge_into(
                self.targets,
                self.plan,
                self.len_state,
                self.acc_state,
                w,
                normalize=self.params.merge.normalize,
            )
        merged = time.perf_counter()
        self.seed()
        self.lm.generate_s = 0.0
        setup_before = self.setup_s()
        with torch.inference_mode(), cpu_threads(self.device, CPU_EVAL_THREADS):
            results = evaluator.evaluate(
                lm=self.lm,
                task_dict={"tasks": self.tasks},
                limit=self.params.task.limit,
                bootstrap_iters=0,
                log_samples=False,
                system_instruction=self.params.task.system_prompt,
                apply_chat_template=True,
                fewshot_as_multiturn=False,
            )
        samples = self.collect_samples(results["results"])
        point = self.point(w, results["results"], samples)
        end = time.perf_counter()
        setup = self.setup_s() - setup_before
        generate = self.lm.generate_s
        point["timing"] = {
            "load_s": 0.0,
            "setup_s": setup,
            "merge_s": merged - start,
            "generate_s": generate,
            "score_s": end - merged - generate - setup,
            "write_s": 0.0,
            "total_s": end - start,
        }
        return point, samples

    def setup_s(self) -> float:
        """Time spent so far building requests and tokenizing prompts (cache misses)."""
        return self.lm.encode_s + sum(t.build_s for t in self.tasks.values())

    def collect_samples(self, results: dict) -> list[dict]:
        """Every sample of the point, from the requests lm-eval answered.

        lm-eval scored each sample's filtered response with the task's hook, which
        grades as this does: a response its filters changed, or counts of correct or
        formatted answers that differ, stop the sweep.
        """
        out = []
        for name, task in self.tasks.items():
            rows = []
            for inst in sorted(task.instances, key=lambda i: i.doc_id):
                prompt, response = inst.arguments[0], inst.resps[0]
                for key, scored in inst.filtered_resps.items():
                    if scored != response:
                        raise SweepError(
                            f"{name} doc {inst.doc_id}: lm-eval scored {scored!r} "
                            f"(filter {key}), the model answered {response!r}"
                        )
                gen = self.lm.take(prompt)
                verdict = grade(response, inst.doc["answer"])
                rows.append(
                    {
                        "dataset": name,
                        "doc_id": inst.doc_id,
                        "question": inst.doc["question"],
                        "prompt": prompt,
                        "response": response,
                        "tokens": gen.tokens,
                        "truncated": gen.truncated,
                        "extracted": verdict.extracted,
                        "gold": inst.doc["answer"],
                        "correct": verdict.correct,
                        "formatted": verdict.formatted,
                    }
                )
            check_agreement(name, results[name], rows)
            out.extend(rows)
        leftover = sum(len(v) for v in self.lm.records.values())
        if leftover:
            raise SweepError(f"{leftover} generations were not matched to a sample")
        return out

    def point(self, w: float, results: dict, samples: list[dict]) -> dict:
        per_dataset = {}
        for name in self.tasks:
            rows = [s for s in samples if s["dataset"] == name]
            per_dataset[name] = summarize(rows) | {
                "lm_eval": lm_eval_metrics(results[name])
            }
        return {
            "weight": w,
            **summarize(samples),
            "lm_eval": pooled(per_dataset),
            "datasets": per_dataset,
        }


# --- the stage ------------------------------------------------------------------------


def run_sweep(
    params: Params, len_dir: Path, acc_dir: Path, cache: Path
) -> tuple[list[dict], dict[float, list[dict]]]:
    """Every sweep point, sorted by weight, with its samples; new points evaluated."""
    check_labels(params.sweep.weights)
    inputs = sweep_inputs(params, len_dir, acc_dir)
    keys = {w: point_key(inputs, w) for w in params.sweep.weights}
    records = {w: read_cached(cache / f"{k}.json") for w, k in keys.items()}
    todo = [w for w, r in records.items() if r is None]
    log.info(
        "%d points: %d cached, %d to evaluate",
        len(keys),
        len(keys) - len(todo),
        len(todo),
    )
    ev = PointEvaluator(params, len_dir, acc_dir) if todo else None
    for w in tqdm(todo, desc="sweep points", unit="point"):
        point, samples = ev.evaluate(w)
        timing = point["timing"]
        timing["load_s"] = ev.load_s / len(todo)
        timing["total_s"] += timing["load_s"]
        records[w] = {
            "format": POINT_FORMAT,
            "key": keys[w],
            "inputs": inputs,
            "point": point,
            "samples": samples,
        }
        start = time.perf_counter()
        write_cached(cache / f"{keys[w]}.json", records[w])
        # Known only once written: results.json has it, the cache entry has 0.
        timing["write_s"] = time.perf_counter() - start
        timing["total_s"] += timing["write_s"]
    points = [records[w]["point"] | {"cached": w not in todo} for w in sorted(records)]
    if ev is not None:
        log_summary(params, ev, len(todo))
    return points, {w: records[w]["samples"] for w in records}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log_summary(params: Params, ev: PointEvaluator, evaluated: int) -> None:
    log.info(
        "seed %d, dtype %s, device %s; %.2fM parameters, %s problems, %d points "
        "evaluated, load %.1fs, generation %.1fs; peak memory %.0f MiB",
        params.eval.seed,
        str(ev.dtype).removeprefix("torch."),
        ev.device,
        ev.n_params / 1e6,
        {n: len(t.eval_docs) for n, t in ev.tasks.items()},
        evaluated,
        ev.load_s,
        ev.lm.generate_total_s,
        peak_memory_mb(ev.device),
    )


def write_outputs(out: Path, points: list[dict], samples: dict[float, list]) -> None:
    """samples/ replaced whole, then results.json: no half-written output looks done."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".samples.tmp-"))
    tmp.chmod(0o755)
    for w, rows in samples.items():
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        (tmp / f"w{weight_label(w)}.jsonl").write_text(lines)
    final = out / "samples"
    if final.exists():
        old = Path(tempfile.mkdtemp(dir=out, prefix=".samples.old-"))
        final.rename(old / "samples")
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    write_json(out / "results.json", points)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.sweep", description=__doc__)
    parser.add_argument("--len", type=Path, required=True, dest="len_dir")
    parser.add_argument("--acc", type=Path, required=True, dest="acc_dir")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("lm_eval").setLevel(logging.WARNING)

    start = time.perf_counter()
    params = load_params_or_exit(args.params)
    cache = paths.cache_dir() / "points"
    try:
        points, samples = run_sweep(params, args.len_dir, args.acc_dir, cache)
    except (SweepError, MergeError, CheckpointError, GradingError, EvalDataError) as e:
        raise SystemExit(f"error: {e}") from None
    write_outputs(args.out, points, samples)
    log.info(
        "wrote %s: %d points in %.1fs (cache %s)",
        args.out / "results.json",
        len(points),
        time.perf_counter() - start,
        cache,
    )


if __name__ == "__main__":
    sys.exit(main())
