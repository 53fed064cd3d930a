"""The ``prunenet eval`` command: every measurement of one model (and its baseline), and their table.

:func:`evaluate_models` loads each model once and runs what an :class:`~prunenet.config.EvalConfig` asks for:
:func:`~prunenet.perplexity.perplexity`, :func:`~prunenet.zero_shot.zero_shot` and
:func:`~prunenet.inference_cost.inference_cost_subprocess`; :func:`format_evaluation` prints the result.
"""

from __future__ import annotations

from .config import EvalConfig
from .inference_cost import inference_cost_subprocess
from .model_size import count_parameters
from .perplexity import perplexity
from .zero_shot import resolve_tasks, zero_shot


def _measure(spec: str, config: EvalConfig, text: str | None, tasks: list[str] | None, text_file: str | None,
             device: str, progress: bool) -> dict:  # fmt: skip
    """Every measurement ``config`` asks for, on one model; the model is freed before returning."""
    import gc

    from .dtypes import TORCH_DTYPES
    from .models import load_model

    result: dict = {"model": spec}
    if text is not None or tasks:
        model, tokenizer, path = load_model(spec, device=device, dtype=TORCH_DTYPES[config.dtype])
        result["model"] = str(path)
        result["parameters"] = count_parameters(model)
        if tasks:  # before perplexity: an unreachable dataset should fail fast
            result["zero_shot"] = zero_shot(
                model,
                tokenizer,
                tasks,
                tasks_dir=config.tasks_dir,
                limit=config.limit,
                batch_size=config.batch_size,
                progress=progress,
            )
        if text is not None:
            result.update(
                perplexity(
                    model,
                    tokenizer,
                    text,
                    max_tokens=config.max_tokens,
                    context=config.context,
                    stride=config.stride,
                    batch_size=config.batch_size,
                    device=device,
                    progress=progress,
                )
            )
        del model, tokenizer
        gc.collect()  # before the next model: keep one model in memory at a time
    if config.cost:
        result["cost"] = inference_cost_subprocess(
            spec,
            text_file=text_file,
            dtype=config.dtype,
            device=device,
            prompt_tokens=config.cost_prompt_tokens,
            new_tokens=config.cost_new_tokens,
            batch_size=config.cost_batch_size,
            repeats=config.cost_repeats,
            progress=progress,
        )
        result.setdefault("parameters", result["cost"]["parameters"])
    return result


def _rows(r: dict) -> list[tuple[str, str, float | None]]:
    """``(label, shown value, number for ratios or None)`` for every measurement in one ``eval`` result."""
    mib = 2**20
    rows: list[tuple[str, str, float | None]] = []
    if "perplexity" in r:
        rows.append(("perplexity", f"{r['perplexity']:.3f}", r["perplexity"]))
    zs = r.get("zero_shot")
    if zs:
        for name, t in zs["tasks"].items():
            err = f" ± {100 * t['stderr']:.2f}" if t["stderr"] is not None else ""
            rows.append((f"{name} {t['metric']} (%)", f"{100 * t['value']:.2f}{err}", t["value"]))
        rows.append((f"zero-shot average of {len(zs['tasks'])} (%)", f"{100 * zs['average']:.2f}", zs["average"]))
        rows += [(name, "dataset unavailable (see above)", None) for name in zs["unavailable"]]
    rows.append(("parameters", f"{r['parameters']:,}", r["parameters"]))
    c = r.get("cost")
    if c:
        rows += [
            ("weight bytes (MiB)", f"{c['weight_bytes'] / mib:.1f}", c["weight_bytes"]),
            (f"prefill tokens/s ({c['batch_size']}x{c['prompt_tokens']})", f"{c['prefill_tokens_per_s']:.1f}",
             c["prefill_tokens_per_s"]),
            (f"decode tokens/s ({c['new_tokens']} steps)", f"{c['decode_tokens_per_s']:.1f}", c["decode_tokens_per_s"]),
            ("peak memory (MiB)", f"{c['peak_memory_bytes'] / mib:.1f}", c["peak_memory_bytes"]),
            ("peak memory above weights+runtime (MiB)", f"{c['peak_extra_bytes'] / mib:.1f}", c["peak_extra_bytes"]),
        ]  # fmt: skip
    if "perplexity" in r:
        rows.append(("tokens", f"{r['tokens']} scored, {r['windows']} windows of {r['context']} "
                     f"(stride {r['stride']})", None))  # fmt: skip
        rows.append(("time: perplexity", f"{r['seconds']:.1f} s", None))
    if zs:
        rows.append(("time: zero-shot", f"{zs['seconds']:.1f} s", None))
    return rows


def evaluate_models(
    model: str, config: EvalConfig | None = None, *, baseline: str | None = None, text_file: str | None = None,
    progress: bool = True,
) -> dict:  # fmt: skip
    """What ``prunenet eval`` measures, on ``model`` (and on ``baseline`` the same way, under ``"baseline"``).

    Returns ``{"model", "parameters", "perplexity", ... , "zero_shot", "cost", "baseline"}`` as measured.
    """
    from .text import load_text
    from .validate import resolve_device

    config = config or EvalConfig()
    config.validate()
    device = resolve_device(config.device)
    tasks = resolve_tasks(config.tasks) if config.tasks else None
    text = None if config.no_perplexity else load_text(text_file)
    result = _measure(model, config, text, tasks, text_file, device, progress)
    if baseline is not None:
        result["baseline"] = _measure(baseline, config, text, tasks, text_file, device, progress)
    return result


def format_evaluation(result: dict) -> str:
    """:func:`evaluate_models`' result as a table; with a baseline, side by side with the ratio model/baseline."""
    from .tables import format_table

    if "baseline" not in result:
        return format_table(None, [("model", result["model"]), *((label, shown) for label, shown, _ in _rows(result))])
    base = {label: (shown, value) for label, shown, value in _rows(result["baseline"])}
    rows = [("model", result["model"], result["baseline"]["model"], "")]
    for label, shown, value in _rows(result):
        base_shown, base_value = base.get(label, ("-", None))
        ratio = f"{value / base_value:.3f}" if value is not None and base_value else ""
        rows.append((label, shown, base_shown, ratio))
    return format_table(["", "model", "baseline", "model/baseline"], rows, right=[3])
