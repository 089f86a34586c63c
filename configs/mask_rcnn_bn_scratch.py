# MABN paper baseline: BN everywhere (per-GPU statistics of 2 images), from scratch,
# 2x, 2 images per GPU x 8 GPUs. Paper: 32.38 box AP / 29.07 mask AP.
_base_ = './_base_/mask_rcnn_norm_everywhere_scratch_2x.py'
