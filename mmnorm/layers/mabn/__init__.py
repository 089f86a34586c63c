"""MABN, moving-average batch normalization: the layer and its reference
(ATen) step (:mod:`.layer`), its fused step (:mod:`.fused`) and its Triton
kernels (:mod:`.kernels`, imported at the first fused step)."""
from .layer import BN_EPS, MABN, bn_to_mabn

__all__ = ['BN_EPS', 'MABN', 'bn_to_mabn']
