"""Training: typed stage configs, one loop for every stage, checkpoints, distributed setup."""
