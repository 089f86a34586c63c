# CBN paper baseline: frozen BN backbone, no norm in the FPN and heads, 1x,
# 4 images per GPU x 4 GPUs. Paper: 37.6 box AP / 34.0 mask AP.
_base_ = './_base_/mask_rcnn_frozenbn_4conv1fc_1x.py'
