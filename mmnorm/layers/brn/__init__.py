"""BRN, batch renormalization: the layer and its reference (ATen) step
(:mod:`.layer`), its fused step (:mod:`.fused`) and its Triton kernels
(:mod:`.kernels`, imported at the first fused step)."""
from .layer import BRN, renormalized_batch_norm

__all__ = ['BRN', 'renormalized_batch_norm']
