"""How pruning the experts' FFN neurons changes a mixture of experts' routing.

A dense FFN that loses neurons still gets every token; a pruned expert may stop winning the tokens it was
trained on, because the router of every later block sees a residual stream the earlier (pruned) blocks
changed. This measures that on a small random Mixtral (the router itself is never touched, so block 0's
choices cannot change): for every block, the fraction of tokens whose top-k expert *set* changes, whose
first choice changes, and the total-variation distance between the blocks' expert loads, next to the
mean KL divergence of the next-token distribution (how much the output moved).

Two initialisations: ``default`` (``transformers``' N(0, 0.02) everywhere: router logits of std ~0.2, near
ties) and ``confident`` (router weights N(0, 1/d): logits of std ~1, as a trained router's are). The
experts differ by their independent random weights. Evaluation tokens are random ids drawn with a seed no
selector uses.

    python benchmarks/moe_router.py                 # ~2 min on 2 CPU cores
    python benchmarks/moe_router.py --seeds 5 --ratios 0.25 0.5

Results: ``benchmarks/results/moe_router.csv`` (one row per init x method x seed x ratio x block) and the
summary table printed at the end.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from common import append_csv, run_tags  # noqa: E402

from prunenet import prune_  # noqa: E402
from prunenet.adapters import get_adapter  # noqa: E402

SHAPE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=512,
             max_position_embeddings=256)  # fmt: skip
METHODS = ("random", "magnitude", "selfcal", "prunenet")


def make_model(init: str, seed: int = 0) -> torch.nn.Module:
    """The small Mixtral, float32, eval mode; ``init`` ``"confident"`` rescales the routers to N(0, 1/d)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(**SHAPE), dtype=torch.float32)
    if init == "confident":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    param.normal_(0, SHAPE["hidden_size"] ** -0.5)
    return model.eval()


@torch.no_grad()
def routing(model: torch.nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every block's chosen experts ``(tokens, top_k)`` (from the experts module's inputs) and the log-probs."""
    adapter = get_adapter(model.config)
    experts_module = adapter.tensors[0].name.rpartition(".")[0]
    chosen: list[torch.Tensor] = []
    handles = [
        model.get_submodule(adapter.block_prefix(i) + experts_module).register_forward_pre_hook(
            lambda module, args: chosen.append(args[1].detach().clone())
        )
        for i in range(adapter.num_layers(model.config))
    ]
    try:
        logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
    finally:
        for handle in handles:
            handle.remove()
    return chosen, logprobs


def compare(before: torch.Tensor, after: torch.Tensor, experts: int) -> dict[str, float]:
    """Routing change of one block: ``before``/``after`` are ``(tokens, top_k)`` expert indices."""
    same_set = (before.sort(dim=1).values == after.sort(dim=1).values).all(dim=1)
    load = lambda chosen: torch.bincount(chosen.flatten(), minlength=experts).double() / chosen.numel()  # noqa: E731
    return {
        "set_changed": 1 - same_set.double().mean().item(),
        "top1_changed": (before[:, 0] != after[:, 0]).double().mean().item(),
        "load_tv": 0.5 * (load(before) - load(after)).abs().sum().item(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--seeds", type=int, default=3, help="selection seeds per method (random draws vary most)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--tokens", type=int, default=1024, help="evaluation tokens (8 sequences)")
    parser.add_argument("--csv", default=str(HERE / "results" / "moe_router.csv"))
    args = parser.parse_args(argv)
    ids = torch.randint(0, SHAPE["vocab_size"], (8, args.tokens // 8), generator=torch.Generator().manual_seed(12345))
    rows, summary = [], {}
    for init in ("default", "confident"):
        dense = make_model(init)
        dense_routes, dense_logprobs = routing(dense, ids)
        for method in args.methods:
            for ratio in args.ratios:
                for seed in range(args.seeds):
                    pruned = copy.deepcopy(dense)
                    options = {"episodes": 2} if method == "prunenet" else {}
                    result = prune_(pruned, ratio, method=method, seed=seed, **options)
                    routes, logprobs = routing(pruned, ids)
                    kl = torch.nn.functional.kl_div(logprobs, dense_logprobs, log_target=True, reduction="none")
                    kl = kl.sum(-1).mean().item()
                    for layer, (a, b) in enumerate(zip(dense_routes, routes, strict=True)):
                        change = compare(a, b, SHAPE["num_local_experts"])
                        rows.append({**run_tags("cpu"), "init": init, "method": method, "ratio": ratio, "seed": seed,
                                     "k": result.k, "layer": layer, **{m: round(v, 4) for m, v in change.items()},
                                     "next_token_kl": round(kl, 5)})  # fmt: skip
                        if layer > 0:
                            summary.setdefault((init, method, ratio), []).append((change, kl))
    append_csv(Path(args.csv), rows)
    print(f"appended {len(rows)} rows to {args.csv}")
    print("\n| init | method | ratio | top-k set changed | first choice changed | load TV | next-token KL |")
    print("|---|---|---|---|---|---|---|")
    for (init, method, ratio), values in summary.items():
        mean = {key: statistics.mean(c[key] for c, _ in values) for key in ("set_changed", "top1_changed", "load_tv")}
        kl = statistics.mean(k for _, k in values)
        print(f"| {init} | {method} | {ratio} | {mean['set_changed']:.1%} | {mean['top1_changed']:.1%} "
              f"| {mean['load_tv']:.3f} | {kl:.4f} |")  # fmt: skip
    print("(blocks 1-3, mean over blocks and seeds; block 0's router input is the embedding: never changed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
