"""Put a small-batch norm (and its conv) into any MMDetection config.

:func:`norm_config` walks the model of a read config (``Config.fromfile``,
``mmdet::`` bases resolved) and decides, for every component, whether it gets
the norm: the backbone, the neck, every head that takes a ``norm_cfg``, every
stage of a cascade, shared heads. It returns the overrides to write (the delta
over the base, lists whole: mmengine replaces a list, it cannot merge into
one) and one :class:`Row` per decision, the left-alone ones with the reason.
:func:`config_text` writes the overrides as a config file that inherits the
base; ``tools/norm_config.py`` is the command line over both.

Which components get the norm:

* without ``everywhere``: the backbone and every component whose norm in the
  base (its ``norm_cfg``, or its class's default) is a batch or group norm
  (BN, SyncBN, GN, one of mmnorm's);
* with ``everywhere``: also every component that takes a ``norm_cfg`` and has
  none (the FPN, the box and mask heads, dense heads), as the MABN paper's
  setting (``configs/_base_/mask_rcnn_norm_everywhere_scratch_2x.py``); a box
  head with no conv (``Shared2FCBBoxHead``) becomes the paper's 4-conv + 1-fc
  ``Shared4Conv1FCBBoxHead``.

Left alone, each with its row: a class with no ``norm_cfg`` argument (RPNHead),
a norm that is not a batch or group norm (LN of a transformer), a component
that builds no norm layer from its ``norm_cfg``. Every component that gets the
norm is built once (a trial build), which counts its layers for the table and
refuses what cannot be built (GN's groups that do not divide a width).

What each method brings, from the project's COCO configs:

* MABN, BRN, CBN (any registered :class:`~mmnorm.layers.SmallBatchNorm`): in
  the backbone ``norm_eval=False`` and ``frozen_stages=-1`` (every stage
  trains and its norms gather statistics, as ``configs/mask_rcnn_mabn.py`` and
  ``mask_rcnn_brn_scratch.py``); ``norm_eval=False`` in any other component
  that has the argument (a shared ResLayer head). MABN's ``buffer_size`` spans
  32 images at the base's batch size per GPU (16 steps x 2 images,
  ``configs/mask_rcnn_mabn.py``; 32 x 1 in ``mask_rcnn_mabn_1img.py``). CBN
  burns in for 2/3 of the schedule, ``burnin_epochs`` with ``CBNBurninHook``
  on an epoch-based schedule (8 of 12 epochs, ``configs/mask_rcnn_cbn_1x.py``),
  ``burnin`` in iterations otherwise.
* GN (only with ``conv='WSConv'``, MMDetection's GN + WS): 32 groups; it keeps
  no statistics, so ``norm_eval`` and ``frozen_stages`` stay as the base has
  them (``configs/mask_rcnn_gnws_2x.py``).

The conv (``--conv``) goes where the norm goes.

:func:`read_config` reads a config as the tool does; what mmengine raises
while reading one becomes a :class:`ConfigReadError` whose message is one line,
``FILE: WHAT (key ..., what to do)`` (:func:`config_error_line`).
"""
import ast
import copy
import difflib
import glob
import inspect
import keyword
import os
import os.path as osp
import re
import warnings
from typing import Any, NamedTuple, Optional

from .config import require_pkg_resources
from .config_check import ConfigError

__all__ = ['ConfigReadError', 'NormConfigError', 'Row', 'check_names', 'check_written',
           'config_error_line', 'config_text', 'format_table', 'norm_choices', 'norm_config',
           'read_config', 'resolve_config_path']

#: The window MABN's moving averages span, in images (the paper's 16 steps x 2 images).
MABN_WINDOW_IMAGES = 32
#: The part of the schedule CBN burns in for (the paper's 8 of 12 epochs).
CBN_BURNIN_FRACTION = 2 / 3
#: The box head of the MABN paper's setting, for a box head with no conv.
PAPER_BBOX_HEAD = 'Shared4Conv1FCBBoxHead'
#: GN's groups (MMDetection's GN and GN + WS configs).
GN_GROUPS = 32
#: Keys of a model component that hold no component to walk into.
SKIP_KEYS = {'train_cfg', 'test_cfg', 'init_cfg', 'data_preprocessor', 'norm_cfg', 'conv_cfg',
             'act_cfg', 'dcn', 'plugins'}
#: Norm types MMDetection's configs write for batch and group norms (mmcv's names).
BATCH_OR_GROUP_NORMS = {'BN', 'BN1d', 'BN2d', 'BN3d', 'SyncBN', 'MMSyncBN', 'naiveSyncBN',
                        'GN'}


class ConfigReadError(ConfigError):
    """mmengine could not read a config; the message is one line,
    ``FILE: WHAT (key ..., what to do)``."""


class NormConfigError(ConfigError):
    """A norm, conv or placement that cannot be: an unknown name, GN without
    WSConv, a component the norm cannot be built in."""


class Row(NamedTuple):
    """One decision: ``key`` (a key path, ``model.roi_head.bbox_head[0].norm_cfg``),
    ``before`` and ``after`` as shown in the table; ``changed`` is False for
    a left-alone row (``after`` then reads ``left alone: WHY``); ``value`` is
    the new value of ``key`` (changed ``model.`` rows); ``module`` is the
    path of the component in the built model (``roi_head.bbox_head.0``) for
    norm_cfg rows and left-alone components."""
    key: str
    before: str
    after: str
    changed: bool = True
    value: Any = None
    module: Optional[str] = None


# --------------------------------------------------------------------------
# Reading a config, and mmengine's errors in one line


def resolve_config_path(path):
    """The file of config ``path`` (``mmdet::FOLDER/NAME.py`` or a file path);
    raise ConfigReadError when there is none."""
    from mmengine.config import Config
    if '::' in path:
        try:
            file, _ = Config._get_cfg_path(path, '')
        except Exception as error:  # mmengine: ValueError, FileNotFoundError, ModuleNotFoundError
            raise ConfigReadError(_missing_line(path, path, None, error)) from error
        if not osp.isfile(file):
            raise ConfigReadError(_missing_line(path, path, None, None))
        return file
    if not osp.isfile(path):
        raise ConfigReadError(_missing_line(path, path, None, None))
    return path


def read_config(path):
    """``Config.fromfile`` of ``path`` (``mmdet::`` paths too), after the
    ``pkg_resources`` check; raise ConfigReadError with one line for what
    mmengine raises while reading it."""
    from mmengine.config import Config
    require_pkg_resources()
    file = resolve_config_path(path)
    try:
        return Config.fromfile(file)
    except Exception as error:
        raise ConfigReadError(config_error_line(error, file)) from error


def config_error_line(error, path):
    """One line, ``FILE: WHAT (key ..., what to do)``, for ``error``, raised by
    mmengine while reading the config file ``path``. FILE is the file of the
    config or of its bases where the mistake is: a base merged into as a dict
    where it holds a list (``TypeError``), a missing base file, a syntax error;
    anything else is named with its type and first line."""
    if isinstance(error, SyntaxError):
        for file in _config_tree(path):
            try:
                with open(file, encoding='utf-8') as f:
                    ast.parse(f.read(), filename=file)
            except SyntaxError as found:
                return (f'{file}: syntax error at line {found.lineno}: {found.msg} '
                        f'(fix the Python on that line)')
            except OSError:
                continue
        return f'{path}: syntax error: {error.msg} (fix the Python of the config)'
    if isinstance(error, (FileNotFoundError, ModuleNotFoundError, ValueError)):
        missing = _missing_base(path)
        if missing is not None:
            return missing
    if isinstance(error, TypeError):
        merge = _MERGE_ERROR.search(str(error))
        if merge:
            return _merge_line(path, merge.group(2), merge.group(3))
    first = (str(error).strip().splitlines() or [''])[0]
    return f'{path}: {type(error).__name__}: {first} (run with --debug for the traceback)'


_MERGE_ERROR = re.compile(r"(\S+)=.* in child config cannot inherit from base because (\S+) is "
                          r"a dict in the child config but is of type <class '(\w+)'> in base")


def _base_names(file):
    """The ``_base_`` entries of config ``file`` as written (none if it does not parse)."""
    try:
        with open(file, encoding='utf-8') as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == '_base_' for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return []
            return [value] if isinstance(value, str) else list(value)
    return []


def _resolve_base(name, file):
    """The file base ``name`` of config ``file`` points at, or None where
    mmengine cannot resolve it."""
    from mmengine.config import Config
    try:
        return osp.normpath(Config._get_cfg_path(name, file)[0])
    except Exception:
        return None


def _config_tree(path):
    """``path`` and the files of its bases, depth first, each once."""
    seen, todo = [], [path]
    while todo:
        file = todo.pop(0)
        if file in seen or not osp.isfile(file):
            continue
        seen.append(file)
        todo[:0] = [base for base in (_resolve_base(n, file) for n in _base_names(file)) if base]
    return seen


def _missing_line(where, name, file, error):
    """The line for config ``name`` that is not there: a base named in
    ``file``, or (``file`` None) the config asked for."""
    what = f'base config {name} does not exist' if file else 'no such config'
    if '::' in name:
        package, _, rest = name.partition('::')
        hint = f"give a config of {package}'s configs folder, e.g. '{package}::mask_rcnn/" \
               "mask-rcnn_r50_fpn_1x_coco.py'"
        if error is not None and not isinstance(error, FileNotFoundError):
            what += f' ({str(error).splitlines()[0]})'
        looked = None
        try:
            from mmengine.utils import get_installed_path
            looked = osp.join(get_installed_path(package), '.mim', 'configs', rest)
        except Exception:
            pass
    else:
        folder = osp.dirname(osp.abspath(file)) if file else os.getcwd()
        looked = osp.normpath(osp.join(folder, name))
        hint = f'give a path relative to {folder}' if file else \
            "give a config file or 'mmdet::FOLDER/NAME.py'"
    did = ''
    if looked:
        names = [osp.basename(c) for c in glob.glob(osp.join(osp.dirname(looked), '*.py'))]
        close = difflib.get_close_matches(osp.basename(looked), names, n=2, cutoff=0.75)
        shown = [name.rsplit('/', 1)[0] + '/' + c if '/' in name else c for c in close]
        did = f'; did you mean {" or ".join(shown)}?' if shown else ''
    key = 'key _base_, ' if file else ''
    looked_for = f'looked for {looked}{did}; ' if looked else ''
    return f'{where}: {what} ({key}{looked_for}{hint})'


def _missing_base(path):
    """The line for the first base in ``path``'s tree that is not there, or None."""
    for file in _config_tree(path):
        for name in _base_names(file):
            try:
                from mmengine.config import Config
                base = Config._get_cfg_path(name, file)[0]
                error = None
            except Exception as raised:
                base, error = None, raised
            if base is None or not osp.isfile(base):
                return _missing_line(file, name, file, error)
    return None


def _merge_line(path, key, base_type):
    """The line for a dict written over a ``base_type`` (a list) at ``key``:
    in which file, at which key path of the base."""
    from mmengine.config import Config
    file = _merge_culprit(path)
    where, count = key, None
    for base in (_resolve_base(n, file) for n in _base_names(file)):
        try:
            found = _find_key(Config.fromfile(base).to_dict(), key, base_type)
        except Exception:
            continue
        if found:
            where, count = found
            break
    entries = f' of {count}' if count is not None else ''
    names = _base_names(file)
    base = names[0] if len(names) == 1 else 'BASE_CONFIG'
    return (f'{file}: {key} is a {base_type}{entries} in the base config and a dict here: '
            f'mmengine cannot merge a dict into a {base_type} (key {where}; write the whole '
            f'{base_type} with every entry, or generate the config with '
            f'tools/norm_config.py {base} --norm NORM)')


def _merge_culprit(path):
    """The file of ``path``'s tree whose own merge fails: the deepest one whose
    bases all read."""
    from mmengine.config import Config
    for base in (_resolve_base(n, path) for n in _base_names(path)):
        if base is None:
            continue
        try:
            Config.fromfile(base)
        except TypeError:
            return _merge_culprit(base)
        except Exception:
            continue
    return path


def _find_key(node, key, type_name, where=''):
    """(key path, length) of the first ``key`` under ``node`` holding a
    value of type ``type_name``."""
    if isinstance(node, dict):
        for k, v in node.items():
            path = f'{where}.{k}' if where else k
            if k == key and type(v).__name__ == type_name:
                return path, len(v) if hasattr(v, '__len__') else None
            found = _find_key(v, key, type_name, path)
            if found:
                return found
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            found = _find_key(v, key, type_name, f'{where}[{i}]')
            if found:
                return found
    return None


# --------------------------------------------------------------------------
# The norm and the conv


def norm_choices():
    """The allowed ``norm`` names: the registered norms and GN (with WSConv)."""
    from ..layers import norm_types
    return sorted(norm_types()) + ['GN']


def _canonical(name, names, what, hint=''):
    if name in names:
        return name
    folded = {n.lower(): n for n in names}
    if name.lower() in folded:
        return folded[name.lower()]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5) or \
        [folded[c] for c in difflib.get_close_matches(name.lower(), list(folded), n=1, cutoff=0.5)]
    did = f' (did you mean {close[0]!r}?)' if close else ''
    raise NormConfigError(f'{what} {name!r} is not one of {", ".join(names)}{did}{hint}')


def check_names(norm, conv=None):
    """(norm, conv) in their registered spelling (case is forgiven); raise
    NormConfigError for a name that is not registered (naming the closest
    and all that are) and for GN without WSConv."""
    from ..layers import conv_types
    norm = _canonical(norm, norm_choices(), '--norm', '; GN goes with --conv WSConv')
    if conv is not None:
        conv = _canonical(conv, sorted(conv_types()), '--conv')
    if norm == 'GN' and conv != 'WSConv':
        raise NormConfigError('--norm GN needs --conv WSConv (GN + weight standardization, '
                              'as configs/mask_rcnn_gnws_2x.py); for GN alone MMDetection has '
                              'its own configs (mmdet::gn/...)')
    return norm, conv


def _layer_classes(norm, conv):
    """(norm name, norm class, conv name or None, conv class or None), the
    names checked (:func:`check_names`)."""
    from torch import nn

    from ..layers import conv_types, norm_types
    norm, conv = check_names(norm, conv)
    norm_cls = nn.GroupNorm if norm == 'GN' else norm_types()[norm]
    return norm, norm_cls, conv, conv_types()[conv] if conv else None


def _batch_size(cfg):
    try:
        return int(cfg.train_dataloader.batch_size)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _schedule(cfg):
    """('epochs' | 'iters', length) of the base's training loop, or None."""
    loop = cfg.get('train_cfg') or {}
    if loop.get('max_epochs') and 'Iter' not in str(loop.get('type', '')):
        return 'epochs', int(loop['max_epochs'])
    if loop.get('max_iters'):
        return 'iters', int(loop['max_iters'])
    return None


def _norm_dict(norm, cfg, rows):
    """The norm's cfg for this config, with a row for each option chosen from it."""
    layer = dict(type=norm)
    if norm == 'MABN':
        batch = _batch_size(cfg)
        if batch:
            size = max(1, round(MABN_WINDOW_IMAGES / batch))
            layer['buffer_size'] = size
            rows.append(Row('norm.buffer_size', '-', f'{size}: {size} steps x {batch} images '
                            f'per GPU = the MABN paper\'s {MABN_WINDOW_IMAGES}-image window'))
    elif norm == 'CBN':
        schedule = _schedule(cfg)
        layer['buffer_num'] = 3
        if schedule is not None:
            unit, length = schedule
            burnin = round(length * CBN_BURNIN_FRACTION)
            layer['burnin_epochs' if unit == 'epochs' else 'burnin'] = burnin
            rows.append(Row(f'norm.{"burnin_epochs" if unit == "epochs" else "burnin"}', '-',
                            f'{burnin}: 2/3 of the base\'s {length} {unit[:-1]} schedule, as '
                            f'the CBN paper\'s 8 of 12 epochs'))
    elif norm == 'GN':
        layer['num_groups'] = GN_GROUPS
    layer['requires_grad'] = True
    return layer


# --------------------------------------------------------------------------
# Classes and their arguments


def _registry():
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    return MODELS


def _signature_args(cls):
    """name -> default (inspect.Parameter.empty where none) of the keyword
    arguments ``cls`` takes, following ``**kwargs`` to its bases."""
    from torch import nn
    args = {}
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        if '__init__' not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in args:
                args[p.name] = p.default
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return args


def _module_class(registry, type_name):
    from torch import nn
    try:
        cls = registry.get(type_name) if isinstance(type_name, str) else type_name
    except Exception:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


def _is_part(name):
    return name in ('backbone', 'neck') or name.endswith(('head', 'neck'))


def _describe(value, default=False):
    """A norm or conv cfg as the table shows it."""
    if value is None or value is inspect.Parameter.empty:
        text = '-'
    elif isinstance(value, dict):
        options = {k: v for k, v in value.items() if k not in ('type', '_delete_')}
        if options.get('requires_grad') is True:
            options.pop('requires_grad')
        inner = ', '.join(f'{k}={v!r}' for k, v in options.items())
        text = f'{value.get("type")}({inner})' if inner else str(value.get('type'))
    else:
        text = repr(value)
    return f'{text} (class default)' if default and text != '-' else text


def _norm_kind(value):
    """'batch' for a batch or group norm cfg (mmcv's BN/SyncBN/GN, mmnorm's),
    None for none, else the type name."""
    if not isinstance(value, dict):
        return None
    name = value.get('type')
    if name in BATCH_OR_GROUP_NORMS:
        return 'batch'
    from mmengine.registry import MODELS as ROOT
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm
    cls = ROOT.get(name) if isinstance(name, str) else name
    if isinstance(cls, type) and issubclass(cls, (_BatchNorm, nn.GroupNorm)):
        return 'batch'
    return str(name)


def _module_path(key):
    """``model.roi_head.bbox_head[0]`` -> ``roi_head.bbox_head.0``."""
    return re.sub(r'\[(\d+)\]', r'.\1', key).removeprefix('model').lstrip('.')


# --------------------------------------------------------------------------
# The walk


class _Plan:
    def __init__(self, cfg, norm, conv, everywhere):
        self.registry = _registry()
        self.norm, self.norm_cls, self.conv, self.conv_cls = _layer_classes(norm, conv)
        self.everywhere = everywhere
        self.small_batch = self.norm != 'GN'
        self.rows = []
        self.layer_rows = []
        self.norm_dict = _norm_dict(self.norm, cfg, self.layer_rows)
        self.conv_dict = dict(type=self.conv) if self.conv else None
        self.base = cfg.to_dict()
        self.model = copy.deepcopy(self.base['model'])

    # -- walking
    def walk(self, node, key, name, parent=None):
        """Decide for the component ``node`` at ``key`` (``name``: its key in
        its parent; ``parent``: the parent component's (cfg, class))."""
        if isinstance(node, (list, tuple)):
            for i, item in enumerate(node):
                self.walk(item, f'{key}[{i}]', name)
            return
        if not isinstance(node, dict):
            return
        type_name = node.get('type')
        cls = _module_class(self.registry, type_name) if type_name is not None else None
        if cls is not None and 'norm_cfg' in _signature_args(cls):
            self.component(node, key, cls, self._copies(name, parent))
            return
        children = [(k, v) for k, v in node.items() if k not in SKIP_KEYS
                    and not k.startswith('loss') and isinstance(v, (dict, list, tuple))]
        if type_name is not None and _is_part(name) and not self._has_part(node):
            why = f'{type_name} is not registered in mmdet\'s MODELS (is its package imported?)' \
                if cls is None else f'{cls.__name__} takes no norm_cfg'
            self.rows.append(Row(key, str(type_name), f'left alone: {why}', False,
                                 module=_module_path(key)))
            return
        for k, v in children:
            self.walk(v, f'{key}.{k}', k, (node, cls) if cls is not None else None)

    @staticmethod
    def _copies(name, parent):
        """How many copies of a head given as one dict its parent builds: a
        cascade RoI head builds one per stage."""
        if parent is None or name not in ('bbox_head', 'mask_head'):
            return 1
        from mmdet.models.roi_heads import CascadeRoIHead
        node, cls = parent
        if issubclass(cls, CascadeRoIHead) and isinstance(node.get(name), dict):
            return int(node.get('num_stages', 1))
        return 1

    def _has_part(self, node):
        for k, v in node.items():
            if k in SKIP_KEYS or k.startswith('loss'):
                continue
            items = v if isinstance(v, (list, tuple)) else [v]
            if any(isinstance(i, dict) and 'type' in i and _is_part(k) for i in items):
                return True
        return False

    # -- one component that takes a norm_cfg
    def component(self, node, key, cls, copies=1):
        args = _signature_args(cls)
        module = _module_path(key)
        default = 'norm_cfg' not in node
        base_norm = node['norm_cfg'] if not default else args['norm_cfg']
        if base_norm is inspect.Parameter.empty:
            base_norm = None
        before = _describe(base_norm, default)
        kind = _norm_kind(base_norm)
        norm_key = f'{key}.norm_cfg'
        if kind not in (None, 'batch'):
            self._leave(norm_key, before, f'{kind} is not a batch or group norm', module)
            return
        if kind is None and not self.everywhere:
            self._leave(norm_key, before, 'no norm in the base (--everywhere adds one)', module)
            return
        new = dict(node, norm_cfg=copy.deepcopy(self.norm_dict))
        if self.conv and 'conv_cfg' in args:
            new['conv_cfg'] = copy.deepcopy(self.conv_dict)
        counts = self._trial(new, norm_key)
        type_row = None
        if counts[0] == 0:
            from mmdet.models.roi_heads.bbox_heads import ConvFCBBoxHead
            if self.everywhere and issubclass(cls, ConvFCBBoxHead):
                new['type'] = PAPER_BBOX_HEAD
                counts = self._trial(new, norm_key)
                type_row = Row(f'{key}.type', cls.__name__,
                               f'{PAPER_BBOX_HEAD}: the MABN paper\'s 4-conv + 1-fc box head '
                               f'({cls.__name__} has no conv to normalise)', value=PAPER_BBOX_HEAD)
            if counts[0] == 0:
                self._leave(norm_key, before, f'{cls.__name__} builds no norm layer from its '
                            f'norm_cfg here (no conv to normalise)', module)
                return
        if type_row:
            self.rows.append(type_row)
        norms, convs, others = (n * copies for n in counts)
        each = f': {counts[0]} in each of the {copies} stages' if copies > 1 else ''
        stay = f'; {others} other norm layer(s) not built from norm_cfg stay' if others else ''
        self.rows.append(Row(norm_key, before, f'{self.norm} ({norms} layers{each}{stay})',
                             value=new['norm_cfg'], module=module))
        if self.conv:
            if 'conv_cfg' in args:
                base_conv = node.get('conv_cfg', args['conv_cfg'])
                self.rows.append(Row(f'{key}.conv_cfg',
                                     _describe(base_conv, 'conv_cfg' not in node),
                                     f'{self.conv} ({convs} convs)', value=new['conv_cfg']))
            else:
                self._leave(f'{key}.conv_cfg', '-', f'{cls.__name__} takes no conv_cfg')
        if self.small_batch and 'norm_eval' in args:
            current = node.get('norm_eval', args['norm_eval'])
            if current is not False:
                new['norm_eval'] = False
                self.rows.append(Row(f'{key}.norm_eval',
                                     _describe(current, 'norm_eval' not in node),
                                     'False: the norms gather statistics while training',
                                     value=False))
        if key == 'model.backbone' and 'frozen_stages' in args:
            current = node.get('frozen_stages', args['frozen_stages'])
            before_fs = _describe(current, 'frozen_stages' not in node)
            if self.small_batch and current != -1:
                new['frozen_stages'] = -1
                self.rows.append(Row(f'{key}.frozen_stages', before_fs,
                                     '-1: every stage trains, as the project\'s MABN and BRN '
                                     'configs', value=-1))
            elif not self.small_batch and current not in (-1, None):
                self._leave(f'{key}.frozen_stages', before_fs,
                            'GN keeps no statistics (MMDetection\'s GN + WS configs keep it)')
        if key == 'model.backbone' and self.conv and isinstance(node.get('init_cfg'), dict) \
                and node['init_cfg'].get('checkpoint'):
            self._leave(f'{key}.init_cfg', f'Pretrained {node["init_cfg"]["checkpoint"]}',
                        f'its weights load into the new layers and {self.conv} transforms the conv '
                        f'weights; '
                        f'the project\'s configs start from scratch (init_cfg=None) or from '
                        f'an ImageNet checkpoint with the same layers')
        node.clear()
        node.update(new)

    def _leave(self, key, before, why, module=None):
        self.rows.append(Row(key, before, f'left alone: {why}', False, module=module))

    def _trial(self, cfg, key):
        """(norm layers of the requested class, convs of the requested class,
        other batch/group norm layers) of the component built from ``cfg``."""
        from torch import nn
        from torch.nn.modules.batchnorm import _BatchNorm
        try:
            with warnings.catch_warnings():  # what the heads' losses say when built
                warnings.simplefilter('ignore')
                built = self.registry.build(copy.deepcopy(cfg))
        except Exception as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise NormConfigError(f'{key}: {self.norm} cannot be built there: {first}') from error
        modules = list(built.modules())
        norms = sum(isinstance(m, self.norm_cls) for m in modules)
        others = sum(isinstance(m, (_BatchNorm, nn.GroupNorm)) and not isinstance(m, self.norm_cls)
                     for m in modules)
        convs = sum(isinstance(m, self.conv_cls) for m in modules) if self.conv_cls else 0
        return norms, convs, others

    # -- hooks the method needs
    def hooks(self):
        if self.norm != 'CBN' or 'burnin_epochs' not in self.norm_dict:
            return {}
        hooks = list(self.base.get('custom_hooks') or [])
        if any(isinstance(h, dict) and h.get('type') == 'CBNBurninHook' for h in hooks):
            return {}
        new = copy.deepcopy(hooks) + [dict(type='CBNBurninHook')]
        self.rows.append(Row('custom_hooks', _describe_hooks(hooks), _describe_hooks(new) +
                             ': converts burnin_epochs into iterations', value=new))
        return {'custom_hooks': new}


def _describe_hooks(hooks):
    return '[' + ', '.join(str(h.get('type')) for h in hooks) + ']' if hooks else '-'


def _delta(base, new):
    """What to write over ``base`` to get ``new`` with mmengine's merge:
    differing keys only, dicts merged key by key, lists and tuples whole; a
    norm_cfg or conv_cfg, or a dict whose type changes and which would keep
    keys of the base, whole, with ``_delete_`` where the base has keys it lacks."""
    out = {}
    for key, value in new.items():
        old = base.get(key, _MISSING) if isinstance(base, dict) else _MISSING
        if _same(old, value):
            continue
        if isinstance(value, dict) and isinstance(old, dict):
            whole = key in ('norm_cfg', 'conv_cfg') or (
                value.get('type') != old.get('type') and not set(old) <= set(value))
            if whole:
                out[key] = dict(value, _delete_=True) if not set(old) <= set(value) else \
                    copy.deepcopy(value)
            else:
                out[key] = _delta(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_MISSING = object()


def _same(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def norm_config(cfg, norm, conv=None, everywhere=False):
    """Put ``norm`` (a registered norm's name, or 'GN' with ``conv='WSConv'``)
    and ``conv`` (a registered conv's name) into the model of ``cfg`` (a
    read ``Config``, or a config path, ``mmdet::`` ones too).

    Returns ``(overrides, rows)``: ``overrides``, the dict to write over the
    base (``model`` and, for CBN on an epoch schedule, ``custom_hooks``; lists
    whole, ``_delete_`` only where a dict must lose keys of the base), with
    ``norm`` and ``conv`` (the layer cfgs) at its top; ``rows``, one
    :class:`Row` per decision, the left-alone ones with their reason. Raises
    NormConfigError for an unknown name, GN without WSConv, or a component
    the norm cannot be built in; ConfigReadError when a path cannot be read.
    """
    from mmengine.config import Config
    if isinstance(cfg, (str, os.PathLike)):
        cfg = read_config(str(cfg))
    elif not isinstance(cfg, Config):
        cfg = Config(copy.deepcopy(dict(cfg)))
    plan = _Plan(cfg, norm, conv, everywhere)
    plan.walk(plan.model, 'model', 'model')
    hooks = plan.hooks()
    overrides = {'norm': plan.norm_dict}
    if plan.conv_dict:
        overrides['conv'] = plan.conv_dict
    model = _delta(plan.base['model'], plan.model)
    if model:
        overrides['model'] = model
    overrides.update(hooks)
    rows = ([Row('norm', '-', _py(plan.norm_dict))] +
            ([Row('conv', '-', _py(plan.conv_dict))] if plan.conv_dict else []) +
            plan.layer_rows + plan.rows)
    return overrides, rows


# --------------------------------------------------------------------------
# Writing


class _Name:
    def __init__(self, text):
        self.text = text


def _py(value, indent=0, used=0, width=95):
    """``value`` as Python source, dicts as ``dict(...)``; a value that does
    not fit on its line (``indent`` spaces and ``used`` characters before it)
    is broken into one item per line, 4 spaces further in."""
    one = _py_line(value)
    if indent + used + len(one) <= width or not isinstance(value, (dict, list, tuple)) \
            or not value:
        return one
    pad = ' ' * (indent + 4)
    if isinstance(value, dict):
        if _identifier_keys(value):
            items = [f'{k}={_py(v, indent + 4, len(k) + 1, width)}' for k, v in value.items()]
            return 'dict(\n' + ',\n'.join(pad + i for i in items) + ')'
        items = [f'{k!r}: {_py(v, indent + 4, len(repr(k)) + 2, width)}' for k, v in value.items()]
        return '{\n' + ',\n'.join(pad + i for i in items) + '}'
    items = [_py(v, indent + 4, 0, width) for v in value]
    if isinstance(value, list):
        open_, close = '[', ']'
    else:
        open_, close = '(', ',)' if len(value) == 1 else ')'
    return open_ + '\n' + ',\n'.join(pad + i for i in items) + close


def _identifier_keys(value):
    return all(isinstance(k, str) and k.isidentifier() and not keyword.iskeyword(k)
               for k in value)


def _py_line(value):
    if isinstance(value, _Name):
        return value.text
    if isinstance(value, dict):
        if _identifier_keys(value):
            return 'dict(' + ', '.join(f'{k}={_py_line(v)}' for k, v in value.items()) + ')'
        return '{' + ', '.join(f'{k!r}: {_py_line(v)}' for k, v in value.items()) + '}'
    if isinstance(value, list):
        return '[' + ', '.join(_py_line(v) for v in value) + ']'
    if isinstance(value, tuple):
        inner = ', '.join(_py_line(v) for v in value)
        return f'({inner},)' if len(value) == 1 else f'({inner})'
    return repr(value)


def _named(node, layers):
    """``node`` with each norm_cfg / conv_cfg equal to a layer cfg of
    ``layers`` (name -> cfg) written as that name."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            for name, layer in layers.items():
                if key in ('norm_cfg', 'conv_cfg') and isinstance(value, dict):
                    if value == layer:
                        value = _Name(name)
                        break
                    if value == dict(layer, _delete_=True):
                        value = _Name(f'dict({name}, _delete_=True)')
                        break
            out[key] = value if isinstance(value, _Name) else _named(value, layers)
        return out
    if isinstance(node, list):
        return [_named(v, layers) for v in node]
    if isinstance(node, tuple):
        return tuple(_named(v, layers) for v in node)
    return node


def config_text(base, overrides, rows=(), command=None, base_keys=()):
    """The text of a config file that inherits ``base`` (what ``_base_``
    says: ``mmdet::...`` or a path) and writes ``overrides`` (from
    :func:`norm_config`), with ``custom_imports`` for mmnorm; ``rows`` go
    into its header as comments. The layer cfgs are written once, as
    variables (``norm``, ``conv``; ``mmnorm_norm``... where the base has a
    key of that name, listed in ``base_keys``)."""
    overrides = dict(overrides)
    layers = {}
    for name in ('norm', 'conv'):
        if name in overrides:
            var = name if name not in base_keys else f'mmnorm_{name}'
            layers[var] = overrides.pop(name)
    lines = ['# Generated by tools/norm_config.py' + (f': {command}' if command else '') + '.']
    if rows:
        lines.append('#')
        lines += ['# ' + line for line in format_table(rows).splitlines()]
    lines += ['', f'_base_ = {base!r}',
              "custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)", '']
    for var, layer in layers.items():
        lines.append(f'{var} = {_py(layer, 0, len(var) + 3)}')
    named = _named(overrides, layers)
    for key, value in named.items():
        lines.append(f'{key} = {_py(value, 0, len(key) + 3)}')
    return '\n'.join(lines) + '\n'


def format_table(rows):
    """``rows`` as a text table: key | before | after."""
    header = Row('key', 'before', 'after')
    kw = max(len(r.key) for r in [header, *rows])
    bw = min(max(len(r.before) for r in [header, *rows]), 40)
    lines = [f'{r.key:<{kw}} | {r.before:<{bw}} | {r.after}' for r in [header, *rows]]
    lines.insert(1, f'{"-" * kw}-+-{"-" * bw}-+-{"-" * 5}')
    return '\n'.join(lines)


def _get(node, key):
    for part in re.findall(r'[^.\[\]]+|\[\d+\]', key):
        node = node[int(part[1:-1])] if part.startswith('[') else node[part]
    return node


def check_written(path, rows):
    """Read the written config ``path`` and raise RuntimeError unless every
    changed ``model.`` and ``custom_hooks`` row's key holds the row's value."""
    cfg = read_config(str(path)).to_dict()
    for row in rows:
        if not row.changed or not row.key.startswith(('model.', 'custom_hooks')):
            continue
        got = _get(cfg, row.key)
        if not _same(_plain(got), _plain(row.value)):
            raise RuntimeError(f'{path}: {row.key} reads {got!r}, not {row.value!r} as intended '
                               '(a bug of mmnorm.engine.norm_config)')
    return cfg


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
