"""Folding for inference: a model without mmnorm's layers and without the norm
layers that follow a conv (``fuse``), and the deployed files that
``tools/deploy.py`` writes and ``tools/test.py`` evaluates.

In eval mode every norm this module folds is a per-channel affine map of its
input u of shape (N, C, H, W)::

    y = scale * u + shift,   scale = weight / sqrt(running_var + eps),
                             shift = bias - running_mean * scale

BatchNorm (any ``_BatchNorm`` with running statistics, SyncBN included), BRN
and CBN use their running mean and variance (their inference is BatchNorm's);
MABN has no mean (running_mean is taken as 0: y = weight * u / sqrt(running_var
+ eps) + bias, spec section 1); MMDetection's ``FrozenBN`` keeps the same four
tensors as buffers. When u is the output of a conv with weight W of shape
(C, C_in / groups, kh, kw) and bias b (0 if none), the pair is one conv::

    W'[o] = scale[o] * W[o],   b'[o] = scale[o] * b[o] + shift[o]

computed in float64 and stored in the conv's dtype. ``CenConv`` and ``WSConv``
first become ``nn.Conv2d`` with their transformed weight (W_hat, see
``mmnorm/layers/conv.py``), which is then folded the same way.

Which conv feeds which norm is decided from the module tree alone, by
:func:`conv_norm_pairs` (also used by :func:`mmnorm.surgery.convert.convert`): the
rule MMCV's ``fuse_conv_bn`` applies, with the checks that make it safe on
MMDetection models.
"""
import os.path as osp
import sys
from collections import Counter

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize

from ..compat import torch_version
from ..layers import CenConv, WSConv
from ..layers._ops import EagerForward
from ..layers._state import SmallBatchNorm

__all__ = ['conv_norm_pairs', 'deploy_checkpoint', 'format_report', 'fuse', 'load_deployed',
           'mmnorm_modules', 'save_deployed', 'use_deployed_model']

#: The key of the module in a file written by :func:`save_deployed`.
DEPLOYED_KEY = 'deployed_model'

# (module, class name) of frozen BatchNorm variants in the installed packages
# that are not ``_BatchNorm`` subclasses. They hold weight, bias, running_mean
# and running_var as buffers and compute BatchNorm's inference.
_FROZEN_BN_CLASSES = (('mmdet.models.layers.brick_wrappers', 'FrozenBatchNorm2d'),)


def _frozen_bn_types():
    """The frozen-BN classes whose modules are imported: an instance can only
    exist if its class's module was imported, so nothing is imported here."""
    found = []
    for module_name, class_name in _FROZEN_BN_CLASSES:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, class_name):
            found.append(getattr(module, class_name))
    return tuple(found)


def is_foldable_norm(module):
    """True if ``module`` in eval mode is a per-channel affine map given by
    running statistics (see the module docstring)."""
    if isinstance(module, _BatchNorm):
        return module.running_var is not None
    return isinstance(module, _frozen_bn_types())


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


def _is_plain_conv(module):
    """True for an ``nn.Conv2d`` whose output is ``F.conv2d`` of its input with
    ``weight`` (or, for CenConv and WSConv, the transformed weight) and
    ``bias``: no hook, no parametrization, no overridden forward."""
    return (isinstance(module, nn.Conv2d) and _computes_like_conv2d(module)
            and not module._forward_pre_hooks and not module._forward_hooks
            and not parametrize.is_parametrized(module))


def conv_norm_pairs(parent, is_norm):
    """The (conv name, norm name) pairs among the direct children of
    ``parent`` in which the conv's output is the norm's input.

    The rule (registration order, as MMCV's ``fuse_conv_bn``; a module
    registered under two names counts at both places): a child for
    which ``is_norm(child)`` is true is paired with the child registered just
    before it if that one is a plain 2-D conv (see :func:`_is_plain_conv`:
    ``nn.Conv2d``, MMCV's ``Conv2d`` wrapper, CenConv, WSConv; not DCN, not a
    spectral-normed conv) whose ``out_channels`` equals the norm's
    ``num_features``. MMDetection and MMCV register a conv before the norm it
    feeds (ResNet's ``conv1``, ``bn1``, ...; ``downsample = Sequential(conv,
    norm)``; ``ConvModule``'s ``conv`` then its norm), as torchvision's ResNet
    does. A parent with an ``order`` attribute naming 'conv' and 'norm' (MMCV's
    ``ConvModule``) pairs nothing unless 'norm' comes right after 'conv' in
    it: with ('norm', 'conv', 'act') the norm is applied to the conv's input,
    with ('conv', 'act', 'norm') to the activation's output.
    """
    order = getattr(parent, 'order', None)
    if (isinstance(order, tuple) and 'conv' in order and 'norm' in order
            and order.index('norm') != order.index('conv') + 1):
        return []
    pairs = []
    previous_name, previous = None, None
    for name, child in parent._modules.items():
        if (previous is not None and is_norm(child) and _is_plain_conv(previous)
                and previous.out_channels == getattr(child, 'num_features', None)):
            pairs.append((previous_name, name))
        previous_name, previous = name, child
    return pairs


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
    """``conv`` itself, or for CenConv/WSConv a new ``nn.Conv2d`` with the
    same hyper-parameters whose weight is the transformed weight W_hat."""
    if not isinstance(conv, (CenConv, WSConv)):
        return conv
    weight = conv.weight
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=conv.bias is not None,
                      padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(conv_weight(conv))
        plain.weight.requires_grad_(weight.requires_grad)
        if conv.bias is not None:
            plain.bias.copy_(conv.bias)
            plain.bias.requires_grad_(conv.bias.requires_grad)
    plain.train(conv.training)
    return plain


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
        if norm.running_mean is not None:
            bn.running_mean.copy_(norm.running_mean)
        bn.num_batches_tracked.copy_(norm.num_batches_tracked)
    bn.eval()
    return bn


def _replacement(module, report):
    """The torch module replacing an mmnorm layer left after folding, or None
    for any other module."""
    if isinstance(module, (CenConv, WSConv)):
        report['replaced', f'{type(module).__name__} -> Conv2d'] += 1
        return _plain_conv(module)
    if isinstance(module, SmallBatchNorm):
        report['replaced', f'{type(module).__name__} -> BatchNorm2d'] += 1
        return _as_batch_norm(module)
    return None


_KEPT_NORM_TYPES = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def fuse(model, report=None):
    """Fold ``model`` for inference; returns it.

    Puts ``model`` in eval mode and changes it in place; only when ``model``
    itself is an mmnorm layer is a new module returned (as
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does), so always use the
    return value. Afterwards:

    * every norm for which :func:`is_foldable_norm` holds (MABN, BRN, CBN,
      BatchNorm, SyncBN, FrozenBN) that :func:`conv_norm_pairs` pairs with the
      conv before it is folded into that conv (module docstring), which gets a
      bias if it had none, and becomes ``nn.Identity()`` under the same name,
      so modules that look their norm up by name (ResNet's ``norm1_name``,
      ConvModule's ``norm_name``) still work. A ConvModule's
      ``efficient_conv_bn_eval`` path is turned off where its norm was folded.
      A conv or norm used at two places in the model is not folded;
    * every CenConv and WSConv left becomes an ``nn.Conv2d`` with its
      transformed weight;
    * every MABN, BRN or CBN left (not after a conv) becomes an eval-mode
      ``nn.BatchNorm2d`` with the same inference function;
    * anything else stays: GroupNorm (it uses the input's statistics),
      BatchNorm and FrozenBN not after a conv, other layers.

    The model then computes what it computed in eval mode before (to rounding)
    and, unless the model's own class is from mmnorm (see
    :func:`mmnorm_modules`), contains no mmnorm module, so a pickled copy loads
    without mmnorm.

    Args:
        model (nn.Module): the model, in any mode.
        report (collections.Counter, optional): if given, counts are added to
            it: ``('folded', 'MABN')``, ``('replaced', 'CenConv -> Conv2d')``,
            ``('replaced', 'MABN -> BatchNorm2d')``, ``('kept', 'GroupNorm')``
            (norm layers left in the result), ``('kept', '<class> (mmnorm)')``.
    """
    if report is None:
        report = Counter()
    model.eval()
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for parent in list(model.modules()):
        for conv_name, norm_name in conv_norm_pairs(parent, is_foldable_norm):
            conv, norm = parent._modules[conv_name], parent._modules[norm_name]
            if uses[id(conv)] > 1 or uses[id(norm)] > 1:
                continue
            if isinstance(conv, (CenConv, WSConv)):
                report['replaced', f'{type(conv).__name__} -> Conv2d'] += 1
            report['folded', type(norm).__name__] += 1
            parent._modules[conv_name] = _fold(conv, norm)
            parent._modules[norm_name] = nn.Identity()
            if getattr(parent, 'efficient_conv_bn_eval_forward', None) is not None:
                parent.efficient_conv_bn_eval_forward = None
    new_root = _replacement(model, report)
    if new_root is not None:
        return new_root
    replaced = {}  # id(old) -> (old, new): a module used twice stays one module
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if id(child) not in replaced:
                replaced[id(child)] = (child, _replacement(child, report))
            new = replaced[id(child)][1]
            if new is not None:
                parent._modules[name] = new
    kept_types = _KEPT_NORM_TYPES + _frozen_bn_types()
    for module in model.modules():
        if isinstance(module, kept_types):
            report['kept', type(module).__name__] += 1
    for _, class_name in mmnorm_modules(model):
        report['kept', f'{class_name} (mmnorm)'] += 1
    return model


def format_report(report):
    """The lines of a :func:`fuse` report: folded, replaced, kept."""
    titles = (('folded', 'folded into the conv before them'), ('replaced', 'replaced'),
              ('kept', 'kept as they are'))
    lines = []
    for action, title in titles:
        items = sorted((what, n) for (kind, what), n in report.items() if kind == action)
        text = ', '.join(f'{what}: {n}' for what, n in items) if items else 'none'
        lines.append(f'{title}: {text}')
    return lines


# ----------------------------------------------------------- deployed files
def save_deployed(model, path, meta):
    """Write ``dict(deployed_model=model, meta=meta)`` with ``torch.save``
    (the whole module pickled: its architecture differs from the config's)."""
    torch.save({DEPLOYED_KEY: model, 'meta': meta}, path)


def load_deployed(path):
    """The dict written by :func:`save_deployed` if ``path`` is such a file,
    else None (another checkpoint, a URL, a missing file: left to the usual
    checkpoint loading).

    The file is unpickled with ``weights_only=False``: only pass files you
    trust. Tensors are memory-mapped while checking (torch >= 2.1; torch 2.0
    reads the file into memory), so an ordinary checkpoint is not read here."""
    if not osp.isfile(path):
        return None
    mapped = dict(mmap=True) if torch_version() >= (2, 1) else {}
    try:
        content = torch.load(path, map_location='cpu', weights_only=False, **mapped)
    except RuntimeError:  # e.g. the legacy (non-zip) format, which cannot be mapped
        return None
    if isinstance(content, dict) and isinstance(content.get(DEPLOYED_KEY), nn.Module):
        return content
    return None


def use_deployed_model(runner, deployed):
    """Make ``runner`` (an mmengine Runner built for testing, without
    ``load_from``) evaluate the module of ``deployed`` (from
    :func:`load_deployed`): it is moved and wrapped as the Runner does with
    the model it builds, and replaces ``runner.model``."""
    model = deployed[DEPLOYED_KEY]
    model.eval()  # (some modules' train() returns None: not chained)
    runner.model = runner.wrap_model(runner.cfg.get('model_wrapper_cfg'), model)
    runner.logger.info('mmnorm: evaluating the deployed (folded) model; made from '
                       f'{deployed["meta"].get("checkpoint")}')


def deploy_checkpoint(config, checkpoint, out, cfg_options=None):
    """Build the model of ``config`` (with ``cfg_options`` merged), load
    ``checkpoint`` (refused first if truncated or corrupt) with strict key
    checking, fuse it and save it to ``out`` (:func:`save_deployed`). Returns
    the :func:`fuse` report (a Counter).
    Raises a RuntimeError if an mmnorm module would be left in the file."""
    from mmengine.registry import MODELS, DefaultScope
    from mmengine.runner import load_checkpoint

    from ..engine.checkpoint_check import verify_checkpoint
    from ..engine.runtime import load_config
    cfg = load_config(config, cfg_options)
    verify_checkpoint(checkpoint)
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope', 'mmdet')):
        model = MODELS.build(cfg.model)
    load_checkpoint(model, checkpoint, map_location='cpu', strict=True, logger='current')
    report = Counter()
    model = fuse(model, report)
    left = mmnorm_modules(model)
    if left:
        raise RuntimeError(f'deploy: these modules of {config} are mmnorm classes that fuse '
                           f'cannot replace, so {out} would need mmnorm to load: {left}')
    meta = dict(config=str(config), checkpoint=str(checkpoint),
                report={f'{action} {what}': n for (action, what), n in report.items()},
                torch_version=torch.__version__)
    save_deployed(model, out, meta)
    return report
