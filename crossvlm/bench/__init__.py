"""Speed benchmarks (`crossvlm bench`): the training step against the tutorial baseline, generation,
the data loader, and the FLOP count behind MFU. See docs/PERFORMANCE.md."""
