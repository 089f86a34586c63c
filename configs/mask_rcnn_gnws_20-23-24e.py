# GN + WS everywhere with WSConv, 24 epochs with steps at 20 and 23, 2 images per
# GPU x 8 GPUs. MMDetection's row: 41.1 / 37.1; the WS paper's (2 images x 4 GPUs):
# 40.81 box AP / 36.51 mask AP.
_base_ = './mask_rcnn_gnws_2x.py'

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=24, by_epoch=True, milestones=[20, 23], gamma=0.1)
]
