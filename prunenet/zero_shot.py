"""Zero-shot multiple-choice accuracy of an in-memory model through the lm-evaluation-harness.

:func:`zero_shot` runs lm-eval (optional extra ``prunenet[eval]``) on the paper's tasks (:data:`PAPER_TASKS`)
or on local task definitions; a task whose dataset cannot be had here is reported, not fatal.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from .config import EvalConfig
from .progress import shows_bars

log = logging.getLogger(__name__)

PAPER_TASKS: dict[str, str] = {
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "winogrande": "acc",
}
"""The paper's zero-shot tasks (lm-eval names) and the metric it reports for each."""


class ZeroShotError(ValueError):
    """Zero-shot evaluation cannot run: lm-eval is missing, a task is unknown, or no dataset is reachable."""


def resolve_tasks(spec: str | Sequence[str]) -> list[str]:
    """Task names from ``"paper"`` (the paper's five), ``"piqa,arc_easy"`` or a list; order kept, duplicates dropped."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (n.strip() for n in names):
        for task in PAPER_TASKS if name == "paper" else [name] if name else []:
            if task not in out:
                out.append(task)
    if not out:
        raise ZeroShotError("no zero-shot task named; use --tasks paper or e.g. --tasks piqa,arc_easy")
    return out


def _offline_hint(task: str, tasks_dir: str | os.PathLike | None) -> str:
    """What to do when a task's dataset cannot be fetched (said once per failing task)."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    why = "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
    return (
        f"its dataset could not be loaded ({why}). To evaluate without network, either copy a Hugging Face "
        f"datasets cache that holds it (fetched on a connected machine by running this same command there) and "
        f"point HF_DATASETS_CACHE at it with HF_HUB_OFFLINE=1, or write an lm-eval task YAML whose "
        f"`dataset_path: json` and `dataset_kwargs: {{data_files: {{test: /abs/path/{task}.jsonl}}}}` read local "
        f"files and pass its folder with --tasks-dir" + (f" (searched: {tasks_dir})" if tasks_dir else "")
    )


def _dataset_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "this task's dataset cannot be had here" (not a bug in the task or in us).

    ``datasets`` raises ``ConnectionError`` (an ``OSError``) when the Hub is unreachable or
    ``HF_HUB_OFFLINE=1`` and nothing is cached, and ``DatasetNotFoundError`` for a missing or gated dataset.
    """
    errors: list[type[BaseException]] = [OSError]
    try:
        from datasets.exceptions import DatasetNotFoundError

        errors.append(DatasetNotFoundError)
    except ImportError:  # older datasets
        pass
    return tuple(errors)


def _lm_eval():
    """lm-eval's ``(simple_evaluate, HFLM)``; :class:`ZeroShotError` saying how to install it when it is missing."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ZeroShotError(
            f"zero-shot tasks need the lm-evaluation-harness ({err}); install it with "
            "`pip install 'prunenet[eval]'` (or `pip install lm-eval`)"
        ) from None
    return simple_evaluate, HFLM


def _task_manager(names: Sequence[str], tasks_dir):
    """An lm-eval TaskManager that knows ``names``.

    Indexing lm-eval's thousands of built-in task YAMLs takes ~10 s; when every requested task is
    defined in ``tasks_dir`` alone, only that folder is indexed.
    """
    from lm_eval.tasks import TaskManager

    if tasks_dir is not None:
        if not Path(tasks_dir).is_dir():
            raise FileNotFoundError(f"--tasks-dir {tasks_dir} is not a folder")
        local = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    return TaskManager(include_path=str(tasks_dir) if tasks_dir is not None else None)


def _metric(name: str, task) -> str:
    """The paper's metric for its tasks; for others ``acc_norm`` when the task defines it, else ``acc``."""
    if name in PAPER_TASKS:
        return PAPER_TASKS[name]
    metrics = [m["metric"] for m in (task.config.metric_list or []) if isinstance(m, dict) and "metric" in m]
    return "acc_norm" if "acc_norm" in metrics else "acc"


def _load_tasks(manager, names: Sequence[str], tasks_dir) -> tuple[list, dict[str, str], dict[str, str]]:
    """``(tasks, metrics, unavailable)``: the lm-eval task objects that loaded, the metric of each
    (``{name: metric}``) and why each of the others did not (``{name: reason}``, logged as a warning).

    Raises:
        ZeroShotError: a name is no known task, or no task's dataset loaded.
    """
    loaded, metrics, unavailable = [], {}, {}
    for name in names:
        if name not in manager.all_tasks:
            where = f"lm-eval nor --tasks-dir {tasks_dir}" if tasks_dir else "lm-eval (local task YAMLs: --tasks-dir)"
            raise ZeroShotError(f"unknown zero-shot task {name!r}: not in {where}")
        try:
            task = next(iter(manager.load([name])["tasks"].values()))
        except _dataset_errors() as err:  # offline, Hub unreachable, or no such dataset
            unavailable[name] = f"{type(err).__name__}: {err}; " + _offline_hint(name, tasks_dir)
            log.warning("zero-shot task %s skipped: %s", name, unavailable[name])
            continue
        loaded.append(task)
        metrics[name] = _metric(name, task)
    if not loaded:
        raise ZeroShotError(
            "no zero-shot task could be loaded: " + " | ".join(f"{name}: {why}" for name, why in unavailable.items())
        )
    return loaded, metrics, unavailable


def _harness_model(hflm: type, model, tokenizer, batch_size: int, progress: bool):
    """lm-eval's wrapper ``hflm`` (``HFLM``) of the in-memory ``model``, its progress bars shown only where
    :func:`~prunenet.progress.shows_bars` says so (elsewhere they would be carriage-return noise in a log)."""
    quiet = not shows_bars(progress)

    class _LM(hflm):
        # lm-eval's evaluator shows a progress bar per request type with no way to turn it off.
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or quiet)

    return _LM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _task_scores(results: dict, metrics: dict[str, str]) -> dict[str, dict]:
    """``{name: {"metric", "value", "stderr", "examples", "metrics"}}`` read from ``simple_evaluate``'s results."""
    out = {}
    for name, metric in metrics.items():
        row = results["results"][name]
        stderr = row.get(f"{metric}_stderr,none")
        examples = results.get("n-samples", {}).get(name, {})
        out[name] = {
            "metric": metric,
            "value": float(row[f"{metric},none"]),
            "stderr": float(stderr) if isinstance(stderr, int | float) else None,
            "examples": int(examples.get("effective", examples.get("original", 0))),
            "metrics": {m: float(row[f"{m},none"]) for m in ("acc", "acc_norm") if f"{m},none" in row},
        }
    return out


def zero_shot(
    model,
    tokenizer,
    tasks: str | Sequence[str] = "paper",
    *,
    tasks_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = EvalConfig.batch_size,
    seed: int = 1234,
    progress: bool = True,
) -> dict:
    """Zero-shot multiple-choice accuracy of an in-memory model through lm-eval (``pip install 'prunenet[eval]'``).

    Each task is loaded separately, so a task whose dataset cannot be fetched (no network, HF Hub
    unreachable) is reported under ``"unavailable"`` with what to do, and the others still run.

    Args:
        tasks: ``"paper"`` (PIQA, HellaSwag, ARC-easy, ARC-challenge, WinoGrande), comma-separated
            lm-eval task names, or a list of them.
        tasks_dir: a folder of lm-eval task YAMLs (lm-eval's ``--include_path``), e.g. local copies
            of the datasets.
        limit: evaluate only the first ``limit`` examples of each task (quick checks; not comparable).
    Returns:
        ``{"tasks": {name: {"metric", "value", "stderr", "examples", "metrics" (acc and acc_norm)}},
        "unavailable": {name: reason}, "average": mean of the values of the tasks that ran, "limit", "seconds"}``;
        metric ``acc_norm`` except WinoGrande ``acc``, as in the paper.
    Raises:
        ZeroShotError: lm-eval is not installed, a task name is unknown, or no task's dataset loaded.
    """
    names = resolve_tasks(tasks)
    simple_evaluate, hflm = _lm_eval()
    start = time.perf_counter()
    manager = _task_manager(names, tasks_dir)
    loaded, metrics, unavailable = _load_tasks(manager, names, tasks_dir)
    results = simple_evaluate(
        model=_harness_model(hflm, model, tokenizer, batch_size, progress),
        tasks=loaded,
        num_fewshot=0,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=1000,  # acc/acc_norm use the closed-form stderr of a mean; 0 would drop stderrs
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    scores = _task_scores(results, metrics)
    values = [score["value"] for score in scores.values()]
    return {
        "tasks": scores,
        "unavailable": unavailable,
        "average": sum(values) / len(values),
        "limit": limit,
        "seconds": time.perf_counter() - start,
    }
