"""Model types PruneNet knows and refuses, each with the one-line reason a user sees."""

REFUSED: dict[str, str] = {
    "gemma3n": (
        "Gemma-3n's FFNs keep a layer's strongest activations by a Gaussian cutoff computed over the whole "
        "FFN width, so a narrower FFN computes a different function even on the neurons it keeps"
    ),
}
REFUSED["gemma3n_text"] = REFUSED["gemma3n"]
