# The CBN paper's detection setting, shared by its rows: Mask R-CNN R-50-FPN,
# ImageNet backbone with frozen BN (MMDetection's default), 4-conv + 1-fc box
# head, 1x. The CBN paper ran 4 images per GPU x 4 GPUs; so do these configs.
# Each row's config puts a norm into the FPN and both heads.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

# torchvision's ImageNet ResNet-50 (MMDetection's torchvision://resnet50), read from a
# local file: see the README for where to put it.
model = dict(
    backbone=dict(init_cfg=dict(checkpoint='checkpoints/resnet50_torchvision.pth')),
    roi_head=dict(bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256)))

train_dataloader = dict(batch_size=4)
auto_scale_lr = dict(base_batch_size=16)  # 4 images x 4 GPUs
