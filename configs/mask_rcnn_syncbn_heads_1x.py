# CBN paper neighbour: frozen BN backbone, SyncBN in the FPN and both heads, 1x,
# 4 images per GPU x 4 GPUs synced. Paper: 38.5 box AP / 34.3 mask AP.
_base_ = './_base_/mask_rcnn_frozenbn_4conv1fc_1x.py'

norm = dict(type='SyncBN', requires_grad=True)
model = dict(neck=dict(norm_cfg=norm),
             roi_head=dict(bbox_head=dict(norm_cfg=norm), mask_head=dict(norm_cfg=norm)))
