"""CBN, cross-iteration batch normalization: the layer and its reference
(ATen) step (:mod:`.layer`), its fused step (:mod:`.fused`) and its Triton
kernels (:mod:`.kernels`, imported at the first fused step)."""
from .layer import CBN

__all__ = ['CBN']
