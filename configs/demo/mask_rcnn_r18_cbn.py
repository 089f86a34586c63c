# Demo: CBN everywhere (backbone, FPN, box head, mask head), from scratch,
# 2 images per batch, on the Fashion-MNIST scenes. (The CBN paper's COCO row
# keeps a frozen ImageNet backbone and puts CBN in the FPN and heads only, at 4
# images x 4 GPUs; with no pretrained backbone here, the backbone normalises too,
# as in the other demo configs.) Each CBN finds the conv that feeds it by
# itself; plain convs.
_base_ = './_base_.py'

# buffer_num=3: the statistics of the 3 previous steps, compensated to the
# current weights, are averaged with the current ones (a window of 4 steps =
# 8 images). burnin is in iterations (this layer's training steps): the paper
# burns in for 8 of 12 epochs, i.e. until the first learning-rate drop, when the
# weights start to move slowly enough for the first-order compensation; here the
# first drop is at 666 of the 1,000 iterations (_base_.py), so plain BN until
# step 666, then CBN for the last third of the run.
norm = dict(type='CBN', buffer_num=3, burnin=666, requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm),
    neck=dict(norm_cfg=norm),
    roi_head=dict(bbox_head=dict(norm_cfg=norm), mask_head=dict(norm_cfg=norm)))
