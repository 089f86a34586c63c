"""The integration contract of every mmnorm norm layer, on real MMDetection modules.

Each layer is compared with what MMDetection does for ``dict(type='BN')`` on the
same module: names, freezing, weight decay, initialisation, SyncBN handling and
config errors.
"""
import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

import mmnorm
from mmnorm.engine.sync_bn import convert_sync_batchnorm
from mmnorm.layers.base import SmallBatchNorm

NORM_TYPES = ['BRN', 'CBN', 'MABN']


def build(module_cfg, norm_type):
    import mmdet.models  # noqa: F401  (registers MMDetection's modules)
    from mmengine.registry import DefaultScope
    cfg = dict(module_cfg, norm_cfg=dict(type=norm_type, requires_grad=True))
    # The heads build their coders and losses in the default scope, which an
    # earlier Runner in this process may have set to another library's.
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(cfg)


MODULES = {
    'resnet50': dict(type='mmdet.ResNet', depth=50, frozen_stages=-1, norm_eval=False),
    'fpn': dict(type='mmdet.FPN', in_channels=[256, 512, 1024, 2048], out_channels=64,
                num_outs=5),
    'box_head': dict(type='mmdet.Shared4Conv1FCBBoxHead', in_channels=64, conv_out_channels=64,
                     fc_out_channels=128, roi_feat_size=7, num_classes=3),
    'mask_head': dict(type='mmdet.FCNMaskHead', num_convs=4, in_channels=64, conv_out_channels=64,
                      num_classes=3),
}


def norm_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


@pytest.mark.parametrize('norm_type', NORM_TYPES)
@pytest.mark.parametrize('module', sorted(MODULES))
def test_names_match_batch_norm_and_bn_checkpoint_loads(module, norm_type):
    reference = build(MODULES[module], 'BN')
    model = build(MODULES[module], norm_type)
    ours = norm_layers(model)
    assert ours, 'the module has no norm layer'
    assert set(ours) == set(norm_layers(reference))
    assert all(isinstance(m, MODELS.get(norm_type)) for m in ours.values())
    if module == 'resnet50':
        assert {'bn1', 'layer1.0.bn1', 'layer1.0.downsample.1', 'layer4.2.bn3'} <= set(ours)
    if module == 'fpn':
        assert 'lateral_convs.0.bn' in ours
    # A BN checkpoint of the same module loads with strict key checking.
    with torch.no_grad():
        for layer in norm_layers(reference).values():
            layer.weight.uniform_(0.5, 2)
            layer.running_var.uniform_(0.5, 2)
    model.load_state_dict(reference.state_dict(), strict=True)
    for name, layer in ours.items():
        assert torch.equal(layer.weight, norm_layers(reference)[name].weight), name
        assert torch.equal(layer.running_var, norm_layers(reference)[name].running_var), name


@pytest.mark.parametrize('norm_type', NORM_TYPES)
def test_norm_eval_and_frozen_stages_freeze_like_batch_norm(norm_type):
    cfg = dict(MODULES['resnet50'], frozen_stages=1, norm_eval=False)
    reference, model = build(cfg, 'BN'), build(cfg, norm_type)
    reference.train()
    model.train()

    def freeze_pattern(m):
        return {name: (layer.training, layer.weight.requires_grad)
                for name, layer in norm_layers(m).items()}

    assert freeze_pattern(model) == freeze_pattern(reference)
    assert freeze_pattern(model)['layer1.0.bn1'] == (False, False)
    assert freeze_pattern(model)['layer2.0.bn1'] == (True, True)

    cfg = dict(MODULES['resnet50'], norm_eval=True)
    model = build(cfg, norm_type)
    model.train()
    assert not any(layer.training for layer in norm_layers(model).values())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(1, 3, 64, 64))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f'{name} changed under norm_eval'


@pytest.mark.parametrize('norm_type', NORM_TYPES)
def test_norm_decay_mult_applies_and_init_is_identity(norm_type):
    model = build(MODULES['box_head'], norm_type)
    model.init_weights()
    for layer in norm_layers(model).values():
        assert torch.equal(layer.weight, torch.ones_like(layer.weight))
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    wrapper = build_optim_wrapper(model, dict(
        optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=1e-4),
        paramwise_cfg=dict(norm_decay_mult=0.0)))
    decay = {id(p): g['weight_decay'] for g in wrapper.optimizer.param_groups for p in g['params']}
    for layer in norm_layers(model).values():
        assert decay[id(layer.weight)] == 0.0 and decay[id(layer.bias)] == 0.0
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(decay[id(c.weight)] == 1e-4 for c in convs)


@pytest.mark.parametrize('norm_type', NORM_TYPES)
def test_sync_bn_keeps_our_layers_and_converts_plain_batch_norm(norm_type):
    import mmengine.runner.runner as runner_module
    from mmengine.model import revert_sync_batchnorm

    assert runner_module.convert_sync_batchnorm is convert_sync_batchnorm
    model = torch.nn.Sequential(build(MODULES['fpn'], norm_type), torch.nn.BatchNorm2d(4))
    kinds = {name: type(m) for name, m in norm_layers(model).items()}
    converted = convert_sync_batchnorm(model, 'torch')
    for name, layer in norm_layers(converted).items():
        if name == '1':
            assert isinstance(layer, torch.nn.SyncBatchNorm)
        else:
            assert type(layer) is kinds[name], name
    # Single-process runs: MMEngine reverts SyncBN only; ours stay as built.
    model = build(MODULES['fpn'], norm_type)
    reverted = revert_sync_batchnorm(model)
    assert all(type(m) is MODELS.get(norm_type) for m in norm_layers(reverted).values())


@pytest.mark.parametrize('norm_type', NORM_TYPES)
def test_unknown_config_key_names_layer_type_and_key(norm_type):
    from mmcv.cnn import build_norm_layer
    with pytest.raises(TypeError, match=rf"{norm_type}.*'no_such_key'"):
        build_norm_layer(dict(type=norm_type, no_such_key=3), 8)
    with pytest.raises(ValueError, match=rf'{norm_type}: eps'):
        build_norm_layer(dict(type=norm_type, eps=-1.0), 8)


def test_every_registered_layer_is_real():
    for name in NORM_TYPES + ['CenConv', 'WSConv']:
        assert MODELS.get(name) is getattr(mmnorm, name)
        assert name not in NORM_TYPES or issubclass(MODELS.get(name), SmallBatchNorm)
    assert MODELS.get('ConvWS') is not None  # mmcv's own stays usable beside ours


@pytest.mark.parametrize('norm_type', NORM_TYPES)
@pytest.mark.parametrize('images', [1, 2])
def test_mask_rcnn_with_the_layer_everywhere_trains_then_predicts(norm_type, images):
    """ResNet-50 + FPN + 4conv1fc box head + 4-conv mask head, the layer in all
    of them and nothing frozen (configs/mask_rcnn_mabn.py's model with the norm
    swapped): 3 training iterations with finite losses, then prediction."""
    import mmdet.models  # noqa: F401
    from mmdet.testing import demo_mm_inputs
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper

    from conftest import REPO
    cfg = Config.fromfile(REPO / 'configs' / 'mask_rcnn_mabn.py')
    norm = dict(type=norm_type, requires_grad=True)
    conv = dict(type='CenConv') if norm_type == 'MABN' else None
    for part in (cfg.model.backbone, cfg.model.neck, cfg.model.roi_head.bbox_head,
                 cfg.model.roi_head.mask_head):
        part.norm_cfg, part.conv_cfg = norm, conv
    # Fewer sampled RoIs than the 512 of training on COCO, for the CPU's sake.
    cfg.merge_from_dict({'model.train_cfg.rcnn.sampler.num': 64,
                         'model.train_cfg.rpn_proposal.max_per_img': 200})
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert all(type(m).__name__ == norm_type for m in norm_layers(model).values())
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    model.train()
    for step in range(3):
        batch = demo_mm_inputs(images, [(3, 128, 160)] * images, num_items=[3] * images,
                               num_classes=80, with_mask=True)
        losses = model.train_step(batch, optim)
        assert all(torch.isfinite(v).all() for v in losses.values()), (step, losses)
    model.eval()
    with torch.no_grad():
        results = model.test_step(demo_mm_inputs(images, [(3, 128, 160)] * images,
                                                 num_classes=80, with_mask=True))
    assert len(results) == images
    for result in results:
        assert {'bboxes', 'scores', 'masks'} <= set(result.pred_instances.keys())
        assert torch.isfinite(result.pred_instances.scores).all()
