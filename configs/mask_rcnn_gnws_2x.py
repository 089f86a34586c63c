# GN + WS everywhere with this project's WSConv, 2x, 2 images per GPU x 8 GPUs,
# backbone from an ImageNet GN+WS ResNet-50.
# MMDetection's row: 40.6 box AP / 36.6 mask AP (with mmcv's ConvWS).
# The backbone file is the one MMDetection names open-mmlab://jhu/resnet50_gn_ws; it
# is not downloaded at run time here: fetch it once (see README) to the path below.
# mmengine's 'mmdet::' pattern (\w*::\w*/) rejects the '+' of 'gn+ws/', hence the
# detour via _base_/..
_base_ = 'mmdet::_base_/../gn+ws/mask-rcnn_r50_fpn_gn-ws-all_2x_coco.py'
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

conv = dict(type='WSConv')
model = dict(
    backbone=dict(conv_cfg=conv, init_cfg=dict(
        type='Pretrained', checkpoint='checkpoints/resnet50_gn_ws_imagenet.pth')),
    neck=dict(conv_cfg=conv),
    roi_head=dict(bbox_head=dict(conv_cfg=conv), mask_head=dict(conv_cfg=conv)))

train_dataloader = dict(batch_size=2)
auto_scale_lr = dict(base_batch_size=16)  # 2 images x 8 GPUs
