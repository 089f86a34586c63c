"""Convert any PyTorch model to small-batch norm layers, keeping its weights.

``convert(model, norm=dict(type='MABN'), conv=dict(type='CenConv'))`` replaces
every BatchNorm whose forward mmnorm knows (:mod:`mmnorm.surgery.norms`:
``nn.BatchNorm2d``, ``nn.SyncBatchNorm``, BatchNorm1d/3d where the new layer
takes their inputs, timm's ``BatchNormAct2d``, whose ``drop`` and ``act`` are
kept after the new layer) by the layer that ``norm`` builds and, when ``conv``
is given, every plain ``nn.Conv2d`` whose output feeds one of them and nothing
else (read from the traced forward, :func:`mmnorm.surgery.fuse.conv_norm_pairs`)
by the conv that ``conv`` builds, as ``nn.SyncBatchNorm.convert_sync_batchnorm``
does for SyncBN. A SyncBatchNorm becomes the same layer as a BatchNorm2d: the
config's ``sync_stats`` says whether statistics are shared. Everything else
is left as it is and reported (:mod:`mmnorm.surgery.report`): frozen
BatchNorms, mmnorm's own layers, ``_BatchNorm`` subclasses with a forward of
their own, ``track_running_stats=False`` (it normalises with batch statistics
in eval too, which no small-batch layer does), and norms that no conv feeds
when ``conv`` is given (after a concatenation, for example). What is carried
over from each BatchNorm of C channels (mean mu, variance var, both (C,)):

* weight and bias (and their ``requires_grad``, unless ``norm`` states
  ``requires_grad``); eps, unless ``norm`` states it;
* running_mean and running_var, when the new layer has both (BRN, CBN, BN);
* when the new layer has a running_var but no running_mean, it normalises the
  uncentred second moment (MABN, Yan et al., ICLR 2020: y = weight * x /
  sqrt(running_var + eps) + bias at inference). It gets the second moment
  that the BatchNorm's statistics describe, E[x^2] = var + mu^2, and weight
  and bias rescaled by :func:`bn_to_mabn` so that its inference computes
  exactly what the BatchNorm's did. The new conv's output differs from the
  old one's when its weight is transformed (CenConv removes each filter's
  mean), so with CenConv the network's function is not kept;
* nothing else: the new layer's step counter and moving-average or history
  buffers are fresh (t = 0), so its warm-up, renormalisation delay or burn-in
  runs in full. Statistics a layer does not have (GroupNorm) are dropped.

Each new conv has the old conv's hyper-parameters, device, dtype, weight and
bias (:func:`mmnorm.surgery.fuse.rebuild_conv`; the raw weight of
CenConv/WSConv is the old weight, so the converted conv computes with its
transformed version). Convs of other kinds (CenConv or
WSConv already, DCN, hooked convs) are left as they are. Every new module
has the training mode of the one it replaces.
"""
import importlib
from collections import OrderedDict

import torch
from mmengine.registry import MODELS
from torch import nn

from ..engine.config_check import unknown_option
from ..layers import conv_types
from ..layers.base import SmallBatchNorm
from ..layers.mabn import bn_to_mabn
from .fuse import conv_norm_pairs, rebuild_conv
from .norms import known_norm
from .report import SurgeryReport

__all__ = ['bn_to_mabn', 'convert']

_MABN_RECIPE_NORM = dict(type='MABN')
_MABN_RECIPE_CONV = dict(type='CenConv')


def _layer_class(argument, cfg):
    """The class that the config dict ``cfg`` (the ``argument`` of convert)
    names; raises a TypeError or KeyError naming ``argument``."""
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise TypeError(f'convert: {argument} must be a dict with a "type" key, e.g. '
                        f'{argument}=dict(type={"MABN" if argument == "norm" else "CenConv"!r}), '
                        f'got {cfg!r}')
    layer_type = cfg['type']
    cls = layer_type if isinstance(layer_type, type) else _registered(layer_type)
    if cls is None:
        raise KeyError(f'convert: {argument} type {layer_type!r} is not a registered layer '
                       '(import mmnorm to register MABN, BRN, CBN, CenConv and WSConv; '
                       'MMCV\'s own types, e.g. GN, need mmcv)')
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f'convert: {argument} type {layer_type!r} is not an nn.Module class')
    return cls


def _registered(name):
    """The class registered as ``name`` in mmengine's root ``MODELS``, or
    None. MMCV registers its own types (BN, GN, Conv2d, ...) there when
    ``mmcv.cnn`` is imported: that import happens here, only for a name not
    registered yet, so converting to mmnorm's layers needs no mmcv."""
    if MODELS.get(name) is None:
        try:
            importlib.import_module('mmcv.cnn')
        except ModuleNotFoundError as error:  # no mmcv: the caller's error says so
            if error.name != 'mmcv':
                raise
    return MODELS.get(name)


def _build_norm(cls, cfg, num_features):
    """``cls`` built for ``num_features`` channels from the other keys of
    ``cfg``, as MMCV's ``build_norm_layer`` builds it (GroupNorm takes
    ``num_channels``; ``requires_grad`` is set on the parameters)."""
    kwargs = {key: value for key, value in cfg.items() if key != 'type'}
    requires_grad = kwargs.pop('requires_grad', True)
    if issubclass(cls, nn.GroupNorm):
        kwargs['num_channels'] = num_features
        layer = cls(**kwargs)
    else:
        layer = cls(num_features, **kwargs)
    for param in layer.parameters():
        param.requires_grad = requires_grad
    return layer


def _new_norm(bn, name, norm_class, norm_cfg):
    """The ``norm_class`` layer built from ``norm_cfg`` for the BatchNorm
    ``bn`` (at ``name``), with what the module docstring lists carried over.
    An option the layer does not take, or a value it refuses, raises with
    ``name`` in front."""
    if issubclass(norm_class, SmallBatchNorm):
        message = unknown_option(norm_class.__name__, norm_class, 'norm', norm_cfg)
        if message is not None:
            raise TypeError(f'{name}: {message}')
    cfg = dict(norm_cfg)
    cfg.setdefault('eps', bn.eps)
    try:
        layer = _build_norm(norm_class, cfg, bn.num_features)
    except (TypeError, ValueError) as error:
        raise type(error)(f'{name}: {norm_cfg.get("type")} for {bn.num_features} channels: '
                          f'{error}') from error
    reference = bn.running_var if bn.running_var is not None else bn.weight
    if reference is not None:
        layer.to(device=reference.device, dtype=reference.dtype)
    weight, bias = getattr(layer, 'weight', None), getattr(layer, 'bias', None)
    if bn.affine and (weight is None or bias is None):
        raise ValueError(f'convert: the layer built from norm={norm_cfg!r} has no weight and '
                         f'bias to keep those of the BatchNorm2d {name!r}')
    with torch.no_grad():
        if bn.affine:
            weight.copy_(bn.weight)
            bias.copy_(bn.bias)
            if 'requires_grad' not in norm_cfg:
                weight.requires_grad_(bn.weight.requires_grad)
                bias.requires_grad_(bn.bias.requires_grad)
        new_var = getattr(layer, 'running_var', None)
        if bn.running_var is not None and new_var is not None:
            if not getattr(layer, 'SUBTRACTS_MEAN', True):  # the second moment, same inference
                if weight is None:
                    raise ValueError(f'convert: the layer built from norm={norm_cfg!r} has no '
                                     f'weight and bias to keep the inference of {name!r}')
                ones = torch.ones_like(bn.running_var)
                new_weight, new_bias, second_moment = bn_to_mabn(
                    bn.weight if bn.affine else ones, bn.bias if bn.affine else 0 * ones,
                    bn.running_mean, bn.running_var, bn.eps, layer.eps)
                weight.copy_(new_weight)
                bias.copy_(new_bias)
                new_var.copy_(second_moment)
            else:
                layer.running_mean.copy_(bn.running_mean)
                new_var.copy_(bn.running_var)
    layer.train(bn.training)  # (some modules' train() returns None: not chained)
    return layer


def _refusal(module, info, norm_class, norm_cfg):
    """(action, reason, refused) when the BatchNorm-family ``module`` is not
    replaced, else None."""
    if info.kind == 'mmnorm':
        return 'kept', 'already an mmnorm layer', False
    if info.kind == 'frozen':
        return 'kept', 'frozen (it trains nothing); unfreeze it first to train it', False
    if info.kind == 'unknown':
        return 'kept', info.reason, True
    if module.running_var is None:
        return ('skipped', 'track_running_stats=False: it normalises with the batch statistics '
                'in eval too, which the converted layer would not', True)
    takes_any_rank = (issubclass(norm_class, nn.GroupNorm)
                      or issubclass(norm_class, SmallBatchNorm)
                      and not norm_class.needs_feeding_conv(norm_cfg))
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm3d)) and not takes_any_rank:
        return ('skipped', f'{norm_class.__name__} takes the 4-D output of a 2-D conv, not '
                f'the inputs of {type(module).__name__}', True)
    return None


def _replacement(module, path, info, norm_class, norm_cfg):
    """(new module, report detail) for the BatchNorm-family ``module``."""
    layer = _new_norm(module, path, norm_class, norm_cfg)
    detail = f'by {type(layer).__name__}'
    if isinstance(module, nn.SyncBatchNorm) and getattr(layer, 'sync_stats', None) is False:
        detail += (' (was SyncBatchNorm: statistics are per process; set sync_stats=True '
                   'in norm to share them)')
    if not info.after:
        return layer, detail
    parts = OrderedDict([('norm', layer)] + [(name, getattr(module, name)) for name in info.after])
    return nn.Sequential(parts), f'{detail}, followed by its own {" and ".join(info.after)}'


def _plan(module, norm_class, norm_cfg, conv_class, conv_cfg, report):
    """id(old) -> (old, new) for every module of ``module`` to replace, all
    built before anything is changed (so a failing build changes nothing);
    fills ``report``."""
    candidates = []  # (path, BatchNorm, its Norm) to replace
    for path, child in module.named_modules():
        info = known_norm(child)
        if info is None or any(child is c for _, c, _ in candidates):
            continue
        refusal = _refusal(child, info, norm_class, norm_cfg)
        if refusal is not None:
            report.add(path, child, refusal[0], refusal[1], refused=refusal[2])
        else:
            candidates.append((path, child, info))
    needs_conv = (issubclass(norm_class, SmallBatchNorm)
                  and norm_class.needs_feeding_conv(norm_cfg))
    pairs, why = {}, {}
    if conv_cfg is not None or needs_conv:
        ids = {id(child) for _, child, _ in candidates}
        pairs, why = conv_norm_pairs(module, lambda m: id(m) in ids)
    modules = dict(module.named_modules())
    conv_options = {key: value for key, value in (conv_cfg or {}).items() if key != 'type'}
    transformed = tuple(conv_types().values())  # convs whose weight mmnorm transforms already
    plan = {}
    for path, child, info in candidates:
        conv_path = pairs.get(path)
        if needs_conv and conv_path is None:
            reason = why.get(path, 'no conv feeds it')
            report.add(path, child, 'skipped', f'{norm_class.__name__} compensates its statistics '
                       f'with the weight of the conv that feeds it, and {reason}; rho=0 in norm '
                       'gives the uncompensated average', refused=True)
            continue
        new, detail = _replacement(child, path or '<root>', info, norm_class, norm_cfg)
        plan[id(child)] = (child, new)
        report.add(path, child, 'replaced', detail)
        if conv_cfg is None:
            continue
        if conv_path is None:
            report.add(path, child, 'skipped', f'no {conv_class.__name__} in front of it: '
                       f'{why.get(path, "no conv feeds it")}', refused=True)
            continue
        conv = modules[conv_path]
        if isinstance(conv, transformed) or id(conv) in plan:
            continue
        plan[id(conv)] = (conv, rebuild_conv(conv, conv_class, conv.weight, conv_options))
        report.add(conv_path, conv, 'replaced', f'by {conv_class.__name__} (it feeds {path})')
    return plan


def convert(module, norm=_MABN_RECIPE_NORM, conv=_MABN_RECIPE_CONV, strict=False, report=None):
    """Replace every BatchNorm of ``module`` that mmnorm knows by the layer
    built from ``norm`` and, unless ``conv`` is None, every plain conv feeding
    one by the conv built from ``conv``, keeping weights (module docstring).

    Args:
        module (nn.Module): any model (or a single BatchNorm).
        norm (dict): a norm config as in MMDetection's ``norm_cfg``, built
            as MMCV's ``build_norm_layer`` does: ``dict(type='MABN')``,
            ``dict(type='BRN', warmup_iters=500)``, ``dict(type='CBN',
            buffer_num=3)``, ``dict(type='GN', num_groups=32)``, extra keys
            (e.g. ``buffer_size``) passed to the layer.
        conv (dict or None): a conv config as ``conv_cfg``, e.g.
            ``dict(type='CenConv')`` (MABN's recipe) or ``dict(type='WSConv')``;
            None keeps the convs.
        strict (bool): raise :class:`mmnorm.surgery.report.SurgeryError`,
            before anything is changed, if a BatchNorm could not be replaced
            or (with ``conv``) given its new conv.
        report (SurgeryReport, optional): gets one entry per norm seen and
            per conv replaced (:mod:`mmnorm.surgery.report`).

    Returns:
        nn.Module: ``module`` converted in place, or the new layer when
        ``module`` itself is a BatchNorm.

    Raises:
        TypeError, KeyError, ValueError: a bad ``norm`` or ``conv`` (the
        message names the argument), or a layer that cannot be built for one
        of the BatchNorms (the message names its module path and the
        option). Every new layer is built before the model is touched, so
        after an error it is unchanged.
    """
    norm_class = _layer_class('norm', norm)
    conv_class = None
    if conv is not None:
        conv_class = _layer_class('conv', conv)
        if not issubclass(conv_class, nn.Conv2d):
            raise TypeError(f'convert: conv type {conv["type"]!r} must be an nn.Conv2d '
                            'subclass (it is built with nn.Conv2d\'s arguments)')
    report = SurgeryReport() if report is None else report
    plan = _plan(module, norm_class, norm, conv_class, conv, report)
    report.refuse_if(strict, 'convert')
    if id(module) in plan:
        return plan[id(module)][1]
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in plan:
                parent._modules[name] = plan[id(child)][1]  # a module used twice stays one
    return module
