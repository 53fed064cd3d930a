"""Training LoRA recovery adapters: on real text (:func:`train_lora`) or to a teacher's next-token distribution
(:func:`distill_lora`), both through one loop with early stopping (:func:`fit_adapters`).

Both wrap the model with LoRA (:func:`prunenet.lora.with_lora`) and hold out the end of what they train on:
the last ``holdout_tokens`` tokens of the text, or the last sequences the teacher generated. The loop
validates on it before training and every ``eval_every`` steps, and restores the adapters of the lowest
validation loss (before training the adapters are the identity, so a run that never improves leaves the
model as it was).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from .adapters import ModelAdapter, get_adapter
from .config import FinetuneConfig, FinetuneError
from .distill import TeacherTargets, full_kl, topk_kl
from .lora import with_lora
from .progress import progress_bar


def _windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``(N, seq_len)`` windows of a ``(T,)`` token vector (the tail shorter than a window dropped)."""
    count = ids.numel() // seq_len
    return ids[: count * seq_len].view(count, seq_len)


def _mean_loss(model, windows: torch.Tensor, batch_size: int, device) -> float:
    """Mean next-token loss over ``windows`` ``(N, L)`` (every window the same length, so a plain mean); called
    by :func:`fit_adapters` in eval mode without gradients."""
    total = 0.0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size].to(device)
        total += float(model(input_ids=batch, labels=batch).loss) * batch.shape[0]
    return total / windows.shape[0]


def _split_tokens(tokenizer, text: str, cfg: FinetuneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Training windows ``(N, L)`` and validation windows ``(M, L)``: the last ``holdout_tokens`` tokens.

    The validation slice is the *end* of the text, contiguous and never trained on (a random choice of
    windows would put validation windows next to, and overlapping in content with, training ones).
    """
    # verbose=False: the ids are windowed here, so the "longer than model_max_length" warning is moot.
    ids = torch.tensor(
        tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"],
        dtype=torch.long,
    )
    holdout = max(cfg.holdout_tokens, cfg.seq_len)
    if ids.numel() < holdout + cfg.seq_len:
        raise FinetuneError(
            f"the training text has {ids.numel()} tokens: too few for a {holdout}-token held-out slice plus one "
            f"{cfg.seq_len}-token training window; give a longer --text-file or lower --holdout-tokens/--seq-len"
        )
    return _windows(ids[:-holdout], cfg.seq_len), _windows(ids[-holdout:], cfg.seq_len)


def train_lora(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    cfg: FinetuneConfig,
    *,
    adapter: ModelAdapter | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """Train LoRA adapters on ``model`` (modified: wrapped by ``peft``) with ``text``; return the PEFT model.

    Training windows are ``cfg.seq_len`` tokens of ``text`` (all but its held-out tail), visited in a
    seeded random order, epoch after epoch if ``steps`` needs more. The validation loss on the held-out
    tail is measured before training and every ``eval_every`` steps; the adapters of the lowest one are
    restored at the end (before training, the adapters are the identity, so a run that never improves
    leaves the model as it was).

    Returns:
        ``(peft_model, info)``: the ``peft`` model in eval mode holding the best adapters (unmerged), and
        ``{"steps_run", "best_step", "stopped_early", "val_loss_before", "best_val_loss", "history":
        [{"step", "train_loss", "val_loss"}], "train_windows", "holdout_windows", "tokens_per_step",
        "trainable_parameters", "target_modules", "seconds"}``.
    """
    cfg.validate()
    device = torch.device(device)
    train, holdout = _split_tokens(tokenizer, text, cfg)
    model, targets = with_lora(model, adapter or get_adapter(model.config), cfg)

    def train_loss(idx: torch.Tensor) -> torch.Tensor:
        batch = train[idx].to(device)
        return model(input_ids=batch, labels=batch).loss

    info = fit_adapters(model, cfg, train.shape[0], train_loss,
                        lambda: _mean_loss(model, holdout, cfg.batch_size, device), progress=progress)  # fmt: skip
    info.update(train_windows=int(train.shape[0]), holdout_windows=int(holdout.shape[0]), target_modules=targets)
    return model, info


def distill_lora(
    model: torch.nn.Module,
    targets: TeacherTargets,
    cfg: FinetuneConfig,
    *,
    teacher: torch.nn.Module | None = None,
    adapter: ModelAdapter | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """Train LoRA adapters on ``model`` to match the teacher's next-token distribution on its own text.

    The items are the teacher's generated sequences (``targets.ids``, ``(N, L)``); the last
    ``ceil(holdout_tokens / L)`` of them are held out, and early stopping watches the KL on them. The loss is
    :func:`~prunenet.distill.topk_kl` against the stored top-``K`` targets, or, with ``targets.top_k == 0``,
    :func:`~prunenet.distill.full_kl` against ``teacher`` run on the same batch; plus
    ``cfg.hard_label_weight`` times the next-token loss on the generated text.

    Returns:
        ``(peft_model, info)`` as :func:`train_lora`, with ``train_sequences`` and ``holdout_sequences``.
    """
    cfg.validate()
    device = torch.device(device)
    count, length = targets.ids.shape
    holdout = min(count - 1, math.ceil(cfg.holdout_tokens / length))
    if holdout < 1:
        raise FinetuneError(
            f"the teacher's text is {count} sequence(s) of {length} tokens: too few for a held-out sequence plus "
            "one to train on; raise --teacher-tokens or lower --seq-len"
        )
    if targets.top_k == 0 and teacher is None:
        raise ValueError("full-vocabulary distillation (--kd-top-k 0) needs the teacher model")
    model, lora_targets = with_lora(model, adapter or get_adapter(model.config), cfg)
    train_idx, held_idx = torch.arange(count - holdout), torch.arange(count - holdout, count)

    def loss_on(idx: torch.Tensor, hard: bool) -> torch.Tensor:
        ids, logp, index, tail = targets.rows(idx, device)
        logits = model(input_ids=ids).logits
        if targets.top_k:
            loss = topk_kl(logits, logp, index, tail)
        else:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids).logits
            loss = full_kl(logits, teacher_logits)
        if hard and cfg.hard_label_weight:
            labels = ids[:, 1:].reshape(-1)
            loss = loss + cfg.hard_label_weight * torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(labels.numel(), -1).float(), labels
            )
        return loss

    def held_out_kl() -> float:
        total = 0.0
        for i in range(0, holdout, cfg.batch_size):
            idx = held_idx[i : i + cfg.batch_size]
            total += float(loss_on(idx, hard=False)) * idx.numel()
        return total / holdout

    info = fit_adapters(model, cfg, count - holdout, lambda idx: loss_on(train_idx[idx], hard=True), held_out_kl,
                        progress=progress)  # fmt: skip
    info.update(train_sequences=count - holdout, holdout_sequences=holdout, target_modules=lora_targets)
    return model, info


def _lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then linear decay to 0 at ``steps`` (step counts from 0)."""
    warmup = min(cfg.warmup_steps, cfg.steps - 1)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warmup))


class _Batches:
    """Micro-batches of ``batch_size`` item indices ``(B,)``: a seeded random order over ``range(items)``,
    renewed each epoch (the tail of an order shorter than a batch is skipped)."""

    def __init__(self, items: int, batch_size: int, seed: int):
        self.items, self.batch_size = items, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.cursor = torch.randperm(items, generator=self.generator), 0

    def next(self) -> torch.Tensor:
        if self.cursor + self.batch_size > self.order.numel():  # next epoch, new order
            self.order, self.cursor = torch.randperm(self.items, generator=self.generator), 0
        idx = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return idx


class _BestAdapters:
    """The trainable parameters of the lowest validation loss so far (a copy), its step, and how many
    validations have not improved on it since."""

    def __init__(self, model: torch.nn.Module, loss: float):
        self.model = model
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.loss, self.step, self.bad = loss, 0, 0
        self.state = self._snapshot()

    def _snapshot(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {name: params[name].detach().clone() for name in self.names}

    def update(self, step: int, loss: float) -> None:
        """Keep the parameters if ``loss`` is a new lowest; else count one more validation without improvement."""
        if loss < self.loss:
            self.loss, self.state, self.step, self.bad = loss, self._snapshot(), step, 0
        else:
            self.bad += 1

    def restore(self) -> None:
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for name, value in self.state.items():
                params[name].copy_(value)


def _validate(model: torch.nn.Module, val_loss: Callable[[], float]) -> float:
    """``val_loss()`` in eval mode without gradients; the model's mode restored after."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        value = float(val_loss())
    model.train(was_training)
    return value


def _accumulate(train_loss: Callable[[torch.Tensor], torch.Tensor], batches: _Batches, grad_accum: int) -> list[float]:
    """Backpropagate ``grad_accum`` micro-batches, each loss scaled by ``1 / grad_accum``; their losses."""
    losses = []
    for _ in range(grad_accum):
        loss = train_loss(batches.next())
        (loss / grad_accum).backward()
        losses.append(float(loss.detach()))
    return losses


def fit_adapters(
    model: torch.nn.Module,
    cfg: FinetuneConfig,
    items: int,
    train_loss: Callable[[torch.Tensor], torch.Tensor],
    val_loss: Callable[[], float],
    *,
    progress: bool = True,
) -> dict:
    """The training loop of LoRA recovery, whatever the loss: AdamW on the trainable parameters of ``model``.

    Each optimizer step takes ``grad_accum`` micro-batches of ``batch_size`` item indices (a seeded random
    order over ``range(items)``, renewed each epoch) and backpropagates ``train_loss(indices)``; gradients are
    clipped to norm 1. ``val_loss()`` is measured before training and every ``eval_every`` steps; the
    parameters of the lowest value are restored at the end, and ``patience`` validations without
    improvement stop the run.

    Returns:
        ``{"steps_run", "best_step", "stopped_early", "val_loss_before", "best_val_loss", "history",
        "tokens_per_step", "trainable_parameters", "seconds"}``.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg))
    start = time.perf_counter()
    val_before = _validate(model, val_loss)
    best = _BestAdapters(model, val_before)
    history = [{"step": 0, "train_loss": None, "val_loss": val_before}]
    batches = _Batches(items, cfg.batch_size, cfg.seed)
    model.train()
    bar = progress_bar(range(1, cfg.steps + 1), desc="fine-tuning", unit="step", enabled=progress)
    losses: list[float] = []  # since the last validation
    step, stopped_early = 0, False
    for step in bar:
        losses += _accumulate(train_loss, batches, cfg.grad_accum)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # before the step: it is meant to bound the update
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val, train = _validate(model, val_loss), sum(losses, 0.0) / len(losses)
            history.append({"step": step, "train_loss": train, "val_loss": val})
            bar.set_postfix(train_loss=f"{train:.3f}", val_loss=f"{val:.3f}", best=f"{best.loss:.3f}")
            losses = []
            best.update(step, val)
            if best.bad >= cfg.patience:
                stopped_early = step < cfg.steps
                break
    bar.close()
    best.restore()
    model.eval()
    return {
        "steps_run": step,
        "best_step": best.step,
        "stopped_early": stopped_early,
        "val_loss_before": val_before,
        "best_val_loss": best.loss,
        "history": history,
        "tokens_per_step": cfg.batch_size * cfg.grad_accum * cfg.seq_len,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "seconds": time.perf_counter() - start,
    }


__all__ = ["distill_lora", "fit_adapters", "train_lora"]
