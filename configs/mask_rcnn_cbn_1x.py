# CBN paper: frozen BN backbone, CBN in the FPN and both heads (k = 3 past steps,
# burn-in 8 epochs of the 12-epoch schedule), 1x, 4 images per GPU x 4 GPUs.
# Paper: 38.4 box AP / 34.7 mask AP. (The original scripts meant 8 epochs but,
# through a config-key mismatch, ran 8 iterations; this config means epochs.)
_base_ = './_base_/mask_rcnn_frozenbn_4conv1fc_1x.py'

norm = dict(type='CBN', buffer_num=3, burnin_epochs=8, requires_grad=True)
model = dict(neck=dict(norm_cfg=norm),
             roi_head=dict(bbox_head=dict(norm_cfg=norm), mask_head=dict(norm_cfg=norm)))
# Converts burnin_epochs into iterations with the run's real epoch length, and logs it.
custom_hooks = [dict(type='CBNBurninHook')]
