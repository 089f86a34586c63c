"""tools/convert_checkpoint.py and mmnorm/checkpoints/conversion.py.

Source checkpoints are built here from an independent description of each
layout (torchvision's ResNet-50; the MABN authors' maskrcnn-benchmark Mask
R-CNN and their classification ResNet-50), with random weights and valid
statistics. Converted backbones are compared with a functional ResNet-50
written below with F.conv2d (no mmdet, no mmnorm), in float64 on 64 px input.
"""
import argparse
import re
import runpy
import sys
from collections import Counter
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config

from mmnorm.checkpoints.conversion import (
    ConversionError,
    ConversionReport,
    build_target,
    convert_checkpoint,
    convert_state_dict,
    read_source,
)
from mmnorm.checkpoints.conversion import build_with_mmdet as build
from mmnorm.layers.base import SmallBatchNorm, StateChange

from conftest import REPO, run

pytestmark = pytest.mark.usefixtures('one_thread')

STAGES = ((3, 64), (4, 128), (6, 256), (3, 512))  # ResNet-50: blocks, bottleneck width
EPS = 1e-5
CONFIGS = REPO / 'configs'


# ------------------------------------------------------------ source layouts
def resnet50_layers():
    """(module name, kind, shape) of ResNet-50 in torchvision's names: kind is
    'conv' (shape = weight shape) or 'norm' (shape = channels)."""
    yield 'conv1', 'conv', (64, 3, 7, 7)
    yield 'bn1', 'norm', 64
    in_channels = 64
    for stage, (blocks, width) in enumerate(STAGES, 1):
        for block in range(blocks):
            name = f'layer{stage}.{block}'
            yield f'{name}.conv1', 'conv', (width, in_channels, 1, 1)
            yield f'{name}.bn1', 'norm', width
            yield f'{name}.conv2', 'conv', (width, width, 3, 3)
            yield f'{name}.bn2', 'norm', width
            yield f'{name}.conv3', 'conv', (4 * width, width, 1, 1)
            yield f'{name}.bn3', 'norm', 4 * width
            if block == 0:
                yield f'{name}.downsample.0', 'conv', (4 * width, in_channels, 1, 1)
                yield f'{name}.downsample.1', 'norm', 4 * width
            in_channels = 4 * width


def conv_weight(gen, shape):
    fan_in = shape[1] * shape[2] * shape[3]
    return torch.randn(shape, generator=gen) * (2 / fan_in) ** 0.5


def bn_state(gen, channels):
    return {'weight': torch.rand(channels, generator=gen) + 0.5,
            'bias': torch.randn(channels, generator=gen) * 0.1,
            'running_mean': torch.randn(channels, generator=gen) * 0.5,
            'running_var': torch.rand(channels, generator=gen) * 1.5 + 0.5,
            'num_batches_tracked': torch.tensor(1234)}


def det_mabn_state(gen, channels, window=16, iters=5000):
    """The detection code's MABN2d (det/maskrcnn_benchmark/layers/MABN.py)."""
    return {'weight': torch.rand(channels, generator=gen) + 0.5,
            'bias': torch.randn(channels, generator=gen) * 0.1,
            'running_var': torch.rand(1, channels, 1, 1, generator=gen) + 0.5,
            'iters': torch.tensor([iters], dtype=torch.long),
            'buffer_x2': torch.rand(window, channels, generator=gen) + 0.5,
            'buffer_gz': torch.randn(window, channels, generator=gen) * 0.01}


def cls_mabn_state(gen, channels, window=16):
    """The classification code's MABN2d (cls/networks/MABN.py)."""
    return {'weight': torch.rand(channels, generator=gen) + 0.5,
            'bias': torch.randn(channels, generator=gen) * 0.1,
            'running_var': torch.rand(channels, generator=gen) + 0.5,
            'sta_matrix': torch.ones(window, 2 * window) / window,
            'pre_x2': torch.rand(window, channels, generator=gen),
            'pre_gz': torch.randn(window, channels, generator=gen),
            'iters': torch.tensor([5000.0])}


def resnet50_state(gen, norm_state, prefix=''):
    state = {}
    for name, kind, shape in resnet50_layers():
        if kind == 'conv':
            state[f'{prefix}{name}.weight'] = conv_weight(gen, shape)
        else:
            state.update({f'{prefix}{name}.{k}': v for k, v in norm_state(gen, shape).items()})
    return state


def torchvision_state(gen):
    state = resnet50_state(gen, bn_state)
    state['fc.weight'] = torch.randn(1000, 2048, generator=gen) * 0.01
    state['fc.bias'] = torch.zeros(1000)
    return state


def maskrcnn_benchmark_state(gen):
    """The authors' R-50-FPN-MABN Mask R-CNN state dict, 81 classes."""
    state = {}
    for name, value in resnet50_state(gen, det_mabn_state).items():
        state['backbone.body.' + ('stem.' if name.startswith(('conv1', 'bn1')) else '') + name] \
            = value

    def conv_norm(name, out_channels, in_channels, k):
        state[f'{name}.0.weight'] = conv_weight(gen, (out_channels, in_channels, k, k))
        state.update({f'{name}.1.{k}': v for k, v in det_mabn_state(gen, out_channels).items()})

    def layer(name, out_shape, in_features):
        state[f'{name}.weight'] = torch.randn(out_shape + in_features, generator=gen) * 0.01
        state[f'{name}.bias'] = torch.randn(out_shape[0], generator=gen) * 0.01

    for level, channels in enumerate((256, 512, 1024, 2048), 1):
        conv_norm(f'backbone.fpn.fpn_inner{level}', 256, channels, 1)
        conv_norm(f'backbone.fpn.fpn_layer{level}', 256, 256, 3)
    layer('rpn.head.conv', (256,), (256, 3, 3))
    layer('rpn.head.cls_logits', (3,), (256, 1, 1))
    layer('rpn.head.bbox_pred', (12,), (256, 1, 1))
    for level in range(5):
        state[f'rpn.anchor_generator.cell_anchors.{level}'] = torch.randn(3, 4, generator=gen)
    box = 'roi_heads.box.feature_extractor.xconvs'
    for i in range(4):
        state[f'{box}.{3 * i}.weight'] = conv_weight(gen, (256, 256, 3, 3))
        state.update({f'{box}.{3 * i + 1}.{k}': v for k, v in det_mabn_state(gen, 256).items()})
    layer('roi_heads.box.feature_extractor.fc6', (1024,), (256 * 7 * 7,))
    layer('roi_heads.box.predictor.cls_score', (81,), (1024,))
    layer('roi_heads.box.predictor.bbox_pred', (81 * 4,), (1024,))
    for n in range(1, 5):
        conv_norm(f'roi_heads.mask.feature_extractor.mask_fcn{n}', 256, 256, 3)
    state['roi_heads.mask.predictor.conv5_mask.weight'] = torch.randn(256, 256, 2, 2,
                                                                       generator=gen) * 0.01
    state['roi_heads.mask.predictor.conv5_mask.bias'] = torch.zeros(256)
    layer('roi_heads.mask.predictor.mask_fcn_logits', (81,), (256, 1, 1))
    return state


# ------------------------------------------------------- reference ResNet-50
def bn_eval(state, name, x):
    return F.batch_norm(x, state[f'{name}.running_mean'], state[f'{name}.running_var'],
                        state[f'{name}.weight'], state[f'{name}.bias'], False, 0.0, EPS)


def mabn_eval(state, name, x):
    """The authors' MABN2d in eval mode: x / sqrt(running_var + eps) * w + b."""
    var = state[f'{name}.running_var'].reshape(1, -1, 1, 1)
    return (x / (var + EPS).sqrt() * state[f'{name}.weight'].view(1, -1, 1, 1)
            + state[f'{name}.bias'].view(1, -1, 1, 1))


def centred(weight):
    return weight - weight.mean(dim=(1, 2, 3), keepdim=True)


def reference_resnet50(state, x, norm, centre=False, stride_in_1x1=False):
    """The four stage outputs of a ResNet-50 (torchvision's names in
    ``state``), computed with F.conv2d and ``norm(state, name, x)``."""
    def conv(name, x, stride=1, padding=0):
        weight = state[f'{name}.weight']
        return F.conv2d(x, centred(weight) if centre else weight, None, stride, padding)

    x = F.relu(norm(state, 'bn1', conv('conv1', x, 2, 3)))
    x = F.max_pool2d(x, 3, 2, 1)
    outs = []
    for stage, (blocks, _) in enumerate(STAGES, 1):
        for block in range(blocks):
            name = f'layer{stage}.{block}'
            stride = 2 if stage > 1 and block == 0 else 1
            s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
            out = F.relu(norm(state, f'{name}.bn1', conv(f'{name}.conv1', x, s1)))
            out = F.relu(norm(state, f'{name}.bn2', conv(f'{name}.conv2', out, s3, 1)))
            out = norm(state, f'{name}.bn3', conv(f'{name}.conv3', out))
            if block == 0:
                x = norm(state, f'{name}.downsample.1', conv(f'{name}.downsample.0', x, stride))
            x = F.relu(out + x)
        outs.append(x)
    return outs


def assert_same_outputs(model, reference):
    """The model's four stage outputs equal ``reference`` up to the float32
    rounding of converted weights (computed in float64 from float32 files)."""
    with torch.no_grad():
        outs = model(IMAGE)
    assert len(outs) == 4
    for out, ref in zip(outs, reference):
        assert out.shape == ref.shape
        scale = ref.abs().max()
        assert scale > 1e-2  # a real signal, not a vanished one
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6 * scale)


IMAGE = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def doubled(state):
    return {k: v.double() if v.is_floating_point() else v for k, v in state.items()}


def listed_keys(text):
    """The source keys of a printed report's "Source keys" section."""
    section = text.split('Source keys:\n', 1)[1].split('\n\n', 1)[0]
    return Counter(re.match(r'  (loaded|converted|not used)\s+([^\s:]+)', line).group(2)
                   for line in section.splitlines())


def check_report(report, source):
    """Every source key once, in the entries and in the printed text."""
    assert set(report.entries) == set(source)
    listed = listed_keys(report.format())
    assert set(listed) == set(source) and set(listed.values()) == {1}


# --------------------------------------------------------------- torchvision
@pytest.mark.parametrize('norm', ['MABN', 'BRN', 'CBN'])
def test_torchvision_backbone_keeps_the_bn_function(norm, tmp_path):
    source = torchvision_state(torch.Generator().manual_seed(0))
    torch.save(source, tmp_path / 'resnet50.pth')
    checkpoint, report = convert_checkpoint(tmp_path / 'resnet50.pth', 'torchvision',
                                            tmp_path / 'out.pth', norm=norm)
    check_report(report, source)
    assert report.entries['fc.weight'].status == 'not used'
    assert report.entries['layer1.0.conv2.weight'] == ('loaded', 'layer1.0.conv2.weight', '')

    model = build(dict(type='ResNet', depth=50, norm_cfg=dict(type=norm)))
    saved = torch.load(tmp_path / 'out.pth', weights_only=True)
    result = model.load_state_dict(saved['state_dict'], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert saved['meta']['mmnorm_converted_from'] == 'torchvision'

    bn, layer = 'layer3.2.bn2', model.layer3[2].bn2
    mean, var = source[f'{bn}.running_mean'], source[f'{bn}.running_var']
    assert int(layer.num_batches_tracked) == (1234 if norm == 'BRN' else 0)
    if norm == 'MABN':
        torch.testing.assert_close(layer.running_var, var + mean ** 2)
        assert not layer.buffer_x2.any() and not layer.buffer_gz.any()
        assert report.entries[f'{bn}.running_mean'].status == 'converted'
        assert set(report.unsourced) == {k.replace('running_var', b) for k in source
                                         if k.endswith('running_var')
                                         for b in ('buffer_x2', 'buffer_gz')}
    else:
        torch.testing.assert_close(layer.running_mean, mean)
        torch.testing.assert_close(layer.running_var, var)
        assert report.entries[f'{bn}.running_var'].status == 'loaded'
        assert bool(report.unsourced) == (norm == 'CBN')

    model.double().eval()
    assert_same_outputs(model, reference_resnet50(doubled(source), IMAGE, bn_eval))


def test_torchvision_cli_for_the_mabn_config(tmp_path):
    """End to end: the CLI writes a full-detector file for
    configs/mask_rcnn_mabn.py (MABN + CenConv) and says that CenConv changes
    the function."""
    source = torchvision_state(torch.Generator().manual_seed(1))
    torch.save(source, tmp_path / 'resnet50.pth')
    out = run([sys.executable, REPO / 'tools' / 'convert_checkpoint.py', tmp_path / 'resnet50.pth',
               tmp_path / 'mabn.pth', '--from', 'torchvision', '--config',
               CONFIGS / 'mask_rcnn_mabn.py', '--as-detector']).stdout
    listed = listed_keys(out)
    assert set(listed) == set(source) and set(listed.values()) == {1}
    assert 'This target uses CenConv, so its function differs' in out

    backbone = build(Config.fromfile(CONFIGS / 'mask_rcnn_mabn.py').model.backbone)
    state = torch.load(tmp_path / 'mabn.pth', weights_only=True)['state_dict']
    assert all(key.startswith('backbone.') for key in state)
    result = backbone.load_state_dict({k[len('backbone.'):]: v for k, v in state.items()},
                                      strict=True)
    assert not result.missing_keys and not result.unexpected_keys


# ------------------------------------------------------------- mabn-imagenet
def test_mabn_imagenet_cli_and_config_init(tmp_path):
    """The authors' classification checkpoint -> the file
    configs/mask_rcnn_mabn_imagenet.py loads; in eval mode the backbone
    computes x / sqrt(running_var + eps) with centred conv weights."""
    source = resnet50_state(torch.Generator().manual_seed(2), cls_mabn_state)
    source['fc.weight'] = torch.randn(1000, 2048) * 0.01
    source['fc.bias'] = torch.zeros(1000)
    torch.save({'model': source, 'iteration': 120, 'optimizer': {'state': {}},
                'scheduler': {'milestones': Counter({30: 1, 60: 1})}}, tmp_path / 'cls.pth')
    destination = tmp_path / 'checkpoints' / 'resnet50_mabn_cenconv_imagenet.pth'
    command = [sys.executable, REPO / 'tools' / 'convert_checkpoint.py', tmp_path / 'cls.pth',
               destination, '--from', 'mabn-imagenet']
    if not hasattr(torch.serialization, 'safe_globals'):  # torch < 2.5: Counter needs --trust
        refused = run(command, check=False)
        assert refused.returncode == 1
        assert refused.stdout.strip().splitlines()[-1].endswith(
            'Unsupported class collections.Counter; torch < 2.5 cannot allow it in '
            'weights-only loading); if you trust it, pass trust=True (--trust) to unpickle it in '
            'full'), refused.stdout[-2000:]
        command.append('--trust')
    out = run(command).stdout
    listed = listed_keys(out)
    assert set(listed) == set(source) and set(listed.values()) == {1}
    assert re.search(r'not used\s+layer2\.0\.bn1\.pre_x2: ', out)
    assert re.search(r'converted\s+layer2\.0\.bn1\.iters -> layer2\.0\.bn1\.num_batches_tracked',
                     out)
    assert "'model' entry" in out and 'optimizer' in out

    cfg = Config.fromfile(CONFIGS / 'mask_rcnn_mabn_imagenet.py')
    assert cfg.model.backbone.init_cfg.checkpoint == 'checkpoints/' + destination.name
    cfg.model.backbone.init_cfg.checkpoint = str(destination)
    backbone = build(cfg.model.backbone)
    backbone.init_weights()
    saved = torch.load(destination, weights_only=True)['state_dict']
    current = backbone.state_dict()
    assert set(current) == set(saved)
    for key, value in saved.items():
        assert torch.equal(current[key], value), key
    from mmengine.runner import load_checkpoint
    load_checkpoint(build(dict(cfg.model.backbone, init_cfg=None)), str(destination), strict=True)

    backbone.double().eval()
    reference = reference_resnet50(doubled(source), IMAGE, mabn_eval, centre=True)
    assert_same_outputs(backbone, reference)


def test_mabn_imagenet_with_detection_mabn_buffers(tmp_path):
    """R50-wc.pth's buffers are not published: the detection code's MABN2d
    layout (window and counter) loads too, and the window carries over."""
    source = resnet50_state(torch.Generator().manual_seed(3), det_mabn_state)
    torch.save(source, tmp_path / 'r50.pth')
    checkpoint, report = convert_checkpoint(tmp_path / 'r50.pth', 'mabn-imagenet')
    check_report(report, source)
    state = checkpoint['state_dict']
    assert int(state['layer4.2.bn3.num_batches_tracked']) == 5000
    assert torch.equal(state['layer4.2.bn3.buffer_gz'], source['layer4.2.bn3.buffer_gz'])
    assert torch.equal(state['bn1.running_var'], source['bn1.running_var'].reshape(64))
    assert report.entries['bn1.running_var'].status == 'converted'
    assert not report.unsourced


# ------------------------------------------------------------ mabn-detection
@pytest.fixture(scope='module')
def detection_source(tmp_path_factory):
    """The authors' Mask R-CNN checkpoint as maskrcnn-benchmark saves it."""
    state = maskrcnn_benchmark_state(torch.Generator().manual_seed(4))
    path = tmp_path_factory.mktemp('maskrcnn_benchmark') / 'model_final.pth'
    torch.save({'model': {'module.' + k: v for k, v in state.items()}, 'iteration': 180000,
                'optimizer': {'state': {}, 'param_groups': []}}, path)
    return path, state


@pytest.fixture(scope='module')
def mask_rcnn_mabn():
    return build_target('mabn-detection')[0]


def test_mabn_detection_into_the_mabn_config(detection_source):
    path, source = detection_source
    checkpoint, report = convert_checkpoint(path, 'mabn-detection')
    check_report(report, source)
    assert not report.unsourced
    state = checkpoint['state_dict']
    model = build(Config.fromfile(CONFIGS / 'mask_rcnn_mabn.py').model)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    def same(target, key, transform=lambda t: t):
        assert torch.equal(state[target], transform(source[key])), (target, key)

    same('backbone.conv1.weight', 'backbone.body.stem.conv1.weight')
    same('backbone.layer3.0.downsample.1.bias', 'backbone.body.layer3.0.downsample.1.bias')
    same('neck.lateral_convs.0.conv.weight', 'backbone.fpn.fpn_inner1.0.weight')
    same('neck.fpn_convs.3.bn.running_var', 'backbone.fpn.fpn_layer4.1.running_var',
         lambda t: t.reshape(-1))
    same('rpn_head.rpn_reg.weight', 'rpn.head.bbox_pred.weight')
    same('roi_head.bbox_head.shared_convs.2.conv.weight',
         'roi_heads.box.feature_extractor.xconvs.6.weight')
    same('roi_head.bbox_head.shared_convs.2.bn.bias',
         'roi_heads.box.feature_extractor.xconvs.7.bias')
    same('roi_head.bbox_head.shared_fcs.0.weight', 'roi_heads.box.feature_extractor.fc6.weight')
    same('roi_head.mask_head.convs.3.bn.buffer_x2',
         'roi_heads.mask.feature_extractor.mask_fcn4.1.buffer_x2')
    same('roi_head.mask_head.upsample.weight', 'roi_heads.mask.predictor.conv5_mask.weight')
    assert int(state['roi_head.mask_head.convs.3.bn.num_batches_tracked']) == 5000
    # classes: background row 0 -> last row; class k -> label k - 1
    cls_score = source['roi_heads.box.predictor.cls_score.weight']
    assert torch.equal(state['roi_head.bbox_head.fc_cls.weight'][80], cls_score[0])
    assert torch.equal(state['roi_head.bbox_head.fc_cls.weight'][:80], cls_score[1:])
    same('roi_head.bbox_head.fc_cls.bias', 'roi_heads.box.predictor.cls_score.bias',
         lambda t: torch.cat([t[1:], t[:1]]))
    bbox_pred = source['roi_heads.box.predictor.bbox_pred.weight']
    fc_reg = state['roi_head.bbox_head.fc_reg.weight']
    assert torch.equal(fc_reg[4 * 2:4 * 3], bbox_pred[4 * 3:4 * 4])  # class 3 -> label 2
    same('roi_head.bbox_head.fc_reg.bias', 'roi_heads.box.predictor.bbox_pred.bias',
         lambda t: t[4:])
    same('roi_head.mask_head.conv_logits.weight', 'roi_heads.mask.predictor.mask_fcn_logits.weight',
         lambda t: t[1:])
    assert report.entries['rpn.anchor_generator.cell_anchors.0'].status == 'not used'
    assert "style='caffe'" in report.format()

    # The backbone computes the source function with the source's ResNet style.
    backbone = build(dict(type='ResNet', depth=50, style='caffe', norm_cfg=dict(type='MABN'),
                          conv_cfg=dict(type='CenConv')))
    backbone.load_state_dict({k[len('backbone.'):]: v for k, v in state.items()
                              if k.startswith('backbone.')}, strict=True)
    backbone.double().eval()
    body = {k.replace('backbone.body.', '').replace('stem.', ''): v for k, v in source.items()
            if k.startswith('backbone.body.')}
    assert_same_outputs(backbone, reference_resnet50(doubled(body), IMAGE, mabn_eval,
                                                     centre=True, stride_in_1x1=True))


def test_mabn_detection_window_restarts_for_another_buffer_size(detection_source):
    path, source = detection_source
    checkpoint, report = convert_checkpoint(path, 'mabn-detection',
                                            config=CONFIGS / 'mask_rcnn_mabn_1img.py')
    check_report(report, source)
    state = checkpoint['state_dict']
    assert state['neck.fpn_convs.0.bn.buffer_x2'].shape == (32, 256)
    assert not state['neck.fpn_convs.0.bn.buffer_x2'].any()
    assert int(state['neck.fpn_convs.0.bn.num_batches_tracked']) == 0
    entry = report.entries['backbone.fpn.fpn_layer1.1.buffer_x2']
    assert entry.status == 'not used' and 'buffer_size=32' in entry.how
    assert report.entries['backbone.fpn.fpn_layer1.1.iters'].status == 'converted'
    assert 'neck.fpn_convs.0.bn.buffer_x2' in report.unsourced


# --------------------------------------------------------------- bad input
def convert(source, layout, target):
    return convert_state_dict(source, layout, target,
                              report=ConversionReport(layout, 'test', 'test'))


@pytest.fixture(scope='module')
def resnet50_mabn():
    return build(dict(type='ResNet', depth=50, norm_cfg=dict(type='MABN')))


@pytest.mark.parametrize('change, message', [
    (lambda s: s.pop('layer2.1.conv2.weight'), "target key 'layer2.1.conv2.weight'"),
    (lambda s: s.pop('layer1.0.bn1.running_mean'), "'layer1.0.bn1.running_mean' is missing"),
    (lambda s: s.update({'layer1.0.conv2.weight': torch.zeros(64, 64, 1, 1)}),
     r"'layer1.0.conv2.weight' gives 'layer1.0.conv2.weight' shape \(64, 64, 1, 1\), the "
     r'target needs \(64, 64, 3, 3\)'),
    (lambda s: s.update({'bn1.iters': torch.zeros(1)}), "source key 'bn1.iters'"),
    (lambda s: s.update({'layer1.3.conv1.weight': torch.zeros(64, 256, 1, 1)}),
     "'layer1.3.conv1.weight' maps to 'layer1.3.conv1.weight', which the target model does not"),
    (lambda s: s.update({'head.weight': torch.zeros(1)}), "source key 'head.weight'"),
])
def test_bad_torchvision_input_names_the_key(resnet50_mabn, change, message):
    source = torchvision_state(torch.Generator().manual_seed(5))
    change(source)
    with pytest.raises(ConversionError, match=message):
        convert(source, 'torchvision', resnet50_mabn)


def test_wrong_or_unknown_layout_is_named(resnet50_mabn, mask_rcnn_mabn, detection_source):
    _, detection = detection_source
    with pytest.raises(ConversionError, match=r"torchvision layout: source key "
                       r"'backbone\.body\.stem\.conv1\.weight'.*looks like mabn-detection"):
        convert(detection, 'torchvision', resnet50_mabn)
    with pytest.raises(ConversionError, match="unknown source layout 'caffe2'"):
        convert(detection, 'caffe2', resnet50_mabn)
    with pytest.raises(ConversionError, match="unknown source layout 'caffe2'"):
        build_target('caffe2')
    with pytest.raises(ConversionError, match=r"mabn-detection layout: source key "
                       r"'roi_heads\.box\.feature_extractor\.xconvs\.2\.weight'.*ReLU"):
        convert(dict(detection, **{'roi_heads.box.feature_extractor.xconvs.2.weight':
                                   torch.zeros(1)}), 'mabn-detection', mask_rcnn_mabn)
    too_many = dict(detection, **{'roi_heads.box.predictor.cls_score.weight':
                                  torch.zeros(91, 1024)})
    with pytest.raises(ConversionError, match=r"'roi_heads\.box\.predictor\.cls_score\.weight' "
                       r'gives .*shape \(91, 1024\), the target needs \(81, 1024\)'):
        convert(too_many, 'mabn-detection', mask_rcnn_mabn)
    with pytest.raises(ConversionError, match=r"mabn-imagenet layout: source key "
                       r"'bn1\.running_mean'.*BatchNorm key.*looks like torchvision"):
        convert(torchvision_state(torch.Generator().manual_seed(6)), 'mabn-imagenet',
                resnet50_mabn)
    with pytest.raises(ConversionError, match="config .*mask_rcnn_bn_scratch.py has backbone "
                       "norm_cfg type 'BN'; expected MABN"):
        build_target('mabn-imagenet', config=CONFIGS / 'mask_rcnn_bn_scratch.py')
    with pytest.raises(ConversionError, match='give the target norm'):
        build_target('torchvision')


def test_convert_state_changes_must_be_recorded():
    """The converter reports what convert_state's records state, and refuses a
    layer whose records do not state exactly what it did to the state dict."""

    class Editing(SmallBatchNorm):  # defined here, not registered
        def __init__(self, edit, records):
            super().__init__(4, eps=1e-5, momentum=0.1)
            self.edit, self.records = edit, records

        def convert_state(self, state_dict, prefix):
            self.edit(state_dict, prefix)
            return self.records

    def convert_with(edit, records):
        target = torch.nn.Module()
        target.bn1 = Editing(edit, records)
        report = ConversionReport('torchvision', 'test', 'test')
        convert_state_dict(source, 'torchvision', target, report=report)
        return report

    def double(state, prefix):
        state[prefix + 'running_var'] = state[prefix + 'running_var'] * 2

    source = {f'bn1.{key}': value for key, value in torch.nn.BatchNorm2d(4).state_dict().items()}
    doubled = StateChange('running_var doubled', changed=('running_var',))
    report = convert_with(double, [doubled])
    assert report.entries['bn1.running_var'] == (
        'converted', 'bn1.running_var', 'Editing.convert_state: running_var doubled')
    assert report.entries['bn1.running_mean'] == ('loaded', 'bn1.running_mean', '')

    unstated = "Editing.convert_state on 'bn1': its records do not state exactly what it did to "
    for edit, records, message in [
            (double, [], unstated + "the state dict: 'bn1.running_var' has a new value without "
                                    'a record'),
            (lambda s, p: s.pop(p + 'running_mean'), [],
             "'bn1.running_mean' was removed without a record"),
            (lambda s, p: s.update({p + 'extra': s.pop(p + 'bias')}), [],
             "'bn1.bias' was removed without a record; 'bn1.extra' was added without a record"),
            (lambda s, p: None, [doubled],
             "'bn1.running_var' keeps its value, though a record renames, changes or adds it"),
            (lambda s, p: None, [StateChange('dropped', dropped=('running_mean',))],
             "'bn1.running_mean' is still there, though a record drops or renames it"),
            (lambda s, p: None, [StateChange('added', added=('extra',))],
             "'bn1.extra' is missing, though a record adds it or renames a key to it"),
            (lambda s, p: None,
             [StateChange('renamed', renamed=(('iters', 'num_batches_tracked'),))],
             "a record says it renamed 'iters' to 'num_batches_tracked', but 'iters' was absent "
             'then'),
    ]:
        with pytest.raises(ConversionError, match=re.escape(message)):
            convert_with(edit, records)


def test_unreadable_sources_are_refused(tmp_path):
    torch.save({'model': {'conv1.weight': torch.zeros(1)}, 'args': argparse.Namespace(lr=1)},
               tmp_path / 'pickled.pth')
    with pytest.raises(ConversionError, match=r'pickled\.pth: torch\.load\(weights_only=True\) '
                       r'refused .*--trust'):
        read_source(tmp_path / 'pickled.pth')
    state, notes = read_source(tmp_path / 'pickled.pth', trust=True)
    assert list(state) == ['conv1.weight'] and "'model' entry" in notes[0]
    torch.save({'conv1.weight': torch.zeros(1), 'epoch': 3}, tmp_path / 'mixed.pth')
    with pytest.raises(ConversionError, match="entry 'epoch' is of type int, not a tensor"):
        read_source(tmp_path / 'mixed.pth')
    with pytest.raises(ConversionError, match='does not exist'):
        read_source(tmp_path / 'absent.pth')
    argv = ['convert_checkpoint.py', str(tmp_path / 'mixed.pth'), str(tmp_path / 'out.pth'),
            '--from', 'torchvision', '--norm', 'BRN']
    with mock.patch.object(sys, 'argv', argv), pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / 'tools' / 'convert_checkpoint.py'), run_name='__main__')
    assert str(exit_info.value).startswith('error: ')
    assert "entry 'epoch'" in str(exit_info.value)
    assert not (tmp_path / 'out.pth').exists()
