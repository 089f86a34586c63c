# Demo: GroupNorm + weight standardization everywhere (backbone, FPN, the 4-conv
# box head and the 4-conv mask head; never the RPN head or the fc layers), from
# scratch, 2 images per batch, on the Fashion-MNIST scenes. GN does not use the
# batch at all, so it is the batch-independent reference.
_base_ = './_base_.py'

# 16 groups: the paper's 32 groups split 256 channels into groups of 8; this
# demo's FPN and heads have 64 channels (and ResNet-18 starts at 64), where 32
# groups would leave 2 channels per group. 16 groups keep 4 channels per group
# at 64 channels and 32 at ResNet-18's widest (512) stage.
norm = dict(type='GN', num_groups=16, requires_grad=True)
conv = dict(type='WSConv')  # every conv that feeds a GN
model = dict(
    backbone=dict(norm_cfg=norm, conv_cfg=conv),
    neck=dict(norm_cfg=norm, conv_cfg=conv),
    roi_head=dict(
        bbox_head=dict(norm_cfg=norm, conv_cfg=conv),
        mask_head=dict(norm_cfg=norm, conv_cfg=conv)))
