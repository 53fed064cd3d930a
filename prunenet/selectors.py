"""Neuron selectors: which ``k`` of the ``n`` FFN neurons of every block to keep.

:data:`SELECTORS` is the one registry. Each :class:`Selector` declares what it needs from a source (see
:data:`NEEDS`) and which :class:`~prunenet.config.PruneConfig` options are its own; the CLI's ``--method``
choices and help, the docs' method table and the manifest are derived from it. Every source serves every
selector; what it needs decides how a streamed checkpoint plans its memory (:func:`prunenet.sources.plan_source`).

Every selector returns one sorted, unique ``(k,)`` int64 CPU vector per FFN unit: per layer, or per expert
of every layer in a mixture-of-experts model (each expert's state matrix is its own; one policy serves
them all, since they share ``(n, d)``). With ``dist`` (a
``torchrun`` job) each rank reads only its own layers, keeps the seeded draws of the others in step,
and the ranks exchange their layers' indices: every rank gets all ``L`` vectors, equal to a single
process's.

Nothing here imports torch at module level: the CLI reads the registry to build ``--help``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .compensation import ColumnStore
    from .config import PruneConfig
    from .distributed import Distributed
    from .policy import SparsityPredictor
    from .scores import NeuronScores
    from .sources import Source

log = logging.getLogger(__name__)

NEEDS = {
    "nothing": "no weights",
    "weights": "the FFN weights only",
    "model": "forward passes of the model (block by block from the checkpoint when streaming)",
}
"""What a selector reads, from least to most. A stream of a checkpoint keeps the state matrices in its memory plan
for ``"weights"``, one decoder block resident at a time for ``"model"``."""


@dataclass
class Selection:
    """What a selector chose.

    Attributes:
        keeps: per layer, sorted ``(k,)`` int64 CPU indices of the kept neurons.
        policy: the PruneNet policy that chose them (trained, or loaded with ``--policy``), else ``None``.
        training: the training trace for the manifest (``None`` when nothing was trained).
        train_seconds: time spent training (``None`` when nothing was trained).
        timings: seconds of the selector's own phases (e.g. ``{"probe_s": ..., "stats_s": ...}``).
        manifest: the selector's own manifest fields (e.g. ``{"calibration": ...}``: the text it ran on).
        columns: the refitted out-projection columns of every unit (``--compensate``), which the writer puts in
            place of the sliced ones; ``None`` when the kept weights stay as they are.
        scores: the activation scores the neurons were ranked by (``selfcal``; on rank 0 of a distributed run),
            which the output keeps as ``scores.safetensors``; ``None`` for the other methods.
    """

    keeps: list[torch.Tensor]
    policy: SparsityPredictor | None = None
    training: dict | None = None
    train_seconds: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    columns: ColumnStore | None = None
    scores: NeuronScores | None = None


@dataclass(frozen=True)
class Selector:
    """One neuron-selection method.

    Attributes:
        name: the ``--method`` value.
        summary: one line for ``--help`` and the docs.
        needs: a key of :data:`NEEDS`.
        options: the :class:`~prunenet.config.PruneConfig` fields only this selector reads.
        choose: ``(source, k, config, dist=, progress=, **prepared) -> Selection``.
        prepare: ``(config, adapter, model_config, device, tokenizer) -> prepared``, run before any weights are
            loaded (to fail early on a bad ``--policy``, ``--calibration`` or ``--scores``; ``tokenizer()`` loads
            the model's tokenizer): a dict of keyword arguments for ``choose`` (``{"policy": ...}``,
            ``{"windows": ...}``), and under ``"config"`` the config to run with if it is another (``--scores``'s
            probe settings); ``None`` when there is nothing to prepare.
    """

    name: str
    summary: str
    needs: str
    choose: Callable[..., Selection]
    options: tuple[str, ...] = ()
    prepare: Callable[..., object] | None = field(default=None)


# -- per-layer helpers ---------------------------------------------------------------------------------------


def _dist(dist: Distributed | None) -> Distributed:
    from .distributed import Distributed

    return dist or Distributed()


def _gather(keeps: list, k: int, owned: range, dist: Distributed) -> list[torch.Tensor]:
    """Every rank's ``keeps`` (``None`` for the layers it does not own) made whole on every rank."""
    if not dist.active:
        return keeps
    import torch

    table = torch.zeros(len(keeps), k, dtype=torch.int64)
    for i in owned:
        table[i] = keeps[i]
    return list(dist.all_reduce_sum(table))  # each row has one non-zero contributor: exact


def random_keeps(num_layers: int, n: int, k: int, seed: int = 0) -> list[torch.Tensor]:
    """``k`` of ``n`` neurons uniformly at random per layer, from one generator seeded with ``seed``.

    Needs no weights, so every rank of a distributed job draws every layer itself.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=generator)[:k].sort().values for _ in range(num_layers)]


def magnitude_keeps(states: Sequence[torch.Tensor], k: int, dist: Distributed | None = None) -> list[torch.Tensor]:
    """The ``k`` rows of largest L2 norm of each state matrix ``(n, d)``."""
    import torch

    dist = _dist(dist)
    owned = dist.owned_layers(len(states))
    keeps = [torch.topk(states[i].float().norm(dim=1).cpu(), k).indices.sort().values if i in owned else None
             for i in range(len(states))]  # fmt: skip
    return _gather(keeps, k, owned, dist)


def policy_keeps(
    states: Sequence[torch.Tensor],
    k: int,
    policy: SparsityPredictor,
    selection: str = "sample",
    seed: int = 0,
    dist: Distributed | None = None,
) -> list[torch.Tensor]:
    """The rows ``policy`` keeps in each state matrix ``(n, d)``: drawn from its scores (``"sample"``, seeded,
    one generator over the layers in order) or its ``k`` highest keep-probabilities (``"topk"``)."""
    import torch

    from .policy import select_rows, skip_selection
    from .reward import state_shape

    dist = _dist(dist)
    (n, _), _ = state_shape(states)
    owned = dist.owned_layers(len(states))
    generator = torch.Generator().manual_seed(seed)
    device = next(policy.parameters()).device
    keeps: list[torch.Tensor | None] = []
    for i in range(len(states)):
        if i in owned:
            with torch.no_grad():
                logits = policy.logits(states[i].to(device)).cpu()
            keeps.append(select_rows(logits, k, selection, generator))
        else:  # another rank's layer: consume its random numbers all the same, to stay in step
            skip_selection(n, selection, generator)
            keeps.append(None)
    return _gather(keeps, k, owned, dist)


# -- the selectors -------------------------------------------------------------------------------------------


def _choose_random(source: Source, k: int, config: PruneConfig, **_) -> Selection:
    return Selection(random_keeps(source.num_units, source.width, k, config.seed))


def _choose_magnitude(source: Source, k: int, config: PruneConfig, *, dist=None, **_) -> Selection:
    return Selection(magnitude_keeps(source.states(), k, dist))


def _prepare_policy(config: PruneConfig, adapter, model_config, device: str, tokenizer) -> dict:
    """Before any weights are loaded: ``--policy`` loaded and shape-checked, or else the reward backend
    checked for ``device`` (e.g. triton without CUDA is refused here, not after loading a model)."""
    from .ops import resolve_reward_backend

    hidden, width = adapter.hidden_size(model_config), adapter.ffn_width(model_config)
    if config.policy is None:
        resolve_reward_backend(config.reward_backend, device)
        return {"policy": None}
    from .checkpoint import load_policy
    from .policy import check_policy_shape

    policy = load_policy(config.policy)
    check_policy_shape(policy, hidden, width)
    return {"policy": policy}


def _choose_prunenet(source: Source, k: int, config: PruneConfig, *, policy=None, dist=None, progress=True):
    """The paper: train the policy on the state matrices (unless ``--policy`` gave one), then select with it."""
    from .train import train_policy

    dist = _dist(dist)
    states = source.states()
    training = seconds = None
    if policy is None:
        tick = time.perf_counter()
        cfg = config.train_config()
        result = train_policy(
            states, k, cfg, progress=progress and dist.is_main, spill_grams=source.spill_grams, dist=dist
        )
        policy, seconds = result.policy, time.perf_counter() - tick
        training = {
            "episodes": cfg.episodes,
            "best_episode": result.best_episode,
            "best_reward": result.best_reward,
            "episode_rewards": result.episode_rewards,
            "reward_backend": result.reward_backend,
            **{f"config_{key}": value for key, value in vars(cfg).items()},
        }
    keeps = policy_keeps(states, k, policy, config.selection, config.seed, dist)
    return Selection(keeps, policy=policy, training=training, train_seconds=seconds)


def _prepare_selfcal(config: PruneConfig, adapter, model_config, device: str, tokenizer) -> dict:
    """Before any weights are loaded: the model's fingerprint (for the scores file), ``--scores`` read and
    checked against the model (its probe settings then the run's: ``"config"``), and the ``--calibration`` text
    read, checked and cut into windows with the model's tokenizer (``tokenizer()``): a missing path, a binary
    file, a bad ``.jsonl`` line or a text too short fail here, in a moment."""
    from .scores import load_scores, model_fingerprint

    prepared = {"fingerprint": model_fingerprint(adapter, model_config), "windows": None, "scores": None}
    if config.scores is not None:
        scores = prepared["scores"] = load_scores(config.scores)
        scores.check_model(prepared["fingerprint"], config.scores)
        if scores.method != config.method:
            raise ValueError(f"--scores {config.scores} holds {scores.method} scores, not {config.method}")
        from_text = scores.calibration is not None
        if config.calibration is not None and not from_text:
            raise ValueError(f"--scores {config.scores} were measured on self-generated probes, not on --calibration "
                             "text: drop --calibration")  # fmt: skip
        if from_text and config.calibration is None and config.compensate:
            raise ValueError(f"--scores {config.scores} were measured on --calibration text, which compensation "
                             "refits on: give the same --calibration again, or --no-compensate")  # fmt: skip
        config = prepared["config"] = with_probe_settings(config, scores.probes)
    if config.calibration is not None:
        from .calibration import calibration_windows, read_calibration
        from .scores import ids_sha256

        tick = time.perf_counter()
        text = read_calibration(config.calibration)
        length = adapter.capped_length(model_config, config.probe_length)  # as probes are capped
        windows = calibration_windows(text, tokenizer(), config.probe_sequences, length, config.seed)
        prepared["windows"], prepared["calibration_seconds"] = windows, time.perf_counter() - tick
        scores = prepared["scores"]
        if scores is not None and ids_sha256(windows.ids) != scores.ids_sha256:
            raise ValueError(f"--calibration is not the text --scores {config.scores} were measured on: its "
                             f"{config.probe_sequences} windows of {length} tokens differ")  # fmt: skip
    return prepared


def with_probe_settings(config: PruneConfig, probes: dict) -> PruneConfig:
    """``config`` with the probe settings of a scores file: a setting left at its default takes the file's; one
    set to a third value is refused (the scores were not measured with it)."""
    import dataclasses

    from .config import field_of, flag_of

    changes = {}
    for name, key in (("seed", "seed"), ("probe_sequences", "sequences"), ("probe_length", "length")):
        given, measured = getattr(config, name), probes[key]
        if given == measured:
            continue
        if given != field_of(type(config), name).default:
            raise ValueError(f"{flag_of(type(config), name)} {given} differs from the {measured} the --scores were "
                             "measured with: drop it, or measure new scores")  # fmt: skip
        changes[name] = measured
    return dataclasses.replace(config, **changes)


def _choose_selfcal(source: Source, k: int, config: PruneConfig, *, fingerprint: dict | None = None, windows=None,
                    calibration_seconds: float = 0.0, scores=None, dist=None, progress=True,
                    **_) -> Selection:  # fmt: skip
    """Self-calibration, on any source: the model runs with every block resident, or offloaded block by block,
    on probes it generates itself or on windows of the ``--calibration`` text (``windows``, cut by
    :func:`_prepare_selfcal`); with ``--compensate`` the kept out-projection columns are then refitted on the
    same tokens (:mod:`prunenet.compensation`).

    Under ``torchrun`` rank 0 runs it and broadcasts the choice (and the refitted columns, unit by unit): the
    forward passes are sequential over blocks and decoding steps, so other ranks could only repeat them (or
    idle in a pipeline) and would read the weights again. Every rank cuts the windows (a few tokenizer calls),
    so a text too short for them fails on every rank with the same line, before any weights load.

    A ``k`` that keeps every neuron refits nothing (there is no dropped neuron to compensate for): the weights
    stay bit-identical and the manifest records no compensation.

    With ``scores`` (``--scores``, read by :func:`_prepare_selfcal`) the neurons are the ``k`` highest of those
    scores, on every rank, and the model runs only to compensate, on the probes the file holds (or the
    ``--calibration`` windows, checked to be the ones the scores were measured on, before any weights load). The
    selection carries the scores it used, for the output's ``scores.safetensors`` (:mod:`prunenet.scores`).
    """
    import torch

    from .probes import self_probes
    from .scores import NeuronScores, ids_sha256, model_fingerprint
    from .selfcal import selfcal_scores, top_k

    fingerprint = fingerprint or model_fingerprint(source.adapter, source.config)  # called without prepare
    dist, timings, manifest = _dist(dist), {}, {}
    compensating = config.compensate and k < source.width
    ids = None
    if windows is not None:
        timings["calibration_s"] = calibration_seconds
        manifest["calibration"], ids = windows.record, windows.ids
    elif scores is not None:
        ids = scores.probe_ids
    keeps = columns = None
    if scores is not None:  # every rank ranks the scores itself: nothing to broadcast
        keeps = scores.keeps(k)
        manifest["scores_source"] = {"path": str(config.scores), "sha256": scores.file_sha256}
    if dist.is_main and (scores is None or compensating):
        with source.run_model() as model:
            if ids is None:
                tick = time.perf_counter()
                ids = self_probes(model, sequences=config.probe_sequences, length=config.probe_length, seed=config.seed)
                timings["probe_s"] = time.perf_counter() - tick
            ids = ids.to(model.get_input_embeddings().weight.device)  # an offloaded model's blocks are elsewhere
            if scores is None:
                unit_scores = selfcal_scores(model, ids, timings=timings)
                keeps = [top_k(row, k) for row in unit_scores]
                probes = {"sequences": config.probe_sequences, "length": config.probe_length, "seed": config.seed}
                scores = NeuronScores(unit_scores, config.method, "wanda", probes, ids_sha256(ids), fingerprint,
                                      probe_ids=ids.cpu() if windows is None else None,
                                      calibration=manifest.get("calibration"))  # fmt: skip
            if compensating:
                columns, manifest["compensation"] = _compensate(source, model, ids, keeps, config, timings, progress)
    if dist.active:
        try:
            if config.scores is None:
                table = torch.stack(keeps) if keeps is not None else torch.zeros(source.num_units, k, dtype=torch.int64)
                keeps = list(dist.broadcast(table, 0))
            if compensating:
                columns = _broadcast_columns(source, columns, k, dist)
        except BaseException:
            if columns is not None:  # rank 0's store: its spill folder must not outlive the run
                columns.close()
            raise
    return Selection(keeps, timings=timings, manifest=manifest, columns=columns, scores=scores)


def _compensate(source: Source, model, ids, keeps, config: PruneConfig, timings: dict, progress: bool):
    """``(columns, record)``: the refitted columns of every unit (:func:`prunenet.compensation.compensate`, the
    layers in the groups the memory allows) and the manifest's record of how."""
    from .compensation import ColumnStore, compensate

    tick = time.perf_counter()
    per_pass = source.compensation_layers(keeps[0].numel())
    store = ColumnStore(spill=source.streaming)
    try:
        compensate(model, ids, keeps, config.damping, store, layers_per_pass=per_pass, progress=progress)
    except BaseException:
        store.close()
        raise
    timings["compensate_s"] = time.perf_counter() - tick
    passes = -(-source.num_layers // per_pass)
    return store, {"damping": config.damping, "tokens": ids.numel(), "layers_per_pass": per_pass, "passes": passes}


def _broadcast_columns(source: Source, columns, k: int, dist) -> ColumnStore:
    """Rank 0's refitted columns on every rank, one unit at a time (each rank keeps its own copy to write from)."""
    import torch

    from .compensation import ColumnStore

    store = columns if dist.is_main else ColumnStore(spill=source.streaming)
    shape, dtype = (source.adapter.hidden_size(source.config), k), source.out_dtype
    try:
        for unit in range(source.num_units):
            buffer = store.get(unit).contiguous() if dist.is_main else torch.empty(shape, dtype=dtype)
            dist.broadcast(buffer, 0)
            if not dist.is_main:
                store.put(unit, buffer)
    except BaseException:
        if not dist.is_main:  # rank 0's own store is closed by its caller
            store.close()
        raise
    return store


SELECTORS: dict[str, Selector] = {
    s.name: s
    for s in (
        Selector(
            "prunenet",
            "the paper's learned policy, trained with REINFORCE on the FFN weights' spectra",
            needs="weights",
            choose=_choose_prunenet,
            options=("episodes", "policy", "selection", "kl_weight", "lr", "reward_backend"),
            prepare=_prepare_policy,
        ),
        Selector("random", "uniformly at random (seeded)", needs="nothing", choose=_choose_random),
        Selector("magnitude", "largest L2 norm of the state-matrix rows", needs="weights", choose=_choose_magnitude),
        Selector(
            "selfcal",
            "run the model forward on text it generates itself (no dataset; seeded), or on your own text with "
            "--calibration, and keep the neurons contributing most to each FFN's output",
            needs="model",
            choose=_choose_selfcal,
            options=("probe_sequences", "probe_length", "calibration", "scores", "compensate", "damping"),
            prepare=_prepare_selfcal,
        ),
    )
}
"""Every ``--method``, in the order ``--help`` lists them."""


def selector_of(config: PruneConfig) -> Selector:
    """The selector ``config.method`` names.

    Raises:
        ValueError: no selector has that name, or an option of another selector is set away from its default:
            it would do nothing (``--episodes 5`` without ``--method prunenet`` trains nothing), and silently
            is the worst way to say so.
    """
    import dataclasses

    from .config import PruneConfig, flag

    if config.method not in SELECTORS:
        raise ValueError(f"unknown --method {config.method!r}; choose one of {', '.join(SELECTORS)}")
    others = [(f, owner_of(f.name)) for f in dataclasses.fields(PruneConfig)
              if owner_of(f.name) not in (None, config.method) and getattr(config, f.name) != f.default]  # fmt: skip
    if others:
        owner = others[0][1]
        flags = " and ".join(flag(f) for f, o in others if o == owner)
        raise ValueError(f"{flags} applies only to --method {owner} (this run's method is {config.method})")
    return SELECTORS[config.method]


def owner_of(option: str) -> str | None:
    """The selector that declares ``option`` as its own, or ``None`` for a shared option."""
    return next((s.name for s in SELECTORS.values() if option in s.options), None)


def select(source: Source, config: PruneConfig, *, dist=None, progress: bool = True, **prepared) -> Selection:
    """Run ``config.method`` on ``source`` at ``config.ratio``; a ratio that keeps every neuron selects nothing.

    ``prepared``: what the selector's ``prepare`` returned (e.g. ``policy=``, a ``--policy`` loaded)."""
    import torch

    k = source.adapter.kept_width(config.ratio, source.width, config.width_multiple)
    if k == source.width:
        if config.ratio > 0:  # the multiple (the family's included) covers the whole width: say why
            multiple = source.adapter.kept_multiple(config.width_multiple)
            log.warning("a kept width rounded to a multiple of %d leaves all %d FFN neurons at ratio %s: nothing is "
                        "removed", multiple, source.width, config.ratio)  # fmt: skip
        log.info("ratio %s keeps all %d FFN neurons: nothing to select or train", config.ratio, source.width)
        windows = prepared.get("windows")  # the text was read and checked all the same: recorded
        manifest = {"calibration": windows.record} if windows is not None else {}
        return Selection([torch.arange(source.width)] * source.num_units, policy=prepared.get("policy"),
                         manifest=manifest)  # fmt: skip
    return selector_of(config).choose(source, k, config, dist=dist, progress=progress, **prepared)


def markdown_table() -> str:
    """The registry as the docs show it (``docs/methods.md``'s generated ``methods`` block)."""
    from .config import PruneConfig, flag_of
    from .tables import markdown_table as table

    rows = []
    for s in SELECTORS.values():
        options = ", ".join(f"`{flag_of(PruneConfig, o)}`" for o in s.options) or "-"
        rows.append([f"`{s.name}`", NEEDS[s.needs], options, s.summary])
    return table(["`--method`", "needs", "its own options", "what it does"], rows)
