# Fashion-MNIST classification with MMDetection's ResNet-18 and mmnorm's BRN.
#
# The main job (`bash tools/bootstrap.sh main`): a short real training on the
# CPU, then top-1 accuracy on the first 2,000 test images. It is also the seed
# of the norm study at 2 images per normalization batch: the norm layer, the
# conv layer and the batch size are the variables right below.
#
#   python tools/train.py configs/fmnist/cls_r18_brn.py
#   python tools/test.py configs/fmnist/cls_r18_brn.py CKPT   (all 10,000 test images)
#
# Overriding with --cfg-options: the variables below are resolved when the
# file is read, so override the fields that use them, e.g.
#   train_dataloader.batch_size=2
#   model.backbone.norm_cfg.type=BN   (then drop BRN's keys or set a full dict)
#   train_cfg.max_iters=200 train_cfg.val_interval=200
#   val_dataloader.dataset.num_samples=500
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)

# ------------------------------------------------------------ study variables
# Images per normalization batch = per-process batch size (one process here).
# The small-batch setting of the study is 2; 16 gives a meaningful accuracy
# within a few minutes on 2 CPU cores.
batch_size = 16
train_iters = 600
# BRN's defaults (warmup_iters=5000, rmax_iters=40000, dmax_iters=25000, the
# paper's schedule for long ImageNet runs) would keep r = 1, d = 0, i.e. plain
# BN, for this whole run. Scaled to the run: BN for the first 100 steps (the
# running statistics settle, time constant 1 / momentum = 20 steps), then the
# bounds open linearly, rmax reaching 3 at step 400 and dmax reaching 5 at
# step 300, so the last third of the run is fully renormalized.
norm_cfg = dict(
    type='BRN', momentum=0.05, rmax=3.0, dmax=5.0,
    warmup_iters=100, rmax_iters=400, dmax_iters=300)
# BRN's paper uses plain convolutions. GN pairs with dict(type='WSConv'),
# MABN with dict(type='CenConv').
conv_cfg = None

data_root = '/usr/share/datasets/fashion-mnist'
num_val_images = 2000

# ---------------------------------------------------------------------- model
model = dict(
    type='NormStudyClassifier',
    num_classes=10,
    # 28x28 -> 56x56 (bilinear): 14x14 maps in ResNet's first stage, 2x2 in the
    # last, so batch statistics pool over more than the batch's images.
    input_size=56,
    data_preprocessor=dict(
        type='ImgDataPreprocessor',
        # Fashion-MNIST training-set pixel mean / std on the 0..255 scale.
        mean=[72.94], std=[90.02]),
    backbone=dict(
        type='mmdet.ResNet',
        depth=18,
        in_channels=1,
        num_stages=4,
        out_indices=(3, ),
        style='pytorch',
        conv_cfg=conv_cfg,
        norm_cfg=norm_cfg,
        # ResNet's default norm_eval=True freezes every norm layer in eval
        # mode (for fine-tuning detectors): here they must train.
        norm_eval=False,
        frozen_stages=-1,
        init_cfg=None))

# ----------------------------------------------------------------------- data
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='FashionMNIST', split='train', data_root=data_root))
val_dataloader = dict(
    batch_size=100,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='FashionMNIST', split='test', data_root=data_root,
                 num_samples=num_val_images))
test_dataloader = dict(
    batch_size=100,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='FashionMNIST', split='test', data_root=data_root))
val_evaluator = dict(type='ClassificationAccuracy')
test_evaluator = val_evaluator

# ------------------------------------------------------------------- schedule
train_cfg = dict(type='IterBasedTrainLoop', max_iters=train_iters, val_interval=train_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=1e-4),
    # No weight decay on the norm layers' affine parameters (mmengine finds
    # them as _BatchNorm subclasses, which mmnorm's layers are).
    paramwise_cfg=dict(norm_decay_mult=0.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=50, end=train_iters,
         eta_min=1e-4),
]

# -------------------------------------------------------------------- runtime
default_scope = 'mmengine'
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    # log_metric_by_epoch=False: val metrics are logged at the iteration
    # (the epoch of an iteration-based run stays 0).
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # One checkpoint, at the end of training.
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=train_iters,
                    max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'))
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # NCCL as in MMDetection's configs; without CUDA the project's tools
    # (mmnorm.engine.distributed.setup_distributed) use gloo instead.
    dist_cfg=dict(backend='nccl'))
visualizer = dict(type='Visualizer', vis_backends=[dict(type='LocalVisBackend')])
log_processor = dict(by_epoch=False, window_size=50)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
work_dir = './work_dirs/cls_r18_brn'
