# MABN paper baseline: BRN everywhere (BRN's default options), from scratch, 2x,
# 2 images per GPU x 8 GPUs. Paper: 34.07 box AP / 30.98 mask AP.
_base_ = './_base_/mask_rcnn_norm_everywhere_scratch_2x.py'

norm = dict(type='BRN', requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm), neck=dict(norm_cfg=norm),
    roi_head=dict(bbox_head=dict(norm_cfg=norm), mask_head=dict(norm_cfg=norm)))
