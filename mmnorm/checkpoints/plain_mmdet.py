"""Deploy as plain MMDetection: a config and a weights-only checkpoint that
need no mmnorm (``tools/deploy.py CONFIG CHECKPOINT OUT --to mmdet``).

``OUT/config.py`` and ``OUT/model.pth`` are the pair MMDetection's own tools
take (``init_detector``, its ``tools/test.py``, MMDeploy): each mmnorm layer
becomes the layer MMDetection ships that computes the same function in eval
mode, and its weights are rewritten to match. Module names, and so the
state-dict keys of everything else, stay.

Norms, per channel, input u of shape (N, C, H, W), in eval mode::

    BRN, CBN:  y = weight * (u - running_mean) / sqrt(running_var + eps) + bias
               -> BN: the same weight, bias, running_mean, running_var, eps
    MABN:      y = weight * u / sqrt(running_var + eps) + bias
               (running_var is the running second moment E[u^2]; no mean)
               -> BN: running_mean = 0, running_var = MABN's running_var,
                  the same weight, bias, eps

In the config, ``dict(type='MABN' | 'BRN' | 'CBN', ...)`` becomes
``dict(type='BN', requires_grad=R, eps=E)``: R the entry's ``requires_grad``
(default True, as mmcv's ``build_norm_layer``), E its ``eps`` (default: the
layer class's, 1e-5). Their other options (windows, schedules, momentum,
sync_stats) act in training only; the buffers only they use (MABN's windows,
CBN's history) are dropped.

Convs, weight W of shape (C_out, C_in / groups, kh, kw), each output filter
W[o] holding n = C_in / groups * kh * kw numbers::

    CenConv:  W_hat[o] = W[o] - mean(W[o])
    WSConv:   W_hat[o] = (W[o] - mean(W[o])) / (std(W[o]) + eps)   (std unbiased)

-> ``nn.Conv2d`` with weight W_hat and the same bias; W_hat is what the layer
convolves with, taken from its own ``transformed_weight()``
(:func:`mmnorm.surgery.fuse.conv_weight`). In the config
``dict(type='CenConv' | 'WSConv', ...)`` becomes ``dict(type='Conv2d', ...)``
(WSConv's ``eps`` dropped). Training the pair further trains plain BN and
plain convs: the pair is for inference.

Everything else stays: GroupNorm, BN, SyncBN, the data pipelines and
evaluators. Besides, ``custom_imports`` loses ``'mmnorm'`` (and is dropped when
nothing is left to import), mmnorm's hooks (CBNBurninHook, PreciseBNHook,
ResumeRandomStateHook; training only) are dropped, and ``CPUAmpOptimWrapper``
becomes its base ``AmpOptimWrapper``. Any other mmnorm type left in the config
is refused (:class:`DeployError`).

The config is the fully merged one (``mmdet::`` bases, ``--cfg-options``;
no ``_base_`` or ``_delete_`` left), written by mmengine's ``Config.dump``.
``model.pth`` holds ``state_dict`` (exactly the keys of the plain model) and
``meta`` (plain strings and numbers: it loads with
``torch.load(..., weights_only=True)``).
"""
import copy
import inspect
import os
import os.path as osp
import shutil
import uuid
from collections import Counter, OrderedDict

import torch
from torch import nn

from ..layers import conv_types, norm_types
from ..surgery.fuse import conv_weight, mmnorm_modules
from .deployed import DEPLOYED_KEY

__all__ = ['DeployError', 'plain_config', 'plain_conv_cfg', 'plain_norm_cfg', 'plain_state_dict',
           'check_plain_model', 'write_plain_mmdet', 'CONFIG_NAME', 'WEIGHTS_NAME']

CONFIG_NAME = 'config.py'
WEIGHTS_NAME = 'model.pth'

#: mmnorm types with an MMDetection/mmengine counterpart taking the same arguments.
RENAMED = {'CPUAmpOptimWrapper': 'AmpOptimWrapper'}
#: The state-dict entries of a BatchNorm2d, in its order.
BN_KEYS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


class DeployError(ValueError):
    """Input the pair cannot be made from (``tools/deploy.py`` reports it as
    one line, passing it to ``run_tool`` as one of its own errors)."""


# ------------------------------------------------------------------ config
def _type_name(kind):
    """The registered name a config ``type`` value refers to (scope prefix
    dropped; a class gives its name), or None."""
    if isinstance(kind, type):
        return kind.__name__
    if isinstance(kind, str):
        return kind.rsplit('.', 1)[-1]
    return None


def _mmnorm_registered():
    """{name: class} of everything mmnorm registers in mmengine's root registries."""
    import mmengine.registry as registries
    from mmengine.registry import Registry
    found = {}
    for attr in dir(registries):
        registry = getattr(registries, attr)
        if isinstance(registry, Registry):
            for name, cls in registry.module_dict.items():
                if getattr(cls, '__module__', '').split('.')[0] == 'mmnorm':
                    found[name] = cls
    return found


def plain_norm_cfg(entry):
    """``dict(type='BN', requires_grad=R, eps=E)`` for the MABN, BRN or CBN
    config ``entry`` (module docstring)."""
    cls = norm_types()[_type_name(entry['type'])]
    eps = entry.get('eps', inspect.signature(cls).parameters['eps'].default)
    return dict(type='BN', requires_grad=entry.get('requires_grad', True), eps=eps)


def plain_conv_cfg(entry):
    """``dict(type='Conv2d', ...)`` for the config ``entry`` of a registered
    transformed-weight conv (CenConv, WSConv): its other keys kept, the
    options a plain conv does not take (the class's ``OPTIONS``) dropped."""
    options = conv_types()[_type_name(entry['type'])].OPTIONS
    rest = {k: v for k, v in entry.items() if k != 'type' and k not in options}
    return dict(type='Conv2d', **rest)


def _rewrite(node, path, changes, norms, convs):
    """``node`` with every entry of a norm in ``norms`` or a conv in
    ``convs`` (type names) replaced (recursively)."""
    if isinstance(node, dict):
        name = _type_name(node.get('type'))
        if name in norms:
            new = plain_norm_cfg(node)
            changes.append(f'{path}: {name} -> BN')
            return new
        if name in convs:
            changes.append(f'{path}: {name} -> Conv2d')
            return plain_conv_cfg(node)
        if name in RENAMED:
            changes.append(f'{path}: {name} -> {RENAMED[name]}')
            node = dict(node, type=RENAMED[name])
        return {key: _rewrite(value, f'{path}.{key}' if path else str(key), changes, norms,
                              convs)
                for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_rewrite(value, f'{path}.{i}', changes, norms, convs)
                          for i, value in enumerate(node))
    return node


def _find_types(node, names, path=''):
    """(path, name) of every dict under ``node`` whose type is in ``names``."""
    found = []
    if isinstance(node, dict):
        name = _type_name(node.get('type'))
        if name in names:
            found.append((path or '<root>', name))
        for key, value in node.items():
            found += _find_types(value, names, f'{path}.{key}' if path else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            found += _find_types(value, names, f'{path}.{i}')
    return found


def plain_config(cfg):
    """The plain MMDetection config of ``cfg`` (an mmengine ``Config``, fully
    merged) and the list of changes made, one line each (module docstring).
    ``cfg`` is not changed. Raises :class:`DeployError` if an mmnorm type is
    left that has no MMDetection counterpart."""
    from mmengine.config import Config
    from mmengine.hooks import Hook
    registered = _mmnorm_registered()
    hooks = {name for name, cls in registered.items()
             if isinstance(cls, type) and issubclass(cls, Hook)}
    changes = []
    data = _rewrite(copy.deepcopy(cfg.to_dict()), '', changes, set(norm_types()),
                    set(conv_types()))

    imports = data.get('custom_imports')
    if isinstance(imports, dict):
        listed = imports.get('imports', [])
        listed = [listed] if isinstance(listed, str) else list(listed)
        kept = [name for name in listed if name.split('.')[0] != 'mmnorm']
        if len(kept) != len(listed):
            if kept:
                data['custom_imports'] = dict(imports, imports=kept)
                changes.append("custom_imports: 'mmnorm' removed")
            else:
                del data['custom_imports']
                changes.append("custom_imports: dropped (it imported mmnorm only)")

    custom = data.get('custom_hooks')
    if isinstance(custom, (list, tuple)):
        kept = []
        for hook in custom:
            name = _type_name(hook.get('type')) if isinstance(hook, dict) else None
            if name in hooks:
                changes.append(f'custom_hooks: {name} dropped (mmnorm, training only)')
            else:
                kept.append(hook)
        if kept:
            data['custom_hooks'] = kept
        else:
            del data['custom_hooks']
    default_hooks = data.get('default_hooks')
    if isinstance(default_hooks, dict):
        for key, hook in list(default_hooks.items()):
            name = _type_name(hook.get('type')) if isinstance(hook, dict) else None
            if name in hooks:
                del default_hooks[key]
                changes.append(f'default_hooks.{key}: {name} dropped (mmnorm, training only)')

    left = _find_types(data, set(registered))
    if left:
        listed = ', '.join(f'{path} ({name})' for path, name in left)
        raise DeployError(f'the config uses mmnorm types that MMDetection has no counterpart '
                          f'for, so the plain config would need mmnorm: {listed}')
    return Config(data), changes


# -------------------------------------------------------------- state dict
def _bn_state(norm):
    """BatchNorm2d's entries (``BN_KEYS``) computing what ``norm`` (MABN,
    BRN or CBN) computes in eval mode; MABN: running_mean 0."""
    var = norm.running_var.detach()
    mean = norm.running_mean.detach() if norm.SUBTRACTS_MEAN else torch.zeros_like(var)
    values = (norm.weight.detach(), norm.bias.detach(), mean, var,
              norm.num_batches_tracked.detach())
    return {key: value.clone() for key, value in zip(BN_KEYS, values)}


def plain_state_dict(model):
    """The state dict of ``model``'s plain counterpart: the entries of each
    MABN, BRN and CBN replaced by a BatchNorm2d's (:func:`_bn_state`, in BN's
    order, at the norm's place), the weight of each CenConv and WSConv by the
    weight it convolves with (W_hat), everything else as it is.

    Returns:
        (OrderedDict, Counter): the state dict, and how many modules of each
        kind were replaced ('MABN -> BN': n, 'CenConv -> Conv2d': n, ...).
    """
    norms, convs = tuple(norm_types().values()), tuple(conv_types().values())
    special = {name: module for name, module in model.named_modules(remove_duplicate=False)
               if isinstance(module, norms + convs)}
    counts = Counter()
    for module in model.modules():
        if isinstance(module, norms):
            counts[f'{type(module).__name__} -> BN'] += 1
        elif isinstance(module, convs):
            counts[f'{type(module).__name__} -> Conv2d'] += 1
    state = OrderedDict()
    done = set()
    for key, value in model.state_dict().items():
        owner, _, local = key.rpartition('.')
        module = special.get(owner)
        if module is None:
            state[key] = value
        elif isinstance(module, convs):
            state[key] = conv_weight(module).clone() if local == 'weight' else value
        elif owner not in done:
            done.add(owner)
            prefix = f'{owner}.' if owner else ''
            state.update((prefix + k, v) for k, v in _bn_state(module).items())
    return state, counts


_CONV_ATTRS = ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding', 'dilation',
               'groups', 'padding_mode')


def check_plain_model(source, plain):
    """Raise a RuntimeError unless ``plain`` (built from the plain config) has
    ``source``'s modules under the same names, each mmnorm norm as a
    BatchNorm2d with its size and eps, each CenConv/WSConv as a plain conv
    with its hyper-parameters, everything else of the same class; and no
    mmnorm module at all."""
    from ..surgery.fuse import _computes_like_conv2d
    src, dst = dict(source.named_modules()), dict(plain.named_modules())
    norms, convs = tuple(norm_types().values()), tuple(conv_types().values())
    problems = [f'{name}: missing' for name in src if name not in dst]
    problems += [f'{name}: not in the trained model' for name in dst if name not in src]
    for name, module in src.items():
        other = dst.get(name)
        if other is None:
            continue
        if isinstance(module, norms):
            ok = (type(other) is nn.BatchNorm2d and other.num_features == module.num_features
                  and other.eps == module.eps and other.affine and other.track_running_stats)
        elif isinstance(module, convs):
            ok = (isinstance(other, nn.Conv2d) and not isinstance(other, convs)
                  and _computes_like_conv2d(other)
                  and all(getattr(other, a) == getattr(module, a) for a in _CONV_ATTRS)
                  and (other.bias is None) == (module.bias is None))
        else:
            ok = type(other) is type(module)
        if not ok:
            problems.append(f'{name}: {type(module).__name__} became {type(other).__name__}'
                            f'({other.extra_repr()})')
    problems += [f'{name}: {cls} is mmnorm\'s' for name, cls in mmnorm_modules(plain)]
    if problems:
        raise RuntimeError(f'the plain config does not build the model the checkpoint was '
                           f'trained as ({len(problems)} problems): {"; ".join(problems[:5])}')


# ------------------------------------------------------------------ writer
def _plain(value):
    """``value`` as plain Python (dict, list, tuple, str, int, float, bool,
    None) that ``torch.load(weights_only=True)`` reads; other objects as str."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return (tuple if isinstance(value, tuple) else list)(_plain(v) for v in value)
    if hasattr(value, 'tolist'):  # numpy arrays and scalars, tensors
        return _plain(value.tolist())
    for kind in (bool, int, float, str):  # subclasses too (torch.__version__ is one of str)
        if isinstance(value, kind):
            return kind(value)
    return None if value is None else str(value)


def _load_trained(cfg, checkpoint, config):
    """The model of ``cfg`` with ``checkpoint``'s weights (strict), and the
    checkpoint's own ``meta``. A checkpoint that does not fit raises
    :class:`DeployError` saying which keys differ."""
    from mmengine.registry import MODELS, DefaultScope
    from mmengine.runner.checkpoint import _load_checkpoint
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope', 'mmdet')):
        model = MODELS.build(cfg.model)
    content = _load_checkpoint(checkpoint, map_location='cpu')
    if isinstance(content, dict) and DEPLOYED_KEY in content:
        raise DeployError(f'{checkpoint} is a deployed (folded) model, not a training '
                          f'checkpoint: give the checkpoint it was made from')
    state = content.get('state_dict', content) if isinstance(content, dict) else None
    if not isinstance(state, dict):
        raise DeployError(f'{checkpoint} holds no state dict')
    state = OrderedDict((key[len('module.'):] if key.startswith('module.') else key, value)
                        for key, value in state.items())
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that differ
        sizes = [line.strip() for line in str(error).splitlines() if 'size mismatch' in line]
        what = (f'{len(sizes)} tensor(s) of another shape, first: {sizes[0]}' if sizes
                else ' '.join(str(error).split()))
        raise DeployError(f'checkpoint {checkpoint} does not match the model of {config}: '
                          f'{what}') from None
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        def first(keys):
            return f'{len(keys)} ({", ".join(keys[:3])}{", ..." if len(keys) > 3 else ""})'
        raise DeployError(f'checkpoint {checkpoint} does not match the model of {config}: '
                          f'missing keys {first(missing)}, unexpected keys {first(unexpected)}')
    meta = content.get('meta') if isinstance(content, dict) else None
    return model.eval(), meta if isinstance(meta, dict) else {}


def write_plain_mmdet(config, checkpoint, out, cfg_options=None):
    """Write ``out/config.py`` (:func:`plain_config` of ``config`` with
    ``cfg_options`` merged, by ``Config.dump``) and ``out/model.pth``
    (``state_dict``: :func:`plain_state_dict` of the model of ``config`` with
    ``checkpoint``'s weights, loaded strictly; ``meta``).

    ``out`` must not exist; both files are written into a new folder next to
    it, checked (the config is read back with ``Config.fromfile``, builds a
    model without mmnorm modules, and the weights load into it with
    ``torch.load(weights_only=True)`` and ``strict=True``), and only then is
    that folder renamed to ``out``: on any error nothing is left.

    Returns:
        dict: ``replaced`` (Counter of 'MABN -> BN' etc., modules),
        ``changes`` (the config lines changed) and ``meta`` (as saved).
    Raises:
        DeployError: ``out`` exists, the checkpoint does not fit the config, or
            the config holds an mmnorm type MMDetection has no counterpart for.
    """
    from mmengine.config import Config
    from mmengine.registry import MODELS, DefaultScope

    from .. import __version__
    from ..engine.checkpoint_check import verify_checkpoint
    from ..engine.config import load_config

    config, checkpoint, out = str(config), str(checkpoint), str(out)
    if osp.lexists(out):
        raise DeployError(f'{out} exists: name a folder that does not exist yet (nothing was '
                          f'written)')
    cfg = load_config(config, cfg_options)  # the trusted-checkpoint and config checks
    verify_checkpoint(checkpoint)
    source, source_meta = _load_trained(cfg, checkpoint, config)

    merged = Config.fromfile(config)  # without the keys load_config adds (launcher, work_dir)
    if cfg_options:
        merged.merge_from_dict(cfg_options)
    plain_cfg, changes = plain_config(merged)
    scope = plain_cfg.get('default_scope', 'mmdet')
    with DefaultScope.overwrite_default_scope(scope):
        plain = MODELS.build(plain_cfg.model)
    check_plain_model(source, plain)
    state, replaced = plain_state_dict(source)
    expected = plain.state_dict()
    if list(state) != list(expected):
        extra = [k for k in state if k not in expected]
        lost = [k for k in expected if k not in state]
        raise RuntimeError(f'the rewritten state dict does not have the plain model\'s keys '
                           f'(not in the model: {extra[:5]}, missing: {lost[:5]})')
    plain.load_state_dict(state, strict=True)

    meta = _plain(dict(
        made_by='tools/deploy.py --to mmdet (mmnorm.checkpoints.plain_mmdet)',
        config=osp.abspath(str(config)), checkpoint=osp.abspath(str(checkpoint)),
        cfg_options=_plain(dict(cfg_options or {})), mmnorm_version=__version__,
        torch_version=torch.__version__, replaced=dict(sorted(replaced.items())),
        config_changes=list(changes)))
    for key in ('dataset_meta', 'epoch', 'iter'):
        if key in source_meta:
            meta[key] = _plain(source_meta[key])

    parent = osp.dirname(osp.abspath(out))
    os.makedirs(parent, exist_ok=True)
    partial = osp.join(parent, f'.{osp.basename(osp.abspath(out))}.partial-{uuid.uuid4().hex[:8]}')
    os.mkdir(partial)
    try:
        plain_cfg.dump(osp.join(partial, CONFIG_NAME))
        torch.save(dict(state_dict=state, meta=meta), osp.join(partial, WEIGHTS_NAME))
        _check_written(partial, scope)
        if osp.lexists(out):
            raise DeployError(f'{out} appeared while writing; nothing was written there')
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dict(replaced=replaced, changes=changes, meta=meta)


def _check_written(folder, scope):
    """Read the pair in ``folder`` back as a user would: the config with
    ``Config.fromfile``, its model built, the weights with
    ``weights_only=True`` loaded strictly."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, DefaultScope
    cfg = Config.fromfile(osp.join(folder, CONFIG_NAME))
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope', scope)):
        model = MODELS.build(cfg.model)
    left = mmnorm_modules(model)
    if left:
        raise RuntimeError(f'the written config builds mmnorm modules: {left[:5]}')
    content = torch.load(osp.join(folder, WEIGHTS_NAME), map_location='cpu', weights_only=True)
    model.load_state_dict(content['state_dict'], strict=True)
