# MABN paper reference: SyncBN everywhere (statistics over 2 images x 8 GPUs),
# from scratch, 2x. Paper: 36.80 box AP / 33.10 mask AP.
_base_ = './_base_/mask_rcnn_norm_everywhere_scratch_2x.py'

norm = dict(type='SyncBN', requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm), neck=dict(norm_cfg=norm),
    roi_head=dict(bbox_head=dict(norm_cfg=norm), mask_head=dict(norm_cfg=norm)))
