# MABN paper, MABN + CenConv everywhere, backbone initialised from an ImageNet
# MABN + CenConv ResNet-50, 2x, 2 images per GPU x 8 GPUs.
# Paper: 38.42 box AP / 34.12 mask AP.
# No model zoo offers that backbone: convert the authors' ImageNet checkpoint
# with tools/convert_checkpoint.py (see README) and place it at the path below.
_base_ = './mask_rcnn_mabn.py'

model = dict(
    # The input scale the backbone was trained with: the authors' ImageNet
    # code feeds BGR pixels 0-255 (cls/utils.py) and their detection code
    # (maskrcnn-benchmark's defaults) subtracts a per-channel mean with std 1.
    # MMDetection's default (RGB, divided by ImageNet's std of about 58) would
    # hand the pretrained MABN layers inputs 58x smaller than they saw.
    data_preprocessor=dict(
        mean=[102.9801, 115.9465, 122.7717], std=[1.0, 1.0, 1.0], bgr_to_rgb=False),
    backbone=dict(init_cfg=dict(
        _delete_=True, type='Pretrained',
        checkpoint='checkpoints/resnet50_mabn_cenconv_imagenet.pth')))
