"""Stage 1: unsupervised object discovery, image -> patch-attention map."""
