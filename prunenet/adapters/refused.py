"""Model types PruneNet knows and refuses, each with the one-line reason a user sees."""

REFUSED: dict[str, str] = {
    "gemma3n": (
        "Gemma-3n's FFNs keep a layer's strongest activations by a Gaussian cutoff computed over the whole "
        "FFN width, so a narrower FFN computes a different function even on the neurons it keeps"
    ),
    "qwen2_moe": (
        "Qwen2-MoE blocks add a shared expert of its own width (shared_expert_intermediate_size) to the routed "
        "experts; PruneNet prunes blocks whose experts all have one width"
    ),
    "deepseek_v3": (
        "DeepSeek-V3 has dense first blocks (first_k_dense_replace) and shared experts beside the routed ones: "
        "three FFN widths, where PruneNet prunes blocks whose experts all have one width"
    ),
    "llama4": (
        "Llama 4 interleaves dense and mixture-of-experts blocks and adds a shared expert (intermediate_size_mlp "
        "and intermediate_size): several FFN widths, where PruneNet prunes blocks whose experts all have one width"
    ),
    "gpt_oss": (
        "gpt-oss interleaves each expert's gate and up columns (gate at even, up at odd entries of (E, d, 2n)) "
        "and publishes them MXFP4-quantized; PruneNet slices neither"
    ),
}
REFUSED["gemma3n_text"] = REFUSED["gemma3n"]
REFUSED["llama4_text"] = REFUSED["llama4"]
