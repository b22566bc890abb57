"""Training: optimizer, state, the one loop, losses and stages."""
