"""Stage 2: MAE pre-training with the attention-guided reconstruction loss."""
