"""Checkpoint conversion into this project's MMDetection models, with a report
that accounts for every key.

Three source layouts (``LAYOUTS``):

``torchvision``
    torchvision's ImageNet ResNet (``torchvision://resnet50``) into a ResNet
    with MABN, BRN or CBN. Names and convs load as they are; BRN and CBN keep
    BatchNorm's buffers (CBN adds an empty history). MABN has no running_mean
    and its running_var is a second moment (Yan et al., "Towards Stabilizing
    Batch Statistics in Backward Propagation of Batch Normalization", ICLR
    2020; docs/mabn.md); per channel, with BN's weight w, bias b, mean m,
    variance v, eps 1e-5 and MABN's eps e::

        running_var' = v + m^2
        weight'      = w * sqrt(running_var' + e) / sqrt(v + eps)
        bias'        = b - w * m / sqrt(v + eps)

    so MABN's inference equals BN's for every x with plain convs; with
    CenConv the function is not kept (the report says so).

``mabn-detection``
    The MABN authors' Mask R-CNN (github.com/megvii-model/MABN, ``det/``, on
    maskrcnn-benchmark) into ``configs/mask_rcnn_mabn.py``: keys renamed,
    class rows reordered (background last), MABN buffers converted by
    :meth:`mmnorm.MABN.convert_state`.

``mabn-imagenet``
    The authors' ImageNet MABN ResNet-50 (``cls/``) into the backbone of
    ``configs/mask_rcnn_mabn_imagenet.py`` (MABN + CenConv); ``fc`` is not
    used and the MABN window starts empty.

See docs/checkpoint_conversion.md for the full key map, the class-row
rotation, the buffers of each MABN2d variant, and the sources read (and the
assumptions made) for the names and shapes.
"""
import copy
import pickle
import re
from collections import Counter, namedtuple
from collections.abc import Mapping
from pathlib import Path

import torch

from .._torch import CAN_ALLOW_CLASSES
from ..engine.checkpoint_check import checkpoint_problem
from ..layers import MABN, CenConv, norm_types
from ..layers.base import SmallBatchNorm
from ..layers.mabn import bn_to_mabn

__all__ = ['LAYOUTS', 'ConversionError', 'ConversionReport', 'build_target',
           'build_with_mmdet', 'convert_checkpoint', 'convert_state_dict', 'read_source']

LAYOUTS = ('torchvision', 'mabn-detection', 'mabn-imagenet')
CONFIG_DIR = Path(__file__).resolve().parents[2] / 'configs'
DEFAULT_CONFIGS = {'mabn-detection': CONFIG_DIR / 'mask_rcnn_mabn.py',
                   'mabn-imagenet': CONFIG_DIR / 'mask_rcnn_mabn_imagenet.py'}
TORCHVISION_BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, used by torchvision's ResNet

LOADED, CONVERTED, NOT_USED = 'loaded', 'converted', 'not used'


class ConversionError(ValueError):
    """A source checkpoint or target that cannot be converted; the message
    names the layout and the key."""


# --------------------------------------------------------------------- report
Entry = namedtuple('Entry', 'status target how')


class ConversionReport:
    """What happened to every source key, plus the target keys that had no
    source key and the notes that concern the whole conversion.

    ``entries``: source key -> Entry(status, target key or None, how);
    status is 'loaded' (value as is, under ``target``), 'converted' (``how``
    says how) or 'not used' (``how`` says why).
    ``unsourced``: target key -> how it was filled.
    """

    def __init__(self, layout, source, target):
        self.layout, self.source, self.target = layout, source, target
        self.entries = {}
        self.unsourced = {}
        self.notes = []

    def record(self, key, status, target, how=''):
        self.entries[key] = Entry(status, target, how)

    def amend(self, key, status, target, how):
        """Record a later step on ``key``; a second conversion adds its text."""
        old = self.entries[key]
        if old.status == CONVERTED and old.how and status == CONVERTED:
            how = f'{old.how}; then {how}'
        self.entries[key] = Entry(status, target, how)

    def format(self):
        """The report as text: one line per source key, then the target keys
        without a source key, then the notes. An explanation shared by
        several keys is printed once, under "Explanations", and referred to
        as [n]."""
        hows = Counter(e.how for e in self.entries.values())
        hows.update(self.unsourced.values())
        refs = {}

        def explain(how):
            if hows[how] < 2 or len(how) < 60:
                return how
            refs.setdefault(how, len(refs) + 1)
            return f'[{refs[how]}]'

        counts = Counter(entry.status for entry in self.entries.values())
        lines = [f'Converted {self.source} ({self.layout} layout) into {self.target}.',
                 f'{len(self.entries)} source keys: ' + ', '.join(
                     f'{counts[s]} {s}' for s in (LOADED, CONVERTED, NOT_USED)) +
                 f'; {len(self.unsourced)} target keys without a source key.', '',
                 'Source keys:']
        for key, (status, target, how) in self.entries.items():
            text = f'  {status:<9} {key}'
            if target is not None and (target != key or status != LOADED):
                text += f' -> {target}'
            lines.append(text + (f': {explain(how)}' if how else ''))
        if self.unsourced:
            lines += ['', 'Target keys without a source key:']
            lines += [f'  {key}: {explain(how)}' for key, how in self.unsourced.items()]
        if refs:
            lines += ['', 'Explanations:'] + [f'  [{n}] {how}' for how, n in refs.items()]
        if self.notes:
            lines += ['', 'Notes:'] + [f'  - {note}' for note in self.notes]
        return '\n'.join(lines)


# --------------------------------------------------------------------- source
def _load_weights_only(path):
    """``torch.load(weights_only=True)``, with ``collections.Counter`` allowed
    where torch can allow a class for one call (``safe_globals``, torch >=
    2.5); older torch refuses a file that holds one (the caller says so)."""
    if not CAN_ALLOW_CLASSES:
        return torch.load(path, map_location='cpu', weights_only=True)
    with torch.serialization.safe_globals([Counter]):
        return torch.load(path, map_location='cpu', weights_only=True)


def read_source(path, trust=False):
    """(state dict, notes) of the checkpoint file ``path``.

    Loaded with ``torch.load(weights_only=True)`` (``collections.Counter``
    allowed from torch 2.5 on: the authors' classification checkpoints store a
    MultiStepLR state); only with ``trust`` does a file that needs more get
    unpickled in full. The weights are the ``'model'`` entry (maskrcnn-benchmark, the
    authors' classification code), the ``'state_dict'`` entry (mmengine) or
    the file itself; a ``module.`` prefix on every key is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f'source checkpoint {path} does not exist')
    problem = checkpoint_problem(str(path), unpickle_legacy=False)
    if problem is not None:
        raise ConversionError(f'source checkpoint {path} cannot be used: {problem}')
    try:
        loaded = _load_weights_only(path)
    except pickle.UnpicklingError as err:
        if not trust:
            reason = str(err).strip().splitlines()[0]
            if 'collections.Counter' in reason and not CAN_ALLOW_CLASSES:
                reason += '; torch < 2.5 cannot allow it in weights-only loading'
            raise ConversionError(
                f'{path}: torch.load(weights_only=True) refused the file ({reason}); if you '
                'trust it, pass trust=True (--trust) to unpickle it in full') from err
        loaded = torch.load(path, map_location='cpu', weights_only=False)
    notes = []
    state = loaded
    for entry in ('model', 'state_dict'):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(entry), Mapping):
            state = loaded[entry]
            others = sorted(str(k) for k in loaded if k != entry)
            notes.append(f"weights read from the file's '{entry}' entry" +
                         (f"; its other entries ({', '.join(others)}) are not weights and are "
                          'not used' if others else ''))
            break
    if not isinstance(state, Mapping) or not state:
        raise ConversionError(f'{path}: expected a state dict (a mapping of names to tensors), '
                              f'got {type(state).__name__}')
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConversionError(f'{path}: entry {key!r} is of type {type(value).__name__}, not a '
                                  'tensor of a state dict')
    if all(key.startswith('module.') for key in state):
        state = {key[len('module.'):]: value for key, value in state.items()}
        notes.append("prefix 'module.' (DistributedDataParallel) removed from every key; the "
                     'keys below are shown without it')
    return dict(state), notes


# -------------------------------------------------------------------- layouts
Mapped = namedtuple('Mapped', 'target transform how')  # target None: not used, how = why

_RESNET_MODULE = r'(conv1|bn1|layer[1-4]\.\d+\.(?:conv[123]|bn[123]|downsample\.[01]))'
_RESNET_KEY = re.compile(_RESNET_MODULE + r'\.(\w+)$')
_BN_KEYS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
_DET_MABN_KEYS = ('weight', 'bias', 'running_var', 'iters', 'buffer_x2', 'buffer_gz')
_CLS_MABN_UNUSED = {
    'sta_matrix': 'the classification MABN2d\'s constant averaging matrix over 2-image groups; '
                  'MABN averages its own per-step window',
    'pre_x2': 'the classification MABN2d\'s x^2 statistics of the previous step\'s 2-image groups; '
              'no counterpart in MABN\'s per-step window, which starts empty',
    'pre_gz': 'the classification MABN2d\'s gradient statistics of the previous step\'s 2-image '
              'groups; no counterpart in MABN\'s per-step window, which starts empty',
}


def _is_norm_module(module):
    return module.rsplit('.', 1)[-1].startswith('bn') or module.endswith('downsample.1')


def _guess_layout(keys):
    """A hint for an error message: which layout ``keys`` look like."""
    keys = list(keys)
    if any(k.startswith('backbone.body.') for k in keys):
        return 'mabn-detection'
    if any(k.startswith(('backbone.', 'neck.', 'roi_head.')) for k in keys):
        return 'an MMDetection checkpoint, which needs no conversion'
    if any(k.endswith(('.sta_matrix', '.pre_x2', '.iters', '.buffer_x2')) for k in keys):
        return 'mabn-imagenet'
    if any(k.endswith('.running_mean') for k in keys):
        return 'torchvision'
    return None


class _Layout:
    """Maps source keys to target keys; subclasses fill in the details."""
    name = ''

    def __init__(self, source_keys):
        self.source_keys = source_keys

    def unknown(self, key, what='not a key of this layout'):
        guess = _guess_layout(self.source_keys)
        hint = f' (the file looks like {guess})' if guess and guess != self.name else ''
        return ConversionError(f'{self.name} layout: source key {key!r}: {what}{hint}')

    def rename(self, key):
        """A :data:`Mapped` for ``key``; raises :class:`ConversionError` for
        a key the layout does not have."""
        raise NotImplementedError

    def prepare_norm(self, layer, prefix, state, report, origin):
        """Layout-specific work on one norm layer's keys before the layer's
        own ``convert_state``."""

    def notes(self, target):
        return []

    def _resnet(self, key, norm_keys, unused=None, prefix=''):
        match = _RESNET_KEY.match(key)
        if key in ('fc.weight', 'fc.bias'):
            return Mapped(None, None, "the ImageNet classifier; MMDetection's ResNet has no fc")
        if match is None:
            raise self.unknown(key, 'not a ResNet key (conv1, bn1, layer1-4, fc)')
        module, name = match.groups()
        if _is_norm_module(module):
            if unused and name in unused:
                return Mapped(None, None, unused[name])
            if name not in norm_keys:
                raise self.unknown(key, f'{name!r} is not a key of this layout\'s norm layer '
                                        f'(expected one of {", ".join(norm_keys)})')
        elif name != 'weight':
            raise self.unknown(key, f'{name!r}: this layout\'s convs have only a weight')
        return Mapped(prefix + key, None, '')


def _window_mismatch(layer, prefix, state, report, origin):
    """Drop a source MABN window whose length differs from the layer's
    ``buffer_size``: it cannot carry over, so it restarts empty."""
    window = state.get(prefix + 'buffer_x2')
    if (not isinstance(layer, MABN) or window is None or window.dim() != 2
            or window.size(0) == layer.buffer_size):
        return
    for name in ('buffer_x2', 'buffer_gz'):
        key = prefix + name
        if key in state:
            del state[key]
            report.amend(origin.pop(key), NOT_USED, None,
                         f'a window of {window.size(0)} steps; the target MABN has buffer_size='
                         f'{layer.buffer_size}, so the window cannot carry over and restarts '
                         'empty')


class _Torchvision(_Layout):
    name = 'torchvision'

    def rename(self, key):
        return self._resnet(key, _BN_KEYS)

    def prepare_norm(self, layer, prefix, state, report, origin):
        if not layer.SUBTRACTS_MEAN:  # (MABN) BatchNorm's mean folded in
            _fold_bn_into_mabn(layer, prefix, state, report, origin)

    def notes(self, target):
        norms = [m for m in target.modules() if isinstance(m, SmallBatchNorm)]
        kinds = {type(m).__name__ for m in norms}
        if any(m.SUBTRACTS_MEAN for m in norms):
            return [f'{", ".join(sorted(kinds))} in eval mode normalise with the running '
                    'statistics as BatchNorm does: the converted backbone computes the source '
                    'function in eval mode.']
        text = ('Every BatchNorm became an MABN with the same inference function (running_var '
                '= var + mean^2, weight and bias rescaled): with plain convs the converted '
                'backbone in eval mode computes the source function. With CenConv it cannot: '
                'CenConv removes each filter\'s mean at run time, so the converted weights are '
                'a starting point, not the same function.')
        if any(isinstance(m, CenConv) for m in target.modules()):
            text += ' This target uses CenConv, so its function differs from the source\'s.'
        return [text]


class _MabnImagenet(_Layout):
    name = 'mabn-imagenet'

    def rename(self, key):
        if key.endswith('.running_mean'):
            raise self.unknown(key, 'a BatchNorm key, which MABN checkpoints do not have')
        return self._resnet(key, _DET_MABN_KEYS + ('num_batches_tracked',), _CLS_MABN_UNUSED)

    def prepare_norm(self, layer, prefix, state, report, origin):
        _window_mismatch(layer, prefix, state, report, origin)

    def notes(self, target):
        notes = ['The authors\' classification ResNet feeds BGR images in 0-255 without mean '
                 'or std (cls/utils.py, ToBGRTensor), and centres conv filters as CenConv does. '
                 'The backbone computes the source function for the same input tensor; an '
                 'MMDetection data_preprocessor that normalises (the default) feeds it another '
                 'input scale, which fine-tuning adapts to; to feed it as trained, set '
                 'model.data_preprocessor mean=[0, 0, 0], std=[1, 1, 1], bgr_to_rgb=False.']
        style = getattr(target, 'style', 'pytorch')
        if style != 'pytorch':
            notes.append(f'The source ResNet strides in conv2 (style=\'pytorch\'); the target '
                         f'uses style={style!r}, so the function differs.')
        return notes


class _MabnDetection(_Layout):
    name = 'mabn-detection'
    FPN = re.compile(r'backbone\.fpn\.fpn_(inner|layer)(\d+)\.([01])\.(\w+)$')
    BODY = re.compile(r'backbone\.body\.(?:stem\.(conv1|bn1)|(layer[1-4]\.\d+\.'
                      r'(?:conv[123]|bn[123]|downsample\.[01])))\.(\w+)$')
    XCONV = re.compile(r'roi_heads\.box\.feature_extractor\.xconvs\.(\d+)\.(\w+)$')
    MASK_FCN = re.compile(r'roi_heads\.mask\.feature_extractor\.mask_fcn(\d+)\.([01])\.(\w+)$')
    PLAIN = {
        'rpn.head.conv': 'rpn_head.rpn_conv',
        'rpn.head.cls_logits': 'rpn_head.rpn_cls',
        'rpn.head.bbox_pred': 'rpn_head.rpn_reg',
        'roi_heads.box.feature_extractor.fc6': 'roi_head.bbox_head.shared_fcs.0',
        'roi_heads.mask.predictor.conv5_mask': 'roi_head.mask_head.upsample',
    }
    CLASSES = {
        'roi_heads.box.predictor.cls_score': (
            'roi_head.bbox_head.fc_cls', lambda t: torch.cat([t[1:], t[:1]]),
            'rows rotated: maskrcnn-benchmark\'s background (row 0) becomes MMDetection\'s last '
            'row, classes 1..80 become 0..79'),
        'roi_heads.box.predictor.bbox_pred': (
            'roi_head.bbox_head.fc_reg', lambda t: t[4:],
            'the background\'s 4 box-regression rows (0-3) dropped; class k\'s rows 4k..4k+3 '
            'become MMDetection\'s label k-1'),
        'roi_heads.mask.predictor.mask_fcn_logits': (
            'roi_head.mask_head.conv_logits', lambda t: t[1:],
            'the background\'s mask logit (channel 0) dropped; class k becomes label k-1'),
    }

    def rename(self, key):
        module, _, name = key.rpartition('.')
        if module in self.PLAIN and name in ('weight', 'bias'):
            return Mapped(f'{self.PLAIN[module]}.{name}', None, '')
        if module in self.CLASSES and name in ('weight', 'bias'):
            target, transform, how = self.CLASSES[module]
            return Mapped(f'{target}.{name}', transform, how)
        if re.fullmatch(r'rpn\.anchor_generator\.cell_anchors\.\d+', key):
            return Mapped(None, None, 'the RPN\'s anchor shapes (a buffer); MMDetection builds '
                          'anchors from rpn_head.anchor_generator: the same sizes 32-512 and '
                          'ratios 0.5, 1, 2 in the same order, centred at the cell\'s corner '
                          'instead of maskrcnn-benchmark\'s (stride - 1) / 2')
        match = self.BODY.match(key)
        if match:
            stem, stage, name = match.groups()
            module = stem or stage
            self._check_suffix(key, name, _is_norm_module(module))
            return Mapped(f'backbone.{module}.{name}', None, '')
        match = self.FPN.match(key)
        if match:
            kind, level, part, name = match.groups()
            convs = 'lateral_convs' if kind == 'inner' else 'fpn_convs'
            return self._conv_norm(key, f'neck.{convs}.{int(level) - 1}', part == '1', name)
        match = self.XCONV.match(key)
        if match:
            index, name = int(match.group(1)), match.group(2)
            if index % 3 == 2:
                raise self.unknown(key, 'xconvs index 3i+2 is a ReLU, which has no weights')
            return self._conv_norm(key, f'roi_head.bbox_head.shared_convs.{index // 3}',
                                   index % 3 == 1, name)
        match = self.MASK_FCN.match(key)
        if match:
            number, part, name = match.groups()
            return self._conv_norm(key, f'roi_head.mask_head.convs.{int(number) - 1}',
                                   part == '1', name)
        raise self.unknown(key)

    def _check_suffix(self, key, name, is_norm):
        if is_norm and name not in _DET_MABN_KEYS:
            raise self.unknown(key, f'{name!r} is not a key of the authors\' MABN2d (expected '
                                    f'one of {", ".join(_DET_MABN_KEYS)})')
        if not is_norm and name != 'weight':
            raise self.unknown(key, f'{name!r}: the authors\' CenConv2d has only a weight')

    def _conv_norm(self, key, module, is_norm, name):
        self._check_suffix(key, name, is_norm)
        return Mapped(f'{module}.{"bn" if is_norm else "conv"}.{name}', None, '')

    def prepare_norm(self, layer, prefix, state, report, origin):
        _window_mismatch(layer, prefix, state, report, origin)

    def notes(self, target):
        backbone = target.backbone
        notes = ['Classes: maskrcnn-benchmark\'s output 0 is the background and 1..80 are '
                 'COCO\'s categories in id order, MMDetection\'s labels 0..79 are the same '
                 'categories and its background logit is the last; see fc_cls, fc_reg and '
                 'conv_logits above.']
        if backbone.style != 'caffe':
            notes.append(f'maskrcnn-benchmark\'s ResNet strides in conv1 (MODEL.RESNETS.'
                         f'STRIDE_IN_1X1 = True by default; the authors\' MABN configs keep it), '
                         f'which is MMDetection\'s style=\'caffe\'. The target backbone has '
                         f'style={backbone.style!r}: the weights load, but to compute the '
                         'source model\'s function set model.backbone.style=\'caffe\'.')
        notes.append('maskrcnn-benchmark fed BGR images in 0-255 minus PIXEL_MEAN [102.9801, '
                     '115.9465, 122.7717] with PIXEL_STD [1, 1, 1]; to evaluate the source '
                     'model set model.data_preprocessor mean=[102.9801, 115.9465, 122.7717], '
                     'std=[1.0, 1.0, 1.0], bgr_to_rgb=False. Not carried by weights: '
                     'maskrcnn-benchmark\'s +1 box widths and its unaligned RoIAlign, so '
                     'detections are close to, not identical with, the source\'s.')
        return notes


_LAYOUT_CLASSES = {cls.name: cls for cls in (_Torchvision, _MabnDetection, _MabnImagenet)}


# ----------------------------------------------------------- norm conversion
def _fold_bn_into_mabn(layer, prefix, state, report, origin):
    """BatchNorm's (weight, bias, running_mean, running_var) -> MABN's
    (weight', bias', running_var') with the same inference function (module
    docstring); running_mean is consumed."""
    names = ('weight', 'bias', 'running_mean', 'running_var')
    for name in names:
        value = state.get(prefix + name)
        if value is None:
            raise ConversionError(f'torchvision layout: BatchNorm {prefix[:-1]!r} has no {name} '
                                  f'(source key {prefix + name!r} is missing)')
        if value.shape != (layer.num_features,):
            raise ConversionError(f'torchvision layout: source key {origin[prefix + name]!r} '
                                  f'has shape {tuple(value.shape)}, the target MABN '
                                  f'{prefix[:-1]!r} needs ({layer.num_features},)')
    new = dict(zip(('weight', 'bias', 'running_var'),
                   bn_to_mabn(*(state[prefix + name] for name in names),
                              TORCHVISION_BN_EPS, layer.eps)))
    how = {'weight': 'weight * sqrt(var + mean^2 + eps) / sqrt(var + eps)',
           'bias': 'bias - weight * mean / sqrt(var + eps)',
           'running_var': 'var + mean^2, MABN\'s running second moment'}
    for name, value in new.items():
        key = prefix + name
        state[key] = value
        report.amend(origin[key], CONVERTED, key,
                     how[name] + ' (keeps the BatchNorm\'s inference function)')
    key = prefix + 'running_mean'
    del state[key]
    report.amend(origin.pop(key), CONVERTED, None,
                 f'folded into {prefix}bias and {prefix}running_var (MABN has no running_mean)')


def _layer_keys(state, prefix):
    """The keys of the layer under ``prefix`` (without it) -> their values."""
    return {key[len(prefix):]: value for key, value in state.items()
            if key.startswith(prefix) and '.' not in key[len(prefix):]}


def _stated_keys(changes, before, where):
    """Replay the records ``changes`` (``StateChange``, in order; each one's
    renames, changes, additions, drops in that order) on the keys ``before``:
    (key after -> the key before that its value came from, None where added;
    the keys a record changed). Raises :class:`ConversionError` for a record
    that does not fit the keys as they were when it was made."""
    source, changed = {key: key for key in before}, set()

    def expect(key, present, what):
        if (key in source) != present:
            raise ConversionError(f'{where}: a record says it {what}, but {key!r} was '
                                  f'{"absent" if present else "already there"} then')

    for change in changes:
        for old, new in change.renamed:
            expect(old, True, f'renamed {old!r} to {new!r}')
            expect(new, False, f'renamed {old!r} to {new!r}')
            source[new] = source.pop(old)
        for key in change.changed:
            expect(key, True, f'changed {key!r}')
            changed.add(key)
        for key in change.added:
            expect(key, False, f'added {key!r}')
            source[key] = None
        for key in change.dropped:
            expect(key, True, f'dropped {key!r}')
            del source[key]
    return source, changed


def _convert_norm(layer, prefix, state, layout, report, origin):
    """Run the layout's preparation and then the layer's own
    ``convert_state`` on the keys under ``prefix``; report what its records
    say it did, after checking them against the keys before and after."""
    layout.prepare_norm(layer, prefix, state, report, origin)
    before = _layer_keys(state, prefix)
    changes = layer.convert_state(state, prefix)
    after = _layer_keys(state, prefix)
    kind = type(layer).__name__
    where = f'{kind}.convert_state on {prefix[:-1] or "<root>"!r}'
    came_from, changed = _stated_keys(changes, before, where)
    kept = {key for key, old in came_from.items() if old == key and key not in changed}

    problems = []
    for key in dict.fromkeys([*before, *after, *came_from]):
        name = repr(prefix + key)
        if key in after and key not in came_from:
            problems.append(f'{name} is still there, though a record drops or renames it'
                            if key in before else f'{name} was added without a record')
        elif key in came_from and key not in after:
            problems.append(f'{name} was removed without a record' if key in before else
                            f'{name} is missing, though a record adds it or renames a key to it')
        elif key in after and (key in before and after[key] is before[key]) != (key in kept):
            problems.append(f'{name} has a new value without a record' if key in kept else
                            f'{name} keeps its value, though a record renames, changes or adds it')
    if problems:
        raise ConversionError(f'{where}: its records do not state exactly what it did to the '
                              f'state dict: {"; ".join(problems)}')

    def text(*keys):
        notes = dict.fromkeys(change.note for change in changes  # ordered, no repeats
                              if {*keys} & {*change.changed, *change.added, *change.dropped,
                                            *(key for pair in change.renamed for key in pair)})
        return f'{kind}.convert_state: ' + '; '.join(notes)

    now = {old: key for key, old in came_from.items() if old is not None}
    moved = {key: origin.pop(prefix + key) for key in before if key not in kept}
    for key, source_key in moved.items():
        if key in now:
            origin[prefix + now[key]] = source_key
            report.amend(source_key, CONVERTED, prefix + now[key], text(key, now[key]))
        else:
            report.amend(source_key, NOT_USED, None, text(key))
    for key in after:
        if came_from[key] is None:
            report.unsourced[prefix + key] = text(key)


def convert_state_dict(source, layout, target, *, report):
    """Convert the state dict ``source`` (``layout``, one of :data:`LAYOUTS`)
    into the state dict of the module ``target`` and load it there with
    ``strict=True``; fill ``report``. Returns ``target.state_dict()``.

    Raises :class:`ConversionError`, naming the key, for a key the layout
    does not have, a target key no source key provides, a source key whose
    target the model does not have, and a shape that does not fit.
    """
    if layout not in _LAYOUT_CLASSES:
        raise ConversionError(f'unknown source layout {layout!r}; expected one of '
                              f'{", ".join(LAYOUTS)}')
    rules = _LAYOUT_CLASSES[layout](list(source))
    state, origin = {}, {}
    for key, value in source.items():
        mapped = rules.rename(key)
        if mapped.target is None:
            report.record(key, NOT_USED, None, mapped.how)
            continue
        if mapped.target in state:
            raise ConversionError(f'{layout} layout: source keys {origin[mapped.target]!r} and '
                                  f'{key!r} both map to {mapped.target!r}')
        state[mapped.target] = mapped.transform(value) if mapped.transform else value
        origin[mapped.target] = key
        report.record(key, CONVERTED if mapped.transform else LOADED, mapped.target, mapped.how)
    for name, module in target.named_modules():
        if isinstance(module, SmallBatchNorm):
            _convert_norm(module, f'{name}.' if name else '', state, rules, report, origin)

    expected = target.state_dict()
    missing = [key for key in expected if key not in state]
    if missing:
        raise ConversionError(f'{layout} layout: no source key provides target key '
                              f'{missing[0]!r}' + (f' (nor {len(missing) - 1} more target keys)'
                                                   if len(missing) > 1 else ''))
    for key in state:
        if key not in expected:
            raise ConversionError(f'{layout} layout: source key {origin.get(key, key)!r} maps to '
                                  f'{key!r}, which the target model does not have')
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise ConversionError(f'{layout} layout: source key {origin.get(key, key)!r} gives '
                                  f'{key!r} shape {tuple(state[key].shape)}, the target needs '
                                  f'{tuple(value.shape)}')
    target.load_state_dict(state, strict=True)
    report.notes += rules.notes(target)
    return {key: value.detach().clone() for key, value in target.state_dict().items()}


# --------------------------------------------------------------------- target
def build_with_mmdet(cfg):
    """The module ``cfg`` describes, built by MMDetection's registry whatever
    the process's default scope is (a Runner built earlier with another
    ``default_scope`` leaves it set for the whole process)."""
    import mmdet.models  # noqa: F401  (registers MMDetection's modules)
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(cfg)


def build_target(layout, norm=None, config=None):
    """(module, description) of what ``layout`` converts into.

    ``torchvision``: the backbone of ``config`` if given (its norm must be
    a registered mmnorm norm and agree with ``norm``), else MMDetection's
    ResNet-50 with ``norm``. ``mabn-imagenet``: the backbone of ``config``
    (default ``configs/mask_rcnn_mabn_imagenet.py``). ``mabn-detection``: the
    model of ``config`` (default ``configs/mask_rcnn_mabn.py``).
    """
    from mmengine.config import Config

    if layout not in LAYOUTS:
        raise ConversionError(f'unknown source layout {layout!r}; expected one of '
                              f'{", ".join(LAYOUTS)}')
    norms = sorted(norm_types())
    if norm is not None and norm not in norms:
        raise ConversionError(f'norm {norm!r} is not one of {", ".join(norms)}')
    if layout != 'torchvision' and norm not in (None, 'MABN'):
        raise ConversionError(f'{layout} layout: the source has MABN layers; norm {norm!r} '
                              'cannot receive them')
    config = config or DEFAULT_CONFIGS.get(layout)
    if config is None:
        if norm is None:
            raise ConversionError(f'torchvision layout: give the target norm ({", ".join(norms)}) '
                                  'or a config whose backbone has one')
        backbone = dict(type='ResNet', depth=50, norm_cfg=dict(type=norm))
        return build_with_mmdet(backbone), f'MMDetection ResNet-50 with {norm}'
    if not Path(config).is_file():
        raise ConversionError(f'{layout} layout: config {config} does not exist')
    model_cfg = Config.fromfile(str(config)).model
    if layout == 'mabn-detection':
        model_cfg = copy.deepcopy(model_cfg)
        model_cfg.backbone.init_cfg = None
        model = build_with_mmdet(model_cfg)
        if not any(isinstance(m, MABN) for m in model.modules()):
            raise ConversionError(f'{layout} layout: config {config} has no MABN layer')
        return model, f'the model of {config}'
    backbone = copy.deepcopy(model_cfg.backbone)
    backbone.init_cfg = None
    found = (backbone.get('norm_cfg') or {}).get('type')
    wanted = 'MABN' if layout == 'mabn-imagenet' else norm
    if found not in norms or (wanted is not None and found != wanted):
        raise ConversionError(f'{layout} layout: config {config} has backbone norm_cfg type '
                              f'{found!r}; expected {wanted or " or ".join(norms)}')
    return build_with_mmdet(backbone), f'the backbone of {config} ({found})'


def convert_checkpoint(source_path, layout, destination=None, *, norm=None, config=None,
                       as_detector=False, trust=False):
    """Read ``source_path``, convert it (see :func:`convert_state_dict`) and,
    if ``destination`` is given, save ``{'state_dict': ..., 'meta': ...}``
    there (directories created). Backbone targets give a backbone-only state
    dict, the file ``init_cfg=dict(type='Pretrained', checkpoint=...)``
    loads; with ``as_detector`` their keys get the ``backbone.`` prefix of a
    full-detector checkpoint (``load_from``). ``mabn-detection`` always gives
    a full-detector checkpoint. Returns (checkpoint dict, report).
    """
    source, read_notes = read_source(source_path, trust=trust)
    target, description = build_target(layout, norm=norm, config=config)
    prefix = 'backbone.' if as_detector and layout != 'mabn-detection' else ''
    if layout == 'mabn-detection' or as_detector:
        description += ', as a full-detector checkpoint'
    else:
        description += ", as a backbone-only file for init_cfg=dict(type='Pretrained', ...)"
    report = ConversionReport(layout, str(source_path), description)
    report.notes += read_notes
    state = convert_state_dict(source, layout, target, report=report)
    checkpoint = {
        'state_dict': {prefix + key: value for key, value in state.items()},
        'meta': {'mmnorm_converted_from': layout, 'source': Path(source_path).name,
                 'target': description},
    }
    if destination is not None:
        destination = Path(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, destination)
    return checkpoint, report
