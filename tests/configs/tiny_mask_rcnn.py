# A Mask R-CNN small enough to train a few iterations on 2 CPU cores, for the
# tests of the tools (tests/test_tools.py, tests/surgery/test_fuse.py): the demo
# model (configs/demo/_base_.py) with BRN everywhere, 32 channels, a 2-conv
# mask head, 2 classes and 4 iterations. Nothing is downloaded.
#
# The data set is the tiny COCO-format one that tests/conftest.py writes
# (images/, annotations/train.json, annotations/val.json under data_root).
# data_root is used when this file is parsed, so point the config at another
# data set with all the derived keys, e.g. (see TinyCoco.cfg_options):
#   --cfg-options data_root=D/ train_dataloader.dataset.data_root=D/ \
#     val_dataloader.dataset.data_root=D/ test_dataloader.dataset.data_root=D/ \
#     val_evaluator.ann_file=D/annotations/val.json \
#     test_evaluator.ann_file=D/annotations/val.json
_base_ = '../../configs/demo/_base_.py'

# The normalization layer used throughout the model (backbone, FPN, heads).
norm_cfg = dict(type='BRN', requires_grad=True)
data_root = 'data/tiny_coco/'
metainfo = dict(classes=('rectangle', 'ellipse'))
channels = 32

model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    neck=dict(out_channels=channels, norm_cfg=norm_cfg),
    rpn_head=dict(in_channels=channels, feat_channels=channels),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=channels),
        bbox_head=dict(in_channels=channels, conv_out_channels=channels, fc_out_channels=64,
                       num_classes=2, norm_cfg=norm_cfg),
        mask_roi_extractor=dict(out_channels=channels),
        mask_head=dict(num_convs=2, in_channels=channels, conv_out_channels=channels,
                       num_classes=2, norm_cfg=norm_cfg)),
    test_cfg=dict(rcnn=dict(score_thr=0.01, max_per_img=20)))

train_dataloader = dict(
    num_workers=0,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/train.json',
                 data_prefix=dict(img='images/'), filter_cfg=dict(min_size=8)))
val_dataloader = dict(
    num_workers=0,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/val.json',
                 data_prefix=dict(img='images/')))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/val.json')
test_evaluator = val_evaluator

train_cfg = dict(max_iters=4, val_interval=4)
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2)]
optim_wrapper = dict(optimizer=dict(lr=0.005), clip_grad=dict(max_norm=5))
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
