# The MABN paper's detection setting, shared by its rows: Mask R-CNN R-50-FPN with
# a norm in the backbone (nothing frozen), the FPN, the 4-conv + 1-fc box head and
# the 4-conv mask head; RPN head without norm; from scratch; 2x (24 epochs) with
# MMDetection's SGD lr 0.02, weight decay 1e-4 and 500-iteration linear warm-up;
# 2 images per GPU x 8 GPUs. Each row's config changes the norm (and the conv).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py'
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

norm = dict(type='BN', requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm, norm_eval=False, frozen_stages=-1, zero_init_residual=False,
                  init_cfg=None),
    neck=dict(norm_cfg=norm),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256, norm_cfg=norm),
        mask_head=dict(norm_cfg=norm)))

train_dataloader = dict(batch_size=2)
auto_scale_lr = dict(base_batch_size=16)  # 2 images x 8 GPUs
