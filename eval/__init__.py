"""Stage 3: frozen-feature evaluation (k-NN, linear probe, retrieval, robustness, attention quality)."""
