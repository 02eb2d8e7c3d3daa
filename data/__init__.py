"""Datasets (image folders with a stable index, the demo dataset, IDX files) and the joint image+map transforms."""
