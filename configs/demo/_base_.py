# The embedded demo, shared by configs/demo/mask_rcnn_r18_*.py: a small Mask
# R-CNN trained from scratch on the Fashion-MNIST scenes (mmnorm/datasets/scenes.py:
# 128 x 128 grayscale canvases with 2-5 garments of 28-84 px, COCO polygons,
# 10 classes) at 2 images per batch, in about 10 minutes on 2 CPU cores.
#
#   python tools/prepare_scenes.py          # once: data/fmnist_scenes/
#   python tools/train.py configs/demo/mask_rcnn_r18_mabn.py
#
# This base is the BN demo: BN everywhere (backbone, FPN, the 4-conv + 1-fc box
# head and the 4-conv mask head; the RPN head has no norm), nothing frozen, as
# in the MABN paper's "norm everywhere, from scratch" rows, scaled down:
# ResNet-18, a 64-channel FPN and heads, 128 px images. Each method's config
# states only its norm (and conv) over this file.
#
# Moving the data: data_root is used when this file is parsed, so override the
# derived keys too, e.g. (D = another root, ending in '/'):
#   --cfg-options train_dataloader.dataset.data_root=D \
#     val_dataloader.dataset.data_root=D test_dataloader.dataset.data_root=D \
#     val_evaluator.ann_file=D/annotations/instances_val.json \
#     test_evaluator.ann_file=D/annotations/instances_val.json
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

# ----------------------------------------------------------------- variables
data_root = 'data/fmnist_scenes/'
classes = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
           'Sneaker', 'Bag', 'Ankle boot')  # category ids 1..10, mmnorm.datasets.scenes.CATEGORIES
metainfo = dict(classes=classes)
image_scale = (128, 128)  # the canvas: Resize below is a no-op that records scale_factor
channels = 64  # FPN, RPN, RoI features, box and mask head convs (R-50 recipe: 256)
norm = dict(type='BN', requires_grad=True)

# Training budget, measured on this machine (2 cores, shared with other jobs
# while measuring). CPU seconds per iteration of 2 images of 128 x 128 with one
# thread: BN 0.38, frozen BN 0.44, BRN 0.46, MABN + CenConv 0.52, CBN past its
# burn-in 0.61, GN + WS 0.61. The MABN demo ran its 1,000 iterations in 666 s
# (0.67 s per iteration at a load average of 3-4 from other jobs) and evaluated
# the 300 val scenes in 35 s: tools/train.py took 713 s in all (645 s in a
# second run). So 1,000 iterations = 2,000 images = one pass over the 2,000
# train scenes. The per-method configs scale their layers' schedules (warm-up,
# renorm start, burn-in) to this number.
#
# Threads: with 2 intra-op threads (PyTorch's default here) and any other
# process competing for the 2 cores, OpenMP's spin-waiting made iterations 5-10x
# slower (4.6-8.4 s instead of 0.6-1.3 s with one thread, measured); start
# Python with OMP_WAIT_POLICY=PASSIVE (measured: as fast as one thread under
# load) or OMP_NUM_THREADS=1 in the environment when the machine is not idle.
max_iters = 1000
warmup_iters = 100
lr = 0.02

# -------------------------------------------------------------------- model
model = dict(
    data_preprocessor=dict(
        # Grayscale PNGs, loaded as 3 equal channels; mean / std of the
        # train scenes' pixels (mmnorm.datasets.scenes), not ImageNet's.
        mean=[54.0, 54.0, 54.0],
        std=[50.0, 50.0, 50.0],
        bgr_to_rgb=False),
    backbone=dict(
        depth=18,
        style='pytorch',
        frozen_stages=-1,
        norm_cfg=norm,
        norm_eval=False,
        init_cfg=None),  # from scratch: no ImageNet weights are downloaded
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=channels, norm_cfg=norm),
    rpn_head=dict(
        in_channels=channels,
        feat_channels=channels,
        # Anchor sizes 16, 32, 64, 128, 256 px on strides 4..64 (COCO recipe:
        # 32..512). The boxes of the visible garments measure 11 to 83 px
        # (sqrt(w h), median 43).
        anchor_generator=dict(scales=[4])),
    roi_head=dict(
        # finest_scale stays 56: RoIs under 112 px, i.e. all of them, pool from
        # P2 (stride 4), where a 28 px garment still covers 7 x 7 cells.
        bbox_roi_extractor=dict(out_channels=channels),
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            in_channels=channels,
            conv_out_channels=channels,
            fc_out_channels=256,
            num_classes=10,
            norm_cfg=norm),
        mask_roi_extractor=dict(out_channels=channels),
        mask_head=dict(
            num_convs=4,
            in_channels=channels,
            conv_out_channels=channels,
            num_classes=10,
            norm_cfg=norm)),
    # 2-5 objects per 128 px image: far fewer proposals and RoIs than COCO's.
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(sampler=dict(num=64))),  # RoIs per image (COCO: 512); the 4-conv box
        # head's cost is proportional to it
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=100),
        rcnn=dict(max_per_img=30)))

# --------------------------------------------------------------------- data
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,  # all images are 128 x 128: no aspect-ratio grouping
    dataset=dict(
        type='CocoDataset',
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=32),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=False,
    dataset=dict(
        type='CocoDataset',
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        test_mode=True,
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/instances_val.json',
    metric=['bbox', 'segm'])
test_evaluator = val_evaluator

# ----------------------------------------------------------------- schedule
train_cfg = dict(
    _delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
# SGD for one process with 2 images. MMDetection's linear rule would give
# 0.02 * 2 / 16 = 0.0025, but from scratch with a norm in every layer and only
# 1,000 iterations a larger rate trains much further; measured with the MABN
# demo (box / mask AP on the val scenes): lr 0.0025: 6.1 / 7.5, 0.01: 17.2 /
# 18.1, 0.02: 19.7 / 21.4 (one run each). Hence 0.02, MMDetection's and the
# MABN paper's rate for 16 images, with the 100-iteration linear warm-up and the
# gradient clipping below. Drops by 10x at 2/3 and 8/9 of the run (as at 16 and
# 22 of MMDetection's 24 epochs).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=lr, momentum=0.9, weight_decay=0.0001),
    clip_grad=dict(max_norm=10, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters,
         milestones=[max_iters * 2 // 3, max_iters * 8 // 9], gamma=0.1)
]
auto_scale_lr = dict(enable=False, base_batch_size=2)  # 2 images x 1 process

# ------------------------------------------------------------------ runtime
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters,
                    max_keep_ckpts=1))
log_processor = dict(by_epoch=False, window_size=20)
randomness = dict(seed=0)
