"""Check a config's mmnorm layers before anything is built, so a mistake is
reported in one line that says where it is and what is allowed, instead of
after mmengine's environment and config dump and a traceback through the
model's constructors.

:func:`check_config_path` refuses a config file that does not exist (naming
the closest existing ones); :func:`check_layer_cfgs` finds every
``dict(type=NAME, ...)`` under ``cfg.model`` whose NAME is one of mmnorm's
layers, refuses keys the layer does not take (naming the closest one and all
it takes) and builds one small layer from the entry, so the layer's own
checks of the values run (e.g. MABN's ``buffer_size`` must be > 0).
Both raise :class:`ConfigError`.
"""
import difflib
import glob
import inspect
import os.path as osp

from torch import nn

__all__ = ['ConfigError', 'check_config_path', 'check_layer_cfgs', 'unknown_option']

#: What mmcv's builders take out of a layer's cfg before calling the class:
#: build_norm_layer pops ``type`` and ``requires_grad``; build_conv_layer ``type``.
BUILDER_KEYS = {'norm': ('type', 'requires_grad'), 'conv': ('type',)}


class ConfigError(ValueError):
    """A config that cannot be built, with where the mistake is and what is allowed."""


def check_config_path(path):
    """Raise ConfigError if ``path`` is not a file, naming the closest config
    files of its folder (or of ./configs when that folder does not exist)."""
    if osp.isfile(path):
        return
    folder = osp.dirname(path) if osp.isdir(osp.dirname(path) or '.') else 'configs'
    candidates = sorted(glob.glob(osp.join(folder, '**', '*.py'), recursive=True))
    close = difflib.get_close_matches(path, candidates, n=3, cutoff=0.5)
    hint = f'; did you mean {" or ".join(close)}?' if close else ''
    raise ConfigError(f'config file {path} does not exist{hint}')


def _layer_kinds():
    """name -> (class, 'norm' | 'conv') of every registered mmnorm layer."""
    from ..layers import conv_types, norm_types
    return ({name: (cls, 'norm') for name, cls in norm_types().items()}
            | {name: (cls, 'conv') for name, cls in conv_types().items()})


def layer_options(cls, kind):
    """The keys a cfg of layer class ``cls`` may hold: the builder's own and
    the keyword arguments of ``cls`` (through ``**kwargs`` to its bases), but
    not the sizes the builder passes (num_features; in/out channels, kernel size)."""
    names = list(BUILDER_KEYS[kind])
    for klass in cls.__mro__:
        if klass is nn.Module:
            break
        params = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    sizes = {'self', 'num_features', 'in_channels', 'out_channels', 'kernel_size'}
    return [name for name in names if name not in sizes]


def _build_small(cls, kind, entry):
    kwargs = {k: v for k, v in entry.items() if k not in BUILDER_KEYS[kind]}
    if kind == 'norm':
        cls(8, **kwargs)
    else:
        cls(8, 8, 3, **kwargs)


def _entries(node, where):
    """(key path, dict) of every dict under ``node`` (depth first, in order)."""
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            yield from _entries(value, f'{where}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _entries(value, f'{where}[{i}]')


def unknown_option(name, cls, kind, entry):
    """The message for the first key of the layer cfg ``entry`` that ``cls``
    (named ``name``, a 'norm' or 'conv' ``kind``) does not take, or None."""
    options = layer_options(cls, kind)
    for key in entry:
        if key not in options:
            close = difflib.get_close_matches(key, options, n=1)
            hint = f' (did you mean {close[0]!r}?)' if close else ''
            return f'{name} has no option {key!r}{hint}; {name} takes: {", ".join(options)}'
    return None


def check_layer_cfgs(cfg):
    """Raise ConfigError at the first mmnorm layer entry under ``cfg.model``
    with a key its layer does not take or a value its layer refuses."""
    kinds = _layer_kinds()
    for where, entry in _entries(cfg.get('model'), 'model'):
        name = entry.get('type')
        if not isinstance(name, str) or name not in kinds:
            continue
        cls, kind = kinds[name]
        message = unknown_option(name, cls, kind, entry)
        if message is not None:
            raise ConfigError(f'{where}: {message}')
        try:
            _build_small(cls, kind, entry)
        except (TypeError, ValueError) as error:
            raise ConfigError(f'{where}: {error}') from error
