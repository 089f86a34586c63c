# Demo: plain BN everywhere (backbone, FPN, box head, mask head), from scratch,
# 2 images per batch: the small-batch baseline of the MABN paper ("BN, 2 x 8,
# everywhere, from scratch") on the Fashion-MNIST scenes. Training normalises
# with the statistics of 2 images (and of the RoIs in the heads); inference uses
# the running averages. The base file is this configuration.
_base_ = './_base_.py'
