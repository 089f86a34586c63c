# MABN paper reference: SyncBN everywhere, ImageNet (BN) initialisation, 2x,
# 2 images per GPU x 8 GPUs synced. Paper: 38.25 box AP / 34.22 mask AP.
_base_ = './mask_rcnn_syncbn_scratch.py'

# torchvision's ImageNet ResNet-50 (MMDetection's torchvision://resnet50), read from a
# local file: see the README for where to put it.
model = dict(backbone=dict(init_cfg=dict(
    _delete_=True, type='Pretrained', checkpoint='checkpoints/resnet50_torchvision.pth')))
