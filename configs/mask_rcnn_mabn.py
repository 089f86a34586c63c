# MABN paper: MABN + CenConv everywhere, from scratch, 2x, 2 images per GPU x 8 GPUs,
# each GPU keeping its own MABN statistics. Paper: 36.50 box AP / 32.69 mask AP.
_base_ = './_base_/mask_rcnn_norm_everywhere_scratch_2x.py'

# buffer_size is the SMA window in steps: 16 steps x 2 images = the paper's 32 images.
norm = dict(type='MABN', buffer_size=16, requires_grad=True)
conv = dict(type='CenConv')
model = dict(
    backbone=dict(norm_cfg=norm, conv_cfg=conv), neck=dict(norm_cfg=norm, conv_cfg=conv),
    roi_head=dict(bbox_head=dict(norm_cfg=norm, conv_cfg=conv),
                  mask_head=dict(norm_cfg=norm, conv_cfg=conv)))
