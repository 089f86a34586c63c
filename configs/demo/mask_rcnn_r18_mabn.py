# Demo: MABN + CenConv everywhere (backbone, FPN, box head, mask head), from
# scratch, 2 images per batch: the MABN paper's recipe on the Fashion-MNIST
# scenes. The RPN head keeps plain convs and no norm.
_base_ = './_base_.py'

# The MABN schedule counts training steps (each of these layers runs once per
# iteration); the paper's values (warm-up 100, renorm from 1000) are for a
# 180k-iteration run, this one has 1,000 (see max_iters in _base_.py):
# - buffer_size=16: the SMA window, 16 steps x 2 images = the paper's 32 images.
# - warmup_iters=100: batch statistics (no averaging) for the first 100 steps,
#   while the weights move fastest (the learning-rate warm-up is also 100).
# - renorm_start_iter=200 (1/5 of the run): r = 1 until then. running_var is an
#   EMA with momentum 0.98, i.e. a time constant of 50 steps, so by step 200 it
#   has followed 100 steps (two time constants) of moving-average statistics;
#   the last 4/5 of the run trains with the renormalisation that makes the
#   statistics of training and of inference agree.
norm = dict(type='MABN', buffer_size=16, warmup_iters=100, renorm_start_iter=200,
            requires_grad=True)
conv = dict(type='CenConv')
model = dict(
    backbone=dict(norm_cfg=norm, conv_cfg=conv),
    neck=dict(norm_cfg=norm, conv_cfg=conv),
    roi_head=dict(
        bbox_head=dict(norm_cfg=norm, conv_cfg=conv),
        mask_head=dict(norm_cfg=norm, conv_cfg=conv)))
