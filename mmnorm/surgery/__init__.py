"""Whole-model operations: convert (BatchNorm -> these layers), fuse (fold for
inference) and checkpoint conversion with its report."""
