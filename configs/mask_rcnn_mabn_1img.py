# The MABN row at 1 image per GPU (x 16 GPUs): MMDetection counts the batch per
# GPU, so the window doubles to keep spanning 32 images (32 steps x 1 image).
_base_ = './mask_rcnn_mabn.py'

norm = dict(type='MABN', buffer_size=32, requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm), neck=dict(norm_cfg=norm),
    roi_head=dict(bbox_head=dict(norm_cfg=norm), mask_head=dict(norm_cfg=norm)))

train_dataloader = dict(batch_size=1)
auto_scale_lr = dict(base_batch_size=16)  # 1 image x 16 GPUs
