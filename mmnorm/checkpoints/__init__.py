"""The files mmnorm reads and writes: checkpoint conversion from other code
bases' layouts with its report (:mod:`~mmnorm.checkpoints.conversion`), the
plain MMDetection config and checkpoint pair that ``tools/deploy.py --to
mmdet`` writes (:mod:`~mmnorm.checkpoints.plain_mmdet`) and the deployed
folded-model file of ``--to module`` (:mod:`~mmnorm.checkpoints.deployed`).
The model operations they use (convert, fuse) are :mod:`mmnorm.surgery`'s."""
