"""Whole-model operations: convert (BatchNorm -> these layers) and fuse (fold
for inference), both from the traced dataflow (dataflow) and the norms whose
forward is known (norms), with a per-module report (report); torch.compile of
models with CBN (compile). The files made from models (checkpoint conversion,
the plain MMDetection pair, the deployed file) are :mod:`mmnorm.checkpoints`'s."""
