# Demo: "frozen BN", MMDetection's default layout (and the CBN paper's first
# row): the backbone's BN layers are frozen (requires_grad=False: no affine
# training; norm_eval=True: running statistics, never batch statistics) and the
# FPN and both heads have no norm at all. 2 images per batch, Fashion-MNIST
# scenes.
#
# From scratch this means no normalization at all: frozen BN is meant to carry
# the statistics and affine parameters of an ImageNet-trained backbone, and
# there is none here, so every frozen BN keeps its initial state, mean 0, var 1,
# weight 1, bias 0: the identity (up to 1/sqrt(1 + eps)). This is the
# no-normalization baseline of the demo, trained with the same schedule.
_base_ = './_base_.py'

model = dict(
    backbone=dict(
        norm_cfg=dict(type='BN', requires_grad=False),
        norm_eval=True,
        # MMDetection's ResNet zero-initialises the last BN weight of every
        # residual block; frozen, that weight would stay 0 and every residual
        # branch would output 0 for the whole run.
        zero_init_residual=False),
    # MMDetection's default also freezes the stem and stage 1 (frozen_stages=1);
    # with random weights that would freeze random features, so all conv
    # weights train here (frozen_stages=-1 from the base): only BN is frozen.
    neck=dict(norm_cfg=None),
    roi_head=dict(bbox_head=dict(norm_cfg=None), mask_head=dict(norm_cfg=None)))
