"""LMM model families in Flax NNX."""
