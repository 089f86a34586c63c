"""Folding for inference: a model without mmnorm's layers and without the norm
layers that follow a conv (``fuse``). Writing the folded model to a file and
loading it back are :mod:`mmnorm.checkpoints.deployed`'s.

In eval mode every norm this module folds is a per-channel affine map of its
input u of shape (N, C, H, W)::

    y = scale * u + shift,   scale = weight / sqrt(running_var + eps),
                             shift = bias - running_mean * scale

BatchNorm (any ``_BatchNorm`` with running statistics, SyncBN included), BRN
and CBN use their running mean and variance (their inference is BatchNorm's);
MABN has no mean (its running_var is the running second moment, Yan et al.,
ICLR 2020, so running_mean is taken as 0: y = weight * u / sqrt(running_var +
eps) + bias); MMDetection's ``FrozenBN`` keeps the same four tensors as
buffers. When u is the output of a conv with weight W of shape
(C, C_in / groups, kh, kw) and bias b (0 if none), the pair is one conv::

    W'[o] = scale[o] * W[o],   b'[o] = scale[o] * b[o] + shift[o]

computed in float64 and stored in the conv's dtype. ``CenConv`` and ``WSConv``
first become ``nn.Conv2d`` with their transformed weight (W_hat, see
``mmnorm/layers/conv.py``), which is then folded the same way.

Which conv feeds which norm is read from what the model runs, by
:func:`conv_norm_pairs` (also used by :func:`mmnorm.surgery.convert.convert`):
the model's forward traced with ``torch.fx`` (:mod:`mmnorm.surgery.dataflow`),
not the order in which modules were registered. Which norms are folded at all
is decided by what their forward computes (:mod:`mmnorm.surgery.norms`); every
norm gets a line in the report (:mod:`mmnorm.surgery.report`).
"""
import torch
from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize

from ..layers import TransformedWeightConv
from ..layers.operators import EagerForward
from .dataflow import feeding_convs
from .norms import channels, known_norm
from .report import SurgeryReport

__all__ = ['conv_norm_pairs', 'format_report', 'fuse', 'mmnorm_modules', 'rebuild_conv']


def is_foldable_norm(module):
    """True if ``module`` in eval mode is a per-channel affine map given by
    running statistics (see the module docstring) and mmnorm knows its
    whole forward (:func:`mmnorm.surgery.norms.known_norm`)."""
    info = known_norm(module)
    return (info is not None and info.kind != 'unknown'
            and getattr(module, 'running_var', None) is not None)


_plain_conv_forwards = None


def _computes_like_conv2d(conv):
    """True if ``conv(x)`` is ``F.conv2d`` of x (after its padding mode) with
    ``conv.weight`` or, for classes with ``transformed_weight()``, that weight."""
    global _plain_conv_forwards
    if _plain_conv_forwards is None:
        forwards = {nn.Conv2d.forward}
        try:  # mmcv's 'Conv' (registered with force=True) only adds an empty-input path
            from mmcv.cnn.bricks.wrappers import Conv2d as MMCVConv2d
            forwards.add(MMCVConv2d.forward)
        except ImportError:  # pragma: no cover
            pass
        _plain_conv_forwards = forwards
    own = vars(conv).get('forward')
    if own is not None and not isinstance(own, EagerForward):  # e.g. a fused eval path
        return False
    return type(conv).forward in _plain_conv_forwards or callable(
        getattr(conv, 'transformed_weight', None))


def conv_weight(conv):
    """theta: the weight ``conv`` convolves with (detached)."""
    with torch.no_grad():
        transformed = getattr(conv, 'transformed_weight', None)
        weight = transformed() if callable(transformed) else conv.weight
    return weight.detach()


def rebuild_conv(conv, conv_class, weight, options=None):
    """A new ``conv_class`` conv to take the place of the 2-D conv ``conv``.

    It is built with ``conv``'s hyper-parameters (channels, kernel, stride,
    padding, dilation, groups, bias or none, padding mode) and the keys of
    the dict ``options`` (e.g. WSConv's ``eps``), then moved to ``conv``'s
    device and dtype and set to its training mode. It holds ``weight``, a
    tensor of ``conv.weight``'s shape (C_out, C_in / groups, kh, kw), and
    ``conv``'s bias, each with the ``requires_grad`` of ``conv``'s.

    :func:`fuse` passes ``nn.Conv2d`` and the transformed weight W_hat of a
    CenConv or WSConv (:func:`conv_weight`); ``mmnorm.convert`` passes the
    class it converts to and the raw weight of a plain conv.
    """
    layer = conv_class(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                       padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                       bias=conv.bias is not None, padding_mode=conv.padding_mode,
                       **(options or {}))
    layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
            layer.bias.copy_(conv.bias)
            layer.bias.requires_grad_(conv.bias.requires_grad)
    layer.train(conv.training)
    return layer


def _is_plain_conv(module):
    """True for an ``nn.Conv2d`` whose output is ``F.conv2d`` of its input with
    ``weight`` (or, for CenConv and WSConv, the transformed weight) and
    ``bias``: no hook, no parametrization, no overridden forward."""
    return (isinstance(module, nn.Conv2d) and _computes_like_conv2d(module)
            and not module._forward_pre_hooks and not module._forward_hooks
            and not parametrize.is_parametrized(module))


def _feeds(conv, norm):
    """Whether ``conv`` counts as the conv of the ``norm`` it feeds."""
    return _is_plain_conv(conv) and conv.out_channels == channels(norm)


def conv_norm_pairs(model, is_norm):
    """Which plain 2-D conv (:func:`_is_plain_conv`, as many output channels
    as the norm has) feeds each norm of ``model`` for which ``is_norm`` holds,
    read from its forward in training mode (the mode is restored; in eval mode
    MMCV's ``ConvModule`` may call its conv and norm as one function).

    Returns:
        (pairs, why): {norm name: conv name} and, for every other such norm,
        {norm name: why no conv is paired} (see
        :func:`mmnorm.surgery.dataflow.feeding_convs`).
    """
    modes = [(module, module.training) for module in model.modules()]
    model.train()
    try:
        return feeding_convs(model, is_norm, _feeds)
    finally:
        for module, training in modes:
            module.training = training


def mmnorm_modules(model):
    """(qualified name, class name) of every module of ``model`` whose class
    comes from the mmnorm package ('<root>' for the model itself)."""
    return [(name or '<root>', type(module).__name__) for name, module in model.named_modules()
            if type(module).__module__.split('.')[0] == 'mmnorm']


# ------------------------------------------------------------------ folding
def _inference_affine(norm):
    """(scale, shift), float64 tensors of shape (C,), with ``norm(u) = scale *
    u + shift`` per channel in eval mode (module docstring)."""
    var = norm.running_var.detach().double()
    mean = norm.running_mean
    mean = torch.zeros_like(var) if mean is None else mean.detach().double()
    weight = norm.weight
    weight = torch.ones_like(var) if weight is None else weight.detach().double()
    bias = norm.bias
    bias = torch.zeros_like(var) if bias is None else bias.detach().double()
    scale = weight / (var + norm.eps).sqrt()
    return scale, bias - mean * scale


def _plain_conv(conv):
    """``conv`` itself, or for a transformed-weight conv (CenConv, WSConv) a
    new ``nn.Conv2d`` with the same hyper-parameters whose weight is the
    transformed weight W_hat."""
    if not isinstance(conv, TransformedWeightConv):
        return conv
    return rebuild_conv(conv, nn.Conv2d, conv_weight(conv))


def _fold(conv, norm):
    """The plain conv computing ``norm(conv(x))`` in eval mode (W', b' of the
    module docstring); ``conv`` itself is changed when it is a plain conv."""
    plain = _plain_conv(conv)
    scale, shift = _inference_affine(norm)
    weight = plain.weight
    scale, shift = scale.to(weight.device), shift.to(weight.device)
    bias = 0 if plain.bias is None else plain.bias.detach().double()
    shape = (-1,) + (1,) * (weight.dim() - 1)
    new_weight = (weight.detach().double() * scale.view(shape)).to(weight.dtype)
    plain.weight = nn.Parameter(new_weight, requires_grad=weight.requires_grad)
    plain.bias = nn.Parameter((bias * scale + shift).to(weight.dtype),
                              requires_grad=weight.requires_grad)
    return plain


def _as_batch_norm(norm):
    """An eval-mode ``nn.BatchNorm2d`` with the inference function of the
    mmnorm norm ``norm`` (for MABN: running_mean 0). It expects (N, C, H, W)
    input, as every norm of a detection model gets."""
    weight = norm.weight
    bn = nn.BatchNorm2d(norm.num_features, eps=norm.eps, device=weight.device,
                        dtype=weight.dtype)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(norm.bias)
        bn.weight.requires_grad_(weight.requires_grad)
        bn.bias.requires_grad_(norm.bias.requires_grad)
        bn.running_var.copy_(norm.running_var)
        if norm.SUBTRACTS_MEAN:
            bn.running_mean.copy_(norm.running_mean)
        bn.num_batches_tracked.copy_(norm.num_batches_tracked)
    bn.eval()
    return bn


_OTHER_NORMS = (_InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def _not_folded(module, info, why):
    """(action, reason, refused) for a norm of the BatchNorm family that no
    conv is folded with."""
    if info.kind == 'unknown':
        return 'kept', info.reason, True
    if getattr(module, 'running_var', None) is None:
        return ('kept', 'track_running_stats=False: it normalises with the batch statistics in '
                'eval too, which is no fixed affine map', True)
    reason = why or 'no conv feeds it'
    if info.kind == 'mmnorm':
        return ('replaced', f'by an eval-mode BatchNorm2d with its inference (not folded: '
                f'{reason})', False)
    return 'kept', f'not folded: {reason}', True


def _folded_norm(norm, info):
    """What takes a folded norm's place: nn.Identity(), or its own modules
    applied after the normalisation (timm's drop and act)."""
    if not info.after:
        return nn.Identity()
    return nn.Sequential(*(getattr(norm, name) for name in info.after))


def fuse(model, report=None, strict=False):
    """Fold ``model`` for inference; returns it.

    Puts ``model`` in eval mode and changes it in place; only when ``model``
    itself is replaced is a new module returned (as
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does), so always use the
    return value. Afterwards:

    * every norm whose forward mmnorm knows (:mod:`mmnorm.surgery.norms`:
      MABN, BRN, CBN, BatchNorm1d/2d/3d, SyncBN, FrozenBN, timm's
      BatchNormAct2d) that the output of a plain 2-D conv feeds, and nothing
      else reads (:func:`conv_norm_pairs`), is folded into that conv (module
      docstring), which gets a bias if it had none. The norm becomes
      ``nn.Identity()`` under the same name (modules that look their norm up
      by name, ResNet's ``norm1_name``, still work), or, for timm's
      BatchNormAct2d, an ``nn.Sequential`` of its own ``drop`` and ``act``. A
      ConvModule's ``efficient_conv_bn_eval`` path is turned off where its
      norm was folded. A conv or norm registered at two places is not folded;
    * every CenConv and WSConv left becomes an ``nn.Conv2d`` with its
      transformed weight;
    * every MABN, BRN or CBN left becomes an eval-mode ``nn.BatchNorm2d`` with
      the same inference function;
    * anything else stays, and the report says why: GroupNorm and the like
      (they use the input's statistics), BatchNorms that no conv feeds,
      ``track_running_stats=False``, and ``_BatchNorm`` subclasses with a
      forward of their own.

    The model then computes what it computed in eval mode before (to rounding)
    and, unless the model's own class is from mmnorm (see
    :func:`mmnorm_modules`), contains no mmnorm module, so a pickled copy loads
    without mmnorm.

    Args:
        model (nn.Module): the model, in any mode.
        report (SurgeryReport, optional): gets one entry per norm, conv and
            mmnorm module handled (:mod:`mmnorm.surgery.report`).
        strict (bool): raise :class:`mmnorm.surgery.report.SurgeryError`,
            before anything is changed, if a norm of the BatchNorm family
            would stay unfolded (other than MABN, BRN and CBN, which are then
            replaced).
    """
    report = SurgeryReport() if report is None else report
    pairs, why = conv_norm_pairs(model, is_foldable_norm)
    uses = {}
    for _, module in model.named_modules(remove_duplicate=False):
        uses[id(module)] = uses.get(id(module), 0) + 1
    modules = dict(model.named_modules())
    swap = {}  # id(old) -> new
    for norm_path, conv_path in pairs.items():
        norm, conv = modules[norm_path], modules[conv_path]
        if uses[id(conv)] > 1 or uses[id(norm)] > 1:
            why[norm_path] = f'it or {conv_path} is registered at two places in the model'
            continue
        info = known_norm(norm)
        if isinstance(conv, TransformedWeightConv):
            report.add(conv_path, conv, 'replaced', 'by Conv2d with its transformed weight')
        swap[id(conv)] = _fold(conv, norm)
        swap[id(norm)] = _folded_norm(norm, info)
        after = f' ({" and ".join(info.after)} kept after the conv)' if info.after else ''
        report.add(norm_path, norm, 'folded', f'into {conv_path}{after}', refused=False)
    for path, module in modules.items():
        if id(module) in swap:
            continue
        if isinstance(module, TransformedWeightConv):
            swap[id(module)] = _plain_conv(module)
            report.add(path, module, 'replaced', 'by Conv2d with its transformed weight')
            continue
        info = known_norm(module)
        if info is None:
            if isinstance(module, _OTHER_NORMS):
                report.add(path, module, 'kept', 'it normalises with statistics of its input')
            continue
        action, reason, refused = _not_folded(module, info, why.get(path))
        if action == 'replaced':
            swap[id(module)] = _as_batch_norm(module)
        report.add(path, module, action, reason, refused=refused)
    report.refuse_if(strict, 'fuse')
    model.eval()
    for module in modules.values():
        if getattr(module, 'efficient_conv_bn_eval_forward', None) is not None and any(
                id(child) in swap and isinstance(swap[id(child)], nn.Identity)
                for child in module.children()):
            module.efficient_conv_bn_eval_forward = None
    if id(model) in swap:
        return swap[id(model)]
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in swap:
                parent._modules[name] = swap[id(child)]  # a module used twice stays one
    return model


def format_report(report):
    """The summary lines of a :func:`fuse` or ``convert`` report."""
    return report.summary()
