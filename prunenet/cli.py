"""The command line: parsers built from the config dataclasses and the selector registry, the printed
summaries, and the one error boundary. Each command calls one library function.

Nothing heavy is imported until a command runs, so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Mapping

from . import __version__
from .config import (
    DEFAULT_MODEL,
    SELF_DISTILLATION,
    CompressConfig,
    EvalConfig,
    FinetuneConfig,
    FinetuneRun,
    field_of,
    finetune_config,
    flag,
    parse_ratios,
)
from .selectors import NEEDS, SELECTORS, owner_of, selector_of
from .tables import format_table
from .widths import reached_ratio

EPILOG = "Run `prunenet COMMAND --help` for the flags of a command."


class Parser(argparse.ArgumentParser):
    """``argparse`` with errors in one line (``prog: error: ...``) and exit code 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _method_help() -> str:
    """``--method``'s help: the field's own (which says why the default is what it is), then every method."""
    methods = "; ".join(f"'{s.name}': {s.summary} (needs {NEEDS[s.needs]})" for s in SELECTORS.values())
    return f"{field_of(CompressConfig, 'method').metadata['help']}. The methods: {methods}"


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls,
    skip: tuple[str, ...] = (),
    defaults_with: tuple[str, Mapping[str, object]] | None = None,
) -> None:
    """One flag per field of the config dataclass ``cls``: its help, default, type and choices from the field.

    ``defaults_with=(flag, defaults)``: the fields named in ``defaults`` default to those values when ``flag`` is
    given; where that is another value, the help shows both defaults and a flag left out is absent from the
    parsed namespace, so the command can tell it from an explicit value.
    """
    other_flag, other_defaults = defaults_with or ("", {})
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        cli = dict(f.metadata.get("cli", {}))
        kwargs = {"dest": f.name, "help": f.metadata.get("help", "")}
        if f.name == "method":
            kwargs.update(choices=list(SELECTORS), help=_method_help())
        owner = owner_of(f.name) if issubclass(cls, CompressConfig) else None
        if owner is not None:
            kwargs["help"] += f" (--method {owner} only)"
        action = cli.pop("action", None)
        if f.default is dataclasses.MISSING:
            kwargs.update(required=True, type=cli.pop("type", float))
        elif action == "boolean-optional":
            kwargs.update(action=argparse.BooleanOptionalAction, default=f.default)
        elif isinstance(f.default, bool):
            kwargs.update(action="store_true")
        else:
            kwargs.update(default=f.default, type=cli.pop("type", type(f.default)))
        if f.name == "ratio":
            kwargs["type"] = _ratio_argument
        if other_defaults.get(f.name, f.default) != f.default:
            kwargs["help"] += f" (default: {f.default}; with {other_flag}: {other_defaults[f.name]})"
            kwargs["default"] = argparse.SUPPRESS
        parser.add_argument(flag(f), **kwargs, **cli)


def _ratio_argument(text: str) -> tuple[float, ...]:
    """``--ratio``'s value parsed as argparse reads it (:func:`prunenet.config.parse_ratios`): a bad list is a
    usage error, refused before anything is imported or read."""
    try:
        return parse_ratios(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--ratio ")) from None


def config_of(cls, args: argparse.Namespace):
    """The config dataclass ``cls`` filled from parsed arguments."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def finetune_run_of(args: argparse.Namespace) -> FinetuneRun:
    """The finetune command's options from parsed arguments: the hyper-parameters given as flags over the run's
    defaults (with ``--teacher``: the self-distillation recipe, :func:`prunenet.config.finetune_config`)."""
    given = {name: getattr(args, name) for name in _field_names(FinetuneConfig) if hasattr(args, name)}
    run = {name: getattr(args, name) for name in _field_names(FinetuneRun) if name != "config"}
    return FinetuneRun(**run, config=finetune_config(teacher=args.teacher is not None, **given))


def _add_output_flags(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print the {what} as one JSON object on the last line")
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress reports: neither bars (at a terminal) nor a progress line every 30 s (into a log or a pipe)",
    )
    parser.add_argument(
        "--debug", action="store_true", help="on an error, show the full Python traceback instead of one line"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``prunenet`` parser: one subcommand per library entry point."""
    parser = Parser(
        prog="prunenet",
        description="Calibration-free structured pruning of transformer FFNs (PruneNet, ICLR 2025).",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"prunenet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_compress(sub)
    _add_eval(sub)
    _add_finetune(sub)
    _add_export(sub)
    return parser


def _add_compress(sub) -> None:
    c = sub.add_parser(
        "compress",
        help="prune the FFN of every block and save a model stock transformers can load",
        description="Choose the FFN neurons to keep in every block (by default with selfcal: the model runs on "
        "text it writes itself and the neurons contributing most to each FFN's output are kept; --method prunenet "
        "is the paper's learned policy), remove the others (rows of the in-projections, columns of the "
        "out-projection) and save the smaller model, its tokenizer and a prunenet.json manifest to --out, with "
        "selfcal's neuron scores (scores.safetensors, for --scores) or the paper's policy (policy.safetensors). "
        "Several --ratio values write one model per ratio into --out/r<ratio>. Launched by torchrun (torchrun "
        "--nproc-per-node N -m prunenet compress ...), the layers are split across the N processes (gloo on CPU, "
        "NCCL on GPUs) with the same result as one process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model to prune: '{DEFAULT_MODEL}' (the embedded SmolLM2-135M), a local Hugging Face folder, "
        "or a hub id (needs network)",
    )
    c.add_argument(
        "--out",
        required=True,
        help="output folder: absent, empty, or an earlier prunenet output (with --overwrite). It is written beside "
        "it and renamed into place when complete; one run at a time per --out",
    )
    add_config_arguments(c, CompressConfig)
    _add_output_flags(c, "summary")


def _add_eval(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="perplexity, zero-shot accuracy and inference cost of a model",
        description="Perplexity over the first --max-tokens tokens of a text, in --context-token windows "
        "(non-overlapping, or sliding with --stride). The default text is the held-out split of the embedded State "
        "of the Union corpus. Optionally zero-shot multiple-choice accuracy through lm-eval (--tasks) and the "
        "inference cost (--cost), side by side with a --baseline model (e.g. the dense one).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument(
        "--model", required=True, help=f"a folder written by compress, any local HF folder, or '{DEFAULT_MODEL}'"
    )
    e.add_argument(
        "--baseline",
        default=None,
        help="a second model (e.g. the dense source of a pruned --model) measured the same way and shown side by "
        "side, with the ratio model/baseline",
    )
    e.add_argument("--text-file", default=None, help="UTF-8 text file to evaluate on (default: embedded held-out text)")
    add_config_arguments(e, EvalConfig)
    _add_output_flags(e, "result")


def _add_finetune(sub) -> None:
    f = sub.add_parser(
        "finetune",
        help="recovery fine-tuning (LoRA, merged) of a pruned model",
        description="Train LoRA adapters (peft; `pip install 'prunenet[finetune]'`) on the FFN and attention "
        "projections of a (pruned) model, with early stopping on a held-out tail of the training text, merge them "
        "into the weights and save a model stock transformers loads at the same (pruned) width. With --teacher "
        "DENSE no dataset is used: the teacher writes the text and the model learns its next-token distribution "
        "(KL). Otherwise the text is real: --text-file, or the 'train' split of the embedded State of the Union "
        "corpus (speeches before 1990), disjoint from the held-out 'eval' split (1990 on) that `prunenet eval` uses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    f.add_argument("--model", required=True, help="the model to fine-tune: a folder written by compress, or any model")
    f.add_argument(
        "--out", required=True, help="output folder: absent, empty, or an earlier prunenet output (with --overwrite)"
    )
    # What the model learns from first, then the hyper-parameters, then the rest of the run.
    learns_from = ("text_file", "teacher")
    rest = tuple(name for name in _field_names(FinetuneRun) if name not in learns_from)
    add_config_arguments(f, FinetuneRun, skip=rest)
    add_config_arguments(f, FinetuneConfig, defaults_with=("--teacher", SELF_DISTILLATION))
    add_config_arguments(f, FinetuneRun, skip=("config", *learns_from))
    _add_output_flags(f, "summary")


def _add_export(sub) -> None:
    from .gguf_export import QUANT_HELP, QUANTS

    x = sub.add_parser(
        "export",
        help="write a (pruned) model as one GGUF file that llama.cpp runs",
        description="Write a model folder (a compress output, or any model of an exported family: llama, mistral, "
        "qwen2, qwen3) as one GGUF file for llama.cpp, reading one tensor at a time. The pruned FFN width is "
        "carried by the tensors' shapes and the feed_forward_length key. Quantized types are made by llama.cpp's "
        "own quantizer; a matrix whose rows its blocks do not divide (K-quants need a multiple of 256) gets the "
        "type llama.cpp falls back to, and the summary says so (compress --width-multiple 256 avoids it for the "
        "FFN). The file is written beside --out and renamed into place when complete.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    x.add_argument("--model", required=True, help=f"a folder written by compress, any local HF folder, or "
                   f"'{DEFAULT_MODEL}'")  # fmt: skip
    x.add_argument("--format", default="gguf", choices=["gguf"], help="the file format (llama.cpp's GGUF)")
    x.add_argument("--out", required=True, help="the .gguf file to write; its folder must exist")
    x.add_argument("--quant", default="f16", choices=list(QUANTS), help=f"the tensor type: {QUANT_HELP}")
    x.add_argument("--overwrite", action="store_true", help="replace --out if an earlier prunenet export wrote it "
                   "(any other file is left alone)")  # fmt: skip
    _add_output_flags(x, "summary")


def _run_export(args) -> dict:
    from .gguf_export import alignment_note, export_gguf, fallback_note
    from .tables import format_bytes

    result = export_gguf(args.model, args.out, quant=args.quant, overwrite=args.overwrite, progress=not args.quiet)
    rows = [
        ("output", str(result.out)),
        ("model type", f"{result.model_type} (llama.cpp architecture {result.arch})"),
        ("FFN width", str(result.ffn_width)),
        ("type", result.quant),
        ("tokenizer", _pre_tokenizer_note(result.pre_tokenizer)),
        ("tensors", ", ".join(f"{n} {kind.lower()}" for kind, n in sorted(result.types.items()))),
        ("size", format_bytes(result.bytes)),
        ("time", f"{result.seconds:.1f} s"),
    ]
    if (note := fallback_note(result)) is not None:
        rows.append(("fell back", note))
    if (note := alignment_note(result)) is not None:
        rows.append(("speed", note))
    print(format_table(None, rows))
    return {
        "out": str(result.out), "model_type": result.model_type, "arch": result.arch, "quant": result.quant,
        "ffn_width": result.ffn_width, "tensors": result.tensors, "bytes": result.bytes, "types": result.types,
        "fallbacks": result.fallbacks, "pre_tokenizer": result.pre_tokenizer, "seconds": round(result.seconds, 3),
    }  # fmt: skip


def _pre_tokenizer_note(pre: str | None) -> str:
    import importlib.util

    if pre is not None:
        return f"llama.cpp pre-tokenizer {pre!r} (splits a probe text into the ids transformers gives)"
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama.cpp pre-tokenizer 'default', not checked (pip install 'prunenet[gguf]' checks and chooses)"
    return "llama.cpp pre-tokenizer 'default': none tried splits a probe text as transformers does; give token ids"


def _run_compress(args) -> dict:
    ratios = args.ratio  # parsed and checked by argparse (_ratio_argument)
    args.ratio = ratios[0]
    config = config_of(CompressConfig, args)
    config.validate()
    selector_of(config)

    from . import distributed
    from .pipeline import compress
    from .validate import resolve_device

    # Under torchrun: join the process group (gloo on CPU, NCCL on GPU LOCAL_RANK); else a no-op.
    dist, device = distributed.init(resolve_device(config.device))
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one rank reports
    try:
        config = dataclasses.replace(config, device=device)
        ratio = list(ratios) if len(ratios) > 1 else ratios[0]
        result = compress(args.model, args.out, ratio, config=config, progress=not args.quiet and dist.is_main,
                          dist=dist)  # fmt: skip
    finally:
        distributed.shutdown(dist)
    if not dist.is_main:
        args.json = False
        return {}
    if isinstance(result, list):  # several ratios: one table each; --json prints them as "outputs"
        return {"outputs": [_compress_summary(r) for r in result]}
    return _compress_summary(result)


def _compress_summary(result) -> dict:
    """Print the result table; return the summary ``--json`` prints."""
    summary = {
        "out": str(result.out),
        "model_type": result.model_type,
        "method": result.method,
        "ratio": result.ratio,
        "ffn_width_before": result.ffn_width,
        "ffn_width_after": result.k,
        "ratio_reached": reached_ratio(result.k, result.ffn_width),
        "params_before": result.params_before,
        "params_after": result.params_after,
        "streaming": result.streaming,
        **{key: round(value, 3) for key, value in result.timings.items()},
    }
    t = result.timings
    print(
        format_table(
            None,
            [
                ("output", str(result.out)),
                ("model type", result.model_type),
                ("method", result.method + (" (from --scores)" if result.scored_from is not None else "")),
                (
                    "FFN width",
                    f"{result.ffn_width} -> {result.k} "
                    f"({100 * reached_ratio(result.k, result.ffn_width):.1f}% of the neurons removed)",
                ),
                (
                    "parameters",
                    f"{result.params_before:,} -> {result.params_after:,} "
                    f"({100 * (1 - result.params_after / result.params_before):.1f}% fewer)",
                ),
                ("time: load", f"{t['load_s']:.1f} s"),
                ("time: training", f"{t['train_s']:.1f} s" if "train_s" in t else "-"),
                ("time: selection", f"{t['select_s']:.1f} s" + (" (training included)" if "train_s" in t else "")),
                *(
                    (f"  of which {label}", f"{t[key]:.1f} s")
                    for key, label in (
                        ("probe_s", "probe generation"),
                        ("calibration_s", "reading and tokenizing the calibration text"),
                        ("stats_s", "statistics"),
                        ("compensate_s", "compensation (refitting the kept columns)"),
                    )
                    if key in t
                ),
                ("time: slicing", f"{t['slice_s']:.2f} s" if not result.streaming else "(streamed: while saving)"),
                ("time: saving", f"{t['save_s']:.1f} s" + (" (slicing included)" if result.streaming else "")),
                *_training_rows(result.recovery, t["recover_s"] if result.recovery else None, "recovery "),
            ],
        )
    )
    if result.recovery is not None:
        summary.update({f"recover_{key}": result.recovery[key] for key in RECOVERY_KEYS})
    return summary


RECOVERY_KEYS = ("steps_run", "best_step", "stopped_early", "val_loss_before", "best_val_loss")
"""The fine-tuning record's fields that ``--json`` prints (``finetune``, and ``compress --recover`` prefixed)."""


def _training_rows(info: dict | None, seconds: float | None, prefix: str = "") -> list[tuple[str, str]]:
    """The summary rows of a fine-tuning record (``prunenet finetune``, ``compress --recover``)."""
    if info is None:
        return []
    return [
        (f"{prefix}steps", f"{info['steps_run']} run, best at {info['best_step']}"
         + (" (stopped early)" if info["stopped_early"] else "")),
        (f"{prefix}validation loss", f"{info['val_loss_before']:.4f} -> {info['best_val_loss']:.4f}"),
        (f"time: {prefix or 'training'}".rstrip(), f"{seconds:.1f} s"),
    ]  # fmt: skip


def _run_eval(args) -> dict:
    from .evaluate import evaluate_models, format_evaluation

    result = evaluate_models(args.model, config_of(EvalConfig, args), baseline=args.baseline, text_file=args.text_file,
                             progress=not args.quiet)  # fmt: skip
    print(format_evaluation(result))
    return result


def _run_finetune(args) -> dict:
    from .finetune import finetune

    run = finetune_run_of(args)
    result = finetune(
        model=args.model,
        out=args.out,
        text_file=run.text_file,
        teacher=run.teacher,
        config=run.config,
        eval_tokens=run.eval_tokens,
        device=run.device,
        dtype=run.dtype,
        overwrite=run.overwrite,
        progress=not args.quiet,
    )
    info, t = result.info, result.timings
    steps, loss, seconds = _training_rows(info, t["train_s"])
    ppl = (
        f"{result.perplexity_before:.2f} -> {result.perplexity_after:.2f}"
        if result.perplexity_before is not None
        else "-"
    )
    print(
        format_table(
            None,
            [
                ("output", str(result.out)),
                steps,
                loss,
                (f"held-out perplexity ({args.eval_tokens} tokens)", ppl),
                ("trainable parameters", f"{info['trainable_parameters']:,}"),
                seconds,
            ]
        )
    )  # fmt: skip
    return {
        "out": str(result.out),
        "perplexity_before": result.perplexity_before,
        "perplexity_after": result.perplexity_after,
        **{k: info[k] for k in RECOVERY_KEYS},
        **{key: round(value, 3) for key, value in t.items()},
    }


def _one_line(err: BaseException) -> str:
    """The error as one line: what went wrong, and for OS errors which file and why in plain words."""
    import torch

    from .output import os_error_reason

    if isinstance(err, OSError) and err.errno is not None:
        where = f": {err.filename}" if err.filename else ""
        return f"{os_error_reason(err)}{where}"
    # safetensors and tokenizers (Rust) report OS errors as text: "... (os error 28)".
    rust_io = re.search(r"\(os error (\d+)\)", str(err))
    if rust_io:
        code = int(rust_io.group(1))
        return f"{os_error_reason(OSError(code, os.strerror(code)))} ({' '.join(str(err).split())})"
    if isinstance(err, torch.OutOfMemoryError):
        return "out of device memory; for compress, pass --streaming or a smaller --max-memory (" + (
            " ".join(str(err).split())[:200] + ")"
        )
    return " ".join(str(err).split()) or type(err).__name__


def _anticipated() -> tuple[type[BaseException], ...]:
    """Failures that are about the input or the machine, not bugs: one line and exit code 2."""
    import torch
    from safetensors import SafetensorError

    from .model_errors import ModelLoadError

    return (ValueError, OSError, ModelLoadError, OverflowError, FloatingPointError, SafetensorError,
            torch.OutOfMemoryError)  # fmt: skip


class Terminated(BaseException):
    """SIGTERM arrived (``kill``, ``timeout``, or ``torchrun`` stopping the survivors of a failed rank).

    A ``BaseException`` like ``KeyboardInterrupt``: it unwinds through every cleanup (temporary output
    removed, lock released) and is caught only by :func:`main`.
    """


def _in_finalizer(frame) -> bool:
    """Whether ``frame`` runs inside a ``__del__`` (the garbage collector may call one from any line)."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _stop(signum, frame):
    """SIGINT raises ``KeyboardInterrupt``, SIGTERM :class:`Terminated`, wherever the main thread is.

    Except inside a finalizer: Python prints an exception raised there ("Exception ignored in ...
    __del__") and drops it, and the run would go on to its end. There the signal is sent again a moment
    later, after the finalizer has returned.
    """
    if _in_finalizer(frame):
        _send_again(signum)
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: let the cleanup finish
    raise Terminated()


def _send_again(signum: int) -> None:
    """Send ``signum`` to this process a moment from now, from a helper thread."""
    again = threading.Timer(0.05, os.kill, (os.getpid(), signum))
    again.daemon = True
    again.start()


def _stop_dropped_by(fallback):
    """A ``sys.unraisablehook`` for the run: a stop that Python could only print and drop, because it was raised
    where no caller can receive it (a ``weakref.finalize`` or garbage-collector callback), is sent again once
    that code has returned; anything else goes to ``fallback``."""

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt | Terminated):
            fallback(unraisable)
            return
        signum = signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
        signal.signal(signum, _stop)  # _stop set SIGTERM aside before raising: the stop has not happened yet
        _send_again(signum)

    return hook


def _handle_stop_signals() -> dict[int, object]:
    """Install :func:`_stop` for SIGINT and SIGTERM; returns the handlers it replaced (none off the main thread)."""
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signum == signal.SIGINT and signal.getsignal(signum) is not signal.default_int_handler:
            continue  # ignored (a job started with `&` or nohup) or handled by the caller: leave it so
        try:
            previous[signum] = signal.signal(signum, _stop)
        except ValueError:  # not the main thread (main() called from a worker thread): leave signals alone
            break
    return previous


def _print_json(summary: dict) -> None:
    """The summary as strict JSON: NaN and infinities become ``null`` (with a warning), never ``NaN``."""
    from .checkpoint import strict_json

    clean, replaced = strict_json(summary)
    if replaced:
        logging.getLogger(__name__).warning("--json: not finite, printed as null: %s", ", ".join(replaced))
    print(json.dumps(clean, allow_nan=False))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``prunenet`` and ``python -m prunenet``; returns the exit status.

    The one error boundary: anticipated failures (bad input, unusable models, OS errors on the output,
    numeric trouble) print one line and return 2; Ctrl-C returns 130; ``--debug`` shows the traceback.
    SIGTERM ends the run the way Ctrl-C does (temporary output removed), with status 143. The signal
    handlers come first: a Ctrl-C while torch is imported (about a second) ends in one line too.
    """
    previous = _handle_stop_signals()
    unraisable, sys.unraisablehook = sys.unraisablehook, _stop_dropped_by(sys.unraisablehook)
    command, debug = "prunenet", False
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as done:  # --help, --version (0), or a usage error (2, already printed in one line)
            return done.code or 0
        command, debug = f"prunenet {args.command}", args.debug
        summary = _run(args)
    except BaseException as err:
        code = _exit_status(command, err, debug)
        if code is None:
            raise
        return code
    finally:
        sys.unraisablehook = unraisable
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if args.json:
        _print_json(summary)
    return 0


def _run(args) -> dict:
    """Run the parsed command: logging and progress bars set up for it, then the command itself."""
    logging.basicConfig(level=logging.INFO, format="prunenet: %(message)s")
    # Progress is reported unless --quiet: bars for a person at a terminal, log lines into a file or a pipe
    # (prunenet.progress). Other libraries' bars only at a terminal.
    from .progress import shows_bars

    if not shows_bars(
        not args.quiet
    ):  # read by huggingface_hub and transformers when they load (importing them here costs 0.85 s)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:  # loaded already (main() called from Python): tell it directly
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    return {"compress": _run_compress, "eval": _run_eval, "finetune": _run_finetune, "export": _run_export}[
        args.command
    ](args)


def _exit_status(command: str, err: BaseException, debug: bool) -> int | None:
    """The exit status of a run that ``err`` ended, its one line printed; ``None``: a bug, shown as a traceback."""
    if isinstance(err, (KeyboardInterrupt, Terminated)):
        if debug:
            return None
        what, code = ("terminated", 128 + signal.SIGTERM) if isinstance(err, Terminated) else ("interrupted", 130)
        print(f"{command}: {what} (no partial output is left behind)", file=sys.stderr)
        return code
    if not isinstance(err, Exception):  # SystemExit, GeneratorExit: not ours to report
        return None
    from .distributed import DistributedError  # imports torch: only once a command runs

    if isinstance(err, DistributedError):  # another rank of a torchrun job failed and said why in its own log
        print(f"{command}: error: {err}", file=sys.stderr)
        return 1
    if isinstance(err, _anticipated()) and not debug:
        print(f"{command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return None


def entry() -> None:
    """The ``prunenet`` console script and ``python -m prunenet``: :func:`main`, then exit with its status.

    After Ctrl-C or SIGTERM (status 130 or 143, once the output is cleaned up) the process ends by that
    signal, as the conventions for interrupted programs ask: shells then report 130/143 and a shell loop
    of prunenet runs stops at Ctrl-C instead of going on to the next one. (CPython would sometimes do so
    by itself, when the interrupt landed in code that a library compiled from a string.)
    """
    code = main()
    # The interpreter's final collection of every object (torch's, transformers') took 1.3 s of a no-op
    # compress; frozen objects are skipped. Buffers are flushed and cleanup handlers still run.
    gc.freeze()
    for status, signum in ((130, signal.SIGINT), (128 + signal.SIGTERM, signal.SIGTERM)):
        if code == status:
            sys.stdout.flush()
            sys.stderr.flush()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
    sys.exit(code)
