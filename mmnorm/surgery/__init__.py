"""Whole-model operations: convert (BatchNorm -> these layers), fuse (fold for
inference), the files tools/deploy.py writes (deployed: the folded module;
plain_mmdet: a plain MMDetection pair) and checkpoint conversion with its
report."""
