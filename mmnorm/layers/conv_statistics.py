"""What CBN needs of the conv that feeds it (Yao et al., "Cross-Iteration Batch
Normalization", CVPR 2021, Eq. 6-8): the conv read from its output's autograd
node, and the derivatives of the output's per-channel statistics with respect
to the conv's weight theta,

    d mean(y_c) / d theta     = S_mu / M        (the same for every c of a group)
    d mean(y_c^2) / d theta   = 2 S_nu[c] / M

with M = N * H_out * W_out, S_mu the batch-summed input read at every kernel
offset and S_nu the conv's weight gradient for grad_output = y (see "The
Derivatives" in docs/cbn.md). No ``autograd.grad`` and no hook.

Where a forward runs without autograd (reentrant checkpointing's first
forward), the conv's current weight comes from :func:`weight_source`, learnt
from an earlier node.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._torch import convolution_backward, saved_convolution
from .base import TransformedWeightConv, holder

__all__ = ['ConvCall', 'feeding_convolution', 'conv_statistic_derivatives',
           'conv_statistic_derivative_sums', 'mean_derivative_sum', 'square_derivative_sum',
           'expand_mean_derivative', 'weight_source', 'current_weight']


# ------------------------------------------------------------ the conv
class ConvCall(NamedTuple):
    """How a convolution was called, read from its autograd node: what
    :func:`conv_statistic_derivative_sums` needs of a conv (an ``nn.Conv2d``
    has the same attributes). ``padding`` is numeric and zero: padding modes
    and string padding were applied to the saved input before the call."""
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    kernel_size: tuple
    padding_mode: str = 'zeros'


def feeding_convolution(x):
    """(ConvCall, conv input, theta) of the 2-D convolution whose output is
    ``x``, read from ``x.grad_fn`` (theta: the weight it convolved with, so a
    CenConv's or WSConv's transformed weight), or a str saying why there is
    none. Nothing is hooked: only tensors that autograd records carry this.
    The input and theta are autograd's own tensors: use them without grad."""
    node = x.grad_fn
    if node is None:
        return 'its input is a leaf tensor, not the output of a convolution'
    name = type(node).__name__
    if name.startswith('CompiledFunction'):
        return ('the convolution that feeds it ran inside a torch.compile graph, where CBN cannot '
                'see it; call mmnorm.surgery.compile.keep_cbn_convs_eager(model) before '
                'torch.compile')
    try:
        saved = saved_convolution(node)
    except RuntimeError:
        return 'the input of the convolution that feeds it was changed in place after the conv ran'
    if saved is None:
        return (f'its input comes from {name}, not from a convolution (or was changed in place '
                'after the convolution)')
    conv_input, weight, stride, padding, dilation, groups, transposed = saved
    if x.dim() != 4 or transposed:
        return 'its input comes from a convolution that is not a plain 2-D one'
    if conv_input is None or weight is None:
        return 'the convolution that feeds it kept no input for autograd'
    return ConvCall(stride, padding, dilation, groups, tuple(weight.shape[2:])), conv_input, weight


def weight_source(theta):
    """What gives the conv's weight theta again without autograd: the
    parameter itself (``nn.Conv2d``), or the transformed-weight conv whose
    :meth:`~mmnorm.layers.base.TransformedWeightConv.transformed_weight` it
    is (found from the parameter behind ``theta``'s autograd node, with a scan
    of the process's objects); None for any other weight. ``theta``: the
    weight :func:`feeding_convolution` returned."""
    if theta.is_leaf:
        return theta
    nodes, seen = [theta.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        parameter = getattr(node, 'variable', None)  # AccumulateGrad
        if parameter is not None:
            found = holder(parameter, '_parameters')
            conv = None if found is None else found[0]
            if isinstance(conv, TransformedWeightConv) and conv.weight is parameter:
                return conv
            return None
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return None


def current_weight(source):
    """theta now, from what :func:`weight_source` returned."""
    return source.transformed_weight() if isinstance(source, TransformedWeightConv) else source


# --------------------------------------------------------------- derivatives
def _explicit_padding(conv):
    """(pad for F.pad, mode) when the conv pads by itself or uses a string
    padding; None when its ``padding`` tuple is plain zero padding."""
    if isinstance(conv.padding, str) or conv.padding_mode != 'zeros':
        mode = 'constant' if conv.padding_mode == 'zeros' else conv.padding_mode
        return conv._reversed_padding_repeated_twice, mode
    return None


def conv_statistic_derivatives(conv, conv_input, conv_output, dtype=None, weight=None):
    """d mean(y_c) / d theta and d mean(y_c^2) / d theta for y = conv(x).

    They are ``(S_mu / M, S_nu * 2 / M)`` for the sums of
    :func:`conv_statistic_derivative_sums` and M = N * H_out * W_out.

    Args:
        conv (nn.Conv2d | ConvCall): stride, padding, padding_mode, dilation, groups.
        conv_input (Tensor): x, (N, C_in, H, W).
        conv_output (Tensor): y, (N, C_out, H_out, W_out) - bias included.
        dtype: the computation dtype (default: at least float32).
        weight (Tensor): theta, only its shape and dtype matter (default conv's).

    Returns:
        dmu (C_in, kh, kw): for output channel o of group g, dmu/dtheta[o] is
        ``dmu[g * C_in/groups:(g + 1) * C_in/groups]`` (see
        :func:`expand_mean_derivative`). Computed without a convolution.
        dnu (C_out, C_in/groups, kh, kw): one weight-gradient convolution.
    """
    n, _, h_out, w_out = conv_output.shape
    count = n * h_out * w_out
    patch_sum, weight_grad = conv_statistic_derivative_sums(conv, conv_input, conv_output, dtype,
                                                            weight)
    return patch_sum / count, weight_grad.mul_(2.0 / count)


def conv_statistic_derivative_sums(conv, conv_input, conv_output, dtype=None, weight=None):
    """The sums behind :func:`conv_statistic_derivatives`, for the same
    arguments: (:func:`mean_derivative_sum`, :func:`square_derivative_sum`).
    Sums over several inputs (processes) divided by their total M give the
    derivatives of the union."""
    if dtype is None:
        dtype = torch.promote_types(conv_output.dtype, torch.float32)
    return (mean_derivative_sum(conv, conv_input, conv_output.shape[2:], dtype),
            square_derivative_sum(conv, conv_input, conv_output, dtype, weight))


def mean_derivative_sum(conv, conv_input, output_size, dtype):
    """S_mu (C_in, kh, kw) in ``dtype``: the batch-summed (padded) input read
    at every kernel offset and summed over the ``output_size`` (H_out, W_out)
    output positions."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    h_out, w_out = output_size
    explicit = _explicit_padding(conv)
    summed = (conv_input.sum(0) if conv_input.dtype == dtype
              else conv_input.sum(0, dtype=dtype))
    if explicit is None:
        ph, pw = conv.padding
        if ph or pw:
            summed = F.pad(summed, (pw, pw, ph, ph))
    else:
        summed = F.pad(summed[None], explicit[0], mode=explicit[1])[0]
    summed = summed.contiguous()
    c_in, hp, wp = summed.shape
    patches = summed.as_strided((c_in, kh, kw, h_out, w_out),
                                (hp * wp, dh * wp, dw, sh * wp, sw))
    return patches.sum((3, 4))


def square_derivative_sum(conv, conv_input, conv_output, dtype, weight=None):
    """S_nu (C_out, C_in/groups, kh, kw) in ``dtype``: the conv's weight
    gradient for grad_output = y (``conv_output``), one convolution_backward.
    ``weight``: theta, only its shape and dtype matter (default conv's)."""
    weight = conv.weight if weight is None else weight
    x = conv_input.to(dtype)
    padding = conv.padding
    explicit = _explicit_padding(conv)
    if explicit is not None:
        x = F.pad(x, explicit[0], mode=explicit[1])
        padding = (0, 0)
    return convolution_backward(
        conv_output.to(dtype), x, weight.detach().to(dtype), None, conv.stride, padding,
        conv.dilation, False, [0, 0], conv.groups, (False, True, False))[1]


def expand_mean_derivative(dmu, weight_shape, groups):
    """The weight-shaped dmu/dtheta (C_out, C_in/groups, kh, kw) from the
    compact (C_in, kh, kw) one: every output channel of group g gets the rows of
    group g."""
    c_out = weight_shape[0]
    per_group = dmu.view(groups, 1, dmu.shape[0] // groups, *dmu.shape[1:])
    return per_group.expand(groups, c_out // groups, *per_group.shape[2:]).reshape(weight_shape)
