# Demo, large-batch reference: BN everywhere as in mask_rcnn_r18_bn.py, but 8
# images per batch, so every BN layer normalises over 8 images (the 2-image
# demos' budget of iterations and learning-rate schedule, i.e. 4x the images).
_base_ = './mask_rcnn_r18_bn.py'

train_dataloader = dict(batch_size=8)
auto_scale_lr = dict(base_batch_size=8)  # 8 images x 1 process
