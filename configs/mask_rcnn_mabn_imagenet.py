# MABN paper, MABN + CenConv everywhere, backbone initialised from an ImageNet
# MABN + CenConv ResNet-50, 2x, 2 images per GPU x 8 GPUs.
# Paper: 38.42 box AP / 34.12 mask AP.
# No model zoo offers that backbone: convert the authors' ImageNet checkpoint
# with tools/convert_checkpoint.py (see README) and place it at the path below.
_base_ = './mask_rcnn_mabn.py'

model = dict(backbone=dict(init_cfg=dict(
    _delete_=True, type='Pretrained',
    checkpoint='checkpoints/resnet50_mabn_cenconv_imagenet.pth')))
