"""What BRN and CBN share on the fused path: the kernels all three methods
build on (:mod:`.kernels`: the (N, C, L) view, the split over programs, the
partial sums, the device functions) and the backward of an affine
normalization, whose operator ``mmnorm::normalized_backward`` is BRN's and
CBN's fused backward (:mod:`.fused`)."""
