# CBN paper neighbour: frozen BN backbone, GroupNorm (32 groups) in the FPN and
# both heads, 1x, 4 images per GPU x 4 GPUs. Paper: 38.5 box AP / 35.0 mask AP.
_base_ = './_base_/mask_rcnn_frozenbn_4conv1fc_1x.py'

norm = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(neck=dict(norm_cfg=norm),
             roi_head=dict(bbox_head=dict(norm_cfg=norm), mask_head=dict(norm_cfg=norm)))
