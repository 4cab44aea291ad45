"""Datasets (TFDS builders) and input pipelines (Grain) for medjax."""
