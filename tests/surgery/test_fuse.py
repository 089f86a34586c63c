"""mmnorm.fuse and tools/deploy.py --to module (README, "Deployment and
conversion"; the deployed file is mmnorm.checkpoints.deployed's).

Every fold is checked by output equality: the model's eval output before
``fuse`` (computed by the layers themselves) against the folded model's.
"""
import copy
import pickle
import sys
from collections import Counter

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import mmnorm
from mmnorm.checkpoints.deployed import load_deployed
from mmnorm.surgery.fuse import (
    conv_norm_pairs,
    format_report,
    fuse,
    is_foldable_norm,
    mmnorm_modules,
)
from mmnorm.surgery.report import SurgeryReport

from conftest import REPO, run, tool_env
from detection_outputs import assert_same_instances, binary_and_soft

F64 = torch.float64
C_IN, C_OUT = 4, 6


def frozen_bn(channels):
    from mmdet.models.layers import FrozenBatchNorm2d
    return FrozenBatchNorm2d(channels)


NORMS = {
    'BatchNorm2d': lambda c: nn.BatchNorm2d(c),
    'BatchNorm2d-no-affine': lambda c: nn.BatchNorm2d(c, affine=False),
    'SyncBatchNorm': lambda c: nn.SyncBatchNorm(c),
    'FrozenBN': frozen_bn,
    'MABN': lambda c: mmnorm.MABN(c),
    'BRN': lambda c: mmnorm.BRN(c),
    'CBN': lambda c: mmnorm.CBN(c),
}
CONVS = {'Conv2d': nn.Conv2d, 'CenConv': mmnorm.CenConv, 'WSConv': mmnorm.WSConv}
CONV_ARGS = {
    'bias': dict(kernel_size=3, padding=1, bias=True),
    'no-bias': dict(kernel_size=3, padding=1, bias=False),
    'groups': dict(kernel_size=3, padding=1, groups=2, bias=False),
    'stride': dict(kernel_size=3, stride=2, padding=0, bias=True),
}


def randomize_statistics(model, seed=0):
    """Non-trivial affine parameters and running statistics for every norm
    layer (BatchNorm-like, FrozenBN, GroupNorm) of ``model``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not (isinstance(m, (_BatchNorm, nn.GroupNorm)) or hasattr(m, 'running_var')):
                continue
            for name, low, high in (('weight', 0.5, 2.0), ('running_var', 0.5, 2.0),
                                    ('bias', -0.3, 0.3), ('running_mean', -0.3, 0.3)):
                t = getattr(m, name, None)
                if t is not None:
                    t.copy_(torch.rand(t.shape, generator=gen) * (high - low) + low)
    return model


def eval_output(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def classes_of(model):
    return {type(m) for m in model.modules()}


@pytest.mark.parametrize('conv_args', sorted(CONV_ARGS))
@pytest.mark.parametrize('conv_type', sorted(CONVS))
@pytest.mark.parametrize('norm_type', sorted(NORMS))
def test_fold_after_conv_gives_the_same_eval_output(norm_type, conv_type, conv_args):
    torch.manual_seed(0)
    conv = CONVS[conv_type](C_IN, C_OUT, **CONV_ARGS[conv_args])
    model = randomize_statistics(nn.Sequential(conv, NORMS[norm_type](C_OUT))).to(F64)
    x = torch.randn(2, C_IN, 9, 9, dtype=F64)
    expected = eval_output(model, x)
    report = SurgeryReport()
    fused = fuse(model, report)
    assert fused is model
    assert type(fused[0]) is nn.Conv2d and isinstance(fused[1], nn.Identity)
    assert fused[0].bias is not None
    if conv_type == 'Conv2d':
        assert fused[0] is conv  # folded in place
    torch.testing.assert_close(eval_output(fused, x), expected, rtol=1e-12, atol=1e-12)
    norm_name = 'BatchNorm2d' if norm_type.startswith('BatchNorm2d') else norm_type
    norm_name = 'FrozenBatchNorm2d' if norm_type == 'FrozenBN' else norm_name
    assert report.counts()['folded', norm_name] == 1
    assert report.counts()['replaced', conv_type] == (conv_type != 'Conv2d')
    assert report[-1] == ('1', norm_name, 'folded', 'into 0', False)
    assert not mmnorm_modules(fused)


@pytest.mark.parametrize('norm_type', ['MABN', 'BRN', 'CBN'])
def test_norm_not_after_a_conv_becomes_batch_norm_with_the_same_output(norm_type):
    torch.manual_seed(0)
    # After an activation, and after a conv whose output goes through a ReLU first.
    model = randomize_statistics(nn.Sequential(
        nn.ReLU(), NORMS[norm_type](C_IN), nn.Conv2d(C_IN, C_IN, 3, padding=1), nn.ReLU(),
        NORMS[norm_type](C_IN), nn.GroupNorm(2, C_IN))).to(F64)
    x = torch.randn(2, C_IN, 7, 7, dtype=F64)
    expected = eval_output(model, x)
    report = SurgeryReport()
    fused = fuse(model, report)
    assert [type(m) for m in fused] == [nn.ReLU, nn.BatchNorm2d, nn.Conv2d, nn.ReLU,
                                        nn.BatchNorm2d, nn.GroupNorm]
    assert not fused[1].training and not fused[4].training
    torch.testing.assert_close(eval_output(fused, x), expected, rtol=1e-12, atol=1e-12)
    assert report.counts() == Counter({('replaced', norm_type): 2, ('kept', 'GroupNorm'): 1})
    assert [e.detail for e in report if e.what == norm_type] == [
        'by an eval-mode BatchNorm2d with its inference (not folded: its input comes from '
        '0 (ReLU))',
        'by an eval-mode BatchNorm2d with its inference (not folded: its input comes from '
        '3 (ReLU))']


def test_root_layer_is_replaced_and_returned():
    layer = randomize_statistics(mmnorm.MABN(3)).to(F64)
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    expected = eval_output(layer, x)
    fused = fuse(layer)
    assert type(fused) is nn.BatchNorm2d
    torch.testing.assert_close(eval_output(fused, x), expected, rtol=1e-12, atol=1e-12)
    conv = mmnorm.CenConv(3, 2, 1)
    assert type(fuse(conv)) is nn.Conv2d


def conv_module(order, **kwargs):
    from mmcv.cnn import ConvModule
    return ConvModule(C_IN, C_IN, 3, padding=1, order=order, **kwargs)


@pytest.mark.parametrize('order', [('norm', 'conv', 'act'), ('conv', 'act', 'norm')])
def test_conv_module_whose_norm_is_not_right_after_its_conv_is_not_folded(order):
    """In-channels equal out-channels, so only the order tells (mmcv's
    fuse_conv_bn would fold both)."""
    torch.manual_seed(0)
    model = randomize_statistics(conv_module(order, norm_cfg=dict(type='MABN'),
                                             conv_cfg=dict(type='CenConv'))).to(F64)
    pairs, why = conv_norm_pairs(model, is_foldable_norm)
    assert pairs == {} and why['bn'].startswith('its input comes from ')
    x = torch.randn(2, C_IN, 6, 6, dtype=F64)
    expected = eval_output(model, x)
    fused = fuse(model)
    assert type(fused.norm) is nn.BatchNorm2d and type(fused.conv) is nn.Conv2d
    torch.testing.assert_close(eval_output(fused, x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('efficient', [False, True])
def test_conv_module_folds_also_with_efficient_conv_bn_eval(efficient):
    torch.manual_seed(0)
    model = randomize_statistics(conv_module(('conv', 'norm', 'act'), norm_cfg=dict(type='BN'),
                                             efficient_conv_bn_eval=efficient)).to(F64)
    assert conv_norm_pairs(model, is_foldable_norm) == ({'bn': 'conv'}, {})
    x = torch.randn(2, C_IN, 6, 6, dtype=F64)
    expected = eval_output(model, x)
    fused = fuse(model)
    assert isinstance(fused.bn, nn.Identity) and fused.norm is fused.bn
    assert fused.efficient_conv_bn_eval_forward is None
    torch.testing.assert_close(eval_output(fused, x), expected, rtol=1e-12, atol=1e-12)


def test_shared_conv_is_not_folded_and_stays_shared():
    torch.manual_seed(0)
    conv = mmnorm.CenConv(C_IN, C_IN, 3, padding=1)
    model = randomize_statistics(nn.Sequential(conv, mmnorm.MABN(C_IN), nn.ReLU(), conv,
                                               mmnorm.MABN(C_IN))).to(F64)
    x = torch.randn(2, C_IN, 6, 6, dtype=F64)
    expected = eval_output(model, x)
    fused = fuse(model)
    assert [type(m) for m in fused] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d,
                                        nn.BatchNorm2d]
    assert fused[0] is fused[3]
    torch.testing.assert_close(eval_output(fused, x), expected, rtol=1e-12, atol=1e-12)


def test_pairing_rule_on_mmdet_resnet_and_heads():
    """Every norm of MMDetection's ResNet, FPN and 4-conv heads is paired with
    the conv that feeds it, read from the traced forwards (the detector itself
    does not trace; its backbone, neck and heads do)."""
    model = build_mask_rcnn('MABN', 'CenConv')
    pairs, why = conv_norm_pairs(model, is_foldable_norm)
    norms = {name for name, m in model.named_modules() if isinstance(m, mmnorm.MABN)}
    assert set(pairs) == norms and not why
    assert {('backbone.bn1', 'backbone.conv1'),
            ('backbone.layer2.0.downsample.1', 'backbone.layer2.0.downsample.0'),
            ('backbone.layer4.1.bn2', 'backbone.layer4.1.conv2'),
            ('neck.lateral_convs.0.bn', 'neck.lateral_convs.0.conv'),
            ('roi_head.bbox_head.shared_convs.3.bn', 'roi_head.bbox_head.shared_convs.3.conv'),
            ('roi_head.mask_head.convs.3.bn', 'roi_head.mask_head.convs.3.conv')
            } <= set(pairs.items())


# ----------------------------------------------------------- Mask R-CNN
def build_mask_rcnn(norm_type, conv_type, channels=32, seed=0):
    """configs/demo/_base_.py's Mask R-CNN (ResNet-18, FPN, 4conv1fc box head,
    4-conv mask head) with 32 channels, 3 classes, ``norm_type`` and
    ``conv_type`` in the backbone, FPN and both heads."""
    import mmdet.models  # noqa: F401
    from mmengine.config import Config
    from mmengine.registry import MODELS, DefaultScope
    cfg = Config.fromfile(REPO / 'configs' / 'demo' / '_base_.py')
    model = cfg.model
    norm = (dict(type='GN', num_groups=8, requires_grad=True) if norm_type == 'GN'
            else dict(type=norm_type, requires_grad=True))
    model.neck.out_channels = channels
    model.rpn_head.update(in_channels=channels, feat_channels=channels)
    model.roi_head.bbox_roi_extractor.out_channels = channels
    model.roi_head.mask_roi_extractor.out_channels = channels
    model.roi_head.bbox_head.update(in_channels=channels, conv_out_channels=channels,
                                    fc_out_channels=64, num_classes=3)
    model.roi_head.mask_head.update(in_channels=channels, conv_out_channels=channels,
                                    num_classes=3)
    model.test_cfg.rcnn.max_per_img = 20
    for part in (model.backbone, model.neck, model.roi_head.bbox_head, model.roi_head.mask_head):
        part.norm_cfg, part.conv_cfg = norm, dict(type=conv_type)
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(model)


def demo_batch(seed):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(seed)
    return demo_mm_inputs(2, [(3, 96, 128)] * 2, num_items=[3, 3], num_classes=3,
                          with_mask=True)


def predict(model, batch):
    """``model.test_step(batch)`` with binary masks, and the mask
    probabilities of the same predictions (``mask_thr_binary=-1``)."""
    binary, soft = binary_and_soft(model, batch)
    return binary, [s.pred_instances.masks for s in soft]


@pytest.mark.parametrize('norm_type, conv_type', [('MABN', 'CenConv'), ('GN', 'WSConv')])
def test_mask_rcnn_predicts_the_same_after_fuse(norm_type, conv_type, one_thread):
    from mmengine.registry import DefaultScope
    model = build_mask_rcnn(norm_type, conv_type)
    if norm_type == 'MABN':
        # One training forward with momentum 0 makes running_var the second
        # moment of real activations (so eval activations are normalised).
        for m in model.modules():
            if isinstance(m, mmnorm.MABN):
                m.momentum = 0.0
    randomize_statistics(model)  # affine parameters; running_var is overwritten below
    model.train()
    with torch.no_grad(), DefaultScope.overwrite_default_scope('mmdet'):
        data = model.data_preprocessor(demo_batch(0), True)
        model(**data, mode='loss')
    norms = [m for m in model.modules() if isinstance(m, mmnorm.MABN)]
    assert all(m.num_batches_tracked == 1 and not torch.equal(m.running_var,
                                                              torch.ones_like(m.running_var))
               for m in norms)
    model.eval()
    before, soft_before = predict(model, demo_batch(1))
    report = SurgeryReport()
    fused = fuse(model, report, strict=True)
    assert not mmnorm_modules(fused)
    if norm_type == 'MABN':
        # backbone 20, FPN 8, box head 4, mask head 4: all folded.
        assert report.counts() == Counter({('folded', 'MABN'): 36, ('replaced', 'CenConv'): 36})
    else:
        assert report.counts() == Counter({('kept', 'GroupNorm'): 36, ('replaced', 'WSConv'): 36})
    assert not any(isinstance(m, mmnorm.MABN) for m in fused.modules())
    after, soft_after = predict(fused, demo_batch(1))
    for b, a, probabilities in zip(before, after, zip(soft_before, soft_after)):
        assert_same_instances(b.pred_instances, a.pred_instances, probabilities=probabilities)


EXPORT_FUSED_BACKBONE = """
import torch
from test_fuse import build_mask_rcnn, eval_output, randomize_statistics
from mmnorm import CBN, fuse

torch.set_num_threads(1)
# A CBN trained in the same process first: it leaves nothing behind that export traces.
trained = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), CBN(4))
trained(torch.randn(2, 3, 8, 8)).sum().backward()
backbone = build_mask_rcnn('MABN', 'CenConv').backbone
randomize_statistics(backbone)
x = torch.randn(1, 3, 64, 64)
expected = eval_output(backbone, x)
fused = fuse(backbone)
outputs = eval_output(fused, x)
for out, ref in zip(outputs, expected):
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
program = torch.export.export(fused, (x,))
targets = {node.target for node in program.graph.nodes if node.op == 'call_function'}
assert not any('batch_norm' in str(t) for t in targets), targets  # no norm left in the graph
exported = program.module()(x)
assert len(exported) == len(outputs) == 4
for out, ref in zip(exported, outputs):
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
print('exported')
"""


def test_fused_backbone_exports_with_torch_export():
    """onnx is not installed here, so the export route is torch.export (README,
    "Deployment and conversion", names both). In a fresh process that trains a
    CBN first: CBN used to install a process-wide forward hook, which torch
    2.1's strict export traced and refused (``id()`` of a tensor); it has none
    now."""
    out = run([sys.executable, '-c', EXPORT_FUSED_BACKBONE], cwd=REPO / 'tests' / 'surgery',
              env=tool_env(PYTHONPATH=str(REPO / 'tests'))).stdout
    assert out.strip().splitlines()[-1] == 'exported', out[-3000:]


def test_format_report_lists_each_action():
    report = SurgeryReport()
    for i in range(3):
        report.add(f'{i}.conv', mmnorm.CenConv(1, 1, 1), 'replaced', 'by Conv2d')
        report.add(f'{i}.bn', mmnorm.MABN(1), 'folded', f'into {i}.conv')
    assert format_report(report) == ['replaced: CenConv: 3', 'folded: MABN: 3', 'kept: none',
                                     'skipped: none']


# --------------------------------------------------------- the tools, end to end
CONFIG = REPO / 'tests' / 'configs' / 'tiny_mask_rcnn.py'
# The tiny config has BRN everywhere; MABN + CenConv in the backbone too.
MODEL_OPTIONS = ['model.backbone.norm_cfg.type=MABN', 'model.backbone.conv_cfg.type=CenConv']


@pytest.fixture(scope='module')
def deployed(tiny_coco_session, tmp_path_factory):
    """Train the tiny config 2 iterations, deploy the checkpoint, then test
    the deployed file and the checkpoint with tools/test.py (--out)."""
    root = tmp_path_factory.mktemp('deploy')
    options = tiny_coco_session.cfg_options() + MODEL_OPTIONS
    run([sys.executable, REPO / 'tools' / 'train.py', CONFIG, '--work-dir', root / 'train',
         '--cfg-options', *options, 'train_cfg.max_iters=2'])
    checkpoint, out = root / 'train' / 'iter_2.pth', root / 'deployed.pth'
    deploy_log = run([sys.executable, REPO / 'tools' / 'deploy.py', CONFIG, checkpoint, out,
                      '--cfg-options', *options]).stdout
    logs = {}
    for name, path in (('deployed', out), ('checkpoint', checkpoint)):
        logs[name] = run([sys.executable, REPO / 'tools' / 'test.py', CONFIG, path,
                          '--work-dir', root / f'test_{name}', '--out', root / f'{name}.pkl',
                          '--cfg-options', *options]).stdout
    return dict(root=root, checkpoint=checkpoint, out=out, deploy_log=deploy_log, logs=logs,
                options=options)


@pytest.mark.end_to_end
@pytest.mark.xdist_group('deployed')
def test_deploy_tool_reports_and_saves(deployed):
    log = deployed['deploy_log']
    # ResNet-18: 20 MABN + 20 CenConv; FPN 8 + 4-conv box head 4 + 2-conv mask head 2 BRN.
    assert '[mmnorm deploy] folded: BRN: 14, MABN: 20' in log
    assert '[mmnorm deploy] replaced: CenConv: 20' in log
    assert '[mmnorm deploy] kept: none' in log and '[mmnorm deploy] skipped: none' in log
    content = load_deployed(str(deployed['out']))
    assert content is not None and not mmnorm_modules(content['deployed_model'])
    assert content['meta']['checkpoint'] == str(deployed['checkpoint'])
    assert load_deployed(str(deployed['checkpoint'])) is None  # an ordinary checkpoint


@pytest.mark.end_to_end
@pytest.mark.xdist_group('deployed')
def test_test_tool_refuses_precise_bn_on_a_deployed_file(deployed):
    proc = run([sys.executable, REPO / 'tools' / 'test.py', CONFIG, deployed['out'],
                '--precise-bn', '2', '--work-dir', deployed['root'] / 'test_precise',
                '--cfg-options', *deployed['options']], check=False)
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1] == (
        f'error: --precise-bn needs a training checkpoint: the deployed model in '
        f'{deployed["out"]} has its norms folded away')


@pytest.mark.end_to_end
@pytest.mark.xdist_group('deployed')
def test_test_tool_evaluates_the_deployed_file_like_the_checkpoint(deployed):
    log = deployed['logs']['deployed']
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'):
        assert f'{key}:' in log
    assert 'evaluating the deployed (folded) model' in log
    assert 'Load checkpoint from' not in log
    assert 'Load checkpoint from' in deployed['logs']['checkpoint']
    preds = {}
    for name in ('deployed', 'checkpoint'):
        with open(deployed['root'] / f'{name}.pkl', 'rb') as f:
            preds[name] = pickle.load(f)
    assert len(preds['deployed']) == len(preds['checkpoint']) == 2
    for folded, original in zip(preds['deployed'], preds['checkpoint']):
        assert_same_instances(original['pred_instances'], folded['pred_instances'])


LOAD_WITHOUT_MMNORM = r'''
import sys
sys.modules['mmnorm'] = None  # any import of mmnorm now fails
import torch
content = torch.load(sys.argv[1], map_location='cpu', weights_only=False)
model = content['deployed_model'].eval()
assert not [m for m in model.modules() if type(m).__module__.startswith('mmnorm')]
assert not [k for k in sys.modules if k.startswith('mmnorm') and sys.modules[k] is not None]
with torch.no_grad():
    feats = model.extract_feat(torch.load(sys.argv[2]))
torch.save([f.clone() for f in feats], sys.argv[3])
print('loaded', type(model).__name__)
'''


@pytest.mark.end_to_end
@pytest.mark.xdist_group('deployed')
def test_deployed_file_loads_and_runs_without_mmnorm(deployed, tmp_path):
    from mmengine.config import Config
    from mmengine.registry import MODELS, DefaultScope
    torch.manual_seed(0)
    x = torch.randn(1, 3, 128, 128)
    torch.save(x, tmp_path / 'x.pt')
    proc = run([sys.executable, '-c', LOAD_WITHOUT_MMNORM, deployed['out'], tmp_path / 'x.pt',
                tmp_path / 'feats.pt'])
    assert 'loaded MaskRCNN' in proc.stdout
    # The same features as the unfused model with the checkpoint's weights.
    cfg = Config.fromfile(CONFIG)
    cfg.merge_from_dict(dict(option.split('=', 1) for option in MODEL_OPTIONS))
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    checkpoint = torch.load(deployed['checkpoint'], map_location='cpu', weights_only=False)
    model.load_state_dict(checkpoint['state_dict'], strict=True)
    assert any(isinstance(m, mmnorm.MABN) for m in model.modules())
    model.eval()
    with torch.no_grad():
        expected = model.extract_feat(x)
    for out, ref in zip(torch.load(tmp_path / 'feats.pt'), expected):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_load_deployed_leaves_other_files_alone(tmp_path):
    assert load_deployed(str(tmp_path / 'missing.pth')) is None
    legacy = tmp_path / 'legacy.pth'
    torch.save({'state_dict': {}}, legacy, _use_new_zipfile_serialization=False)
    assert load_deployed(str(legacy)) is None
    plain = tmp_path / 'module.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}}, plain)
    assert load_deployed(str(plain)) is None
    module = copy.deepcopy(nn.Conv2d(1, 1, 1))
    torch.save({'deployed_model': module, 'meta': {}}, plain)
    assert isinstance(load_deployed(str(plain))['deployed_model'], nn.Conv2d)
