"""Every COCO config under configs/: its layers are the ones its row names, it
trains and evaluates through tools/train.py and tools/test.py on a tiny COCO
set laid out as COCO 2017 is, and it stops with a useful message without COCO.

The tools run in a scratch directory holding ``data/coco`` (the tiny set) and
``checkpoints/`` (locally built files in the layouts the ImageNet-initialised
configs expect), so the configs' own paths are used. Only sizes are overridden
(image scale, batch, epochs, workers, sampled RoIs), and the detection score
threshold, so that an untrained model's detections reach the evaluator.
"""
import re
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import REPO, run, write_tiny_coco

CONFIGS = sorted(p.name for p in (REPO / 'configs').glob('mask_rcnn_*.py'))
SCALE = '(96,96)'
OVERRIDES = [
    f'train_dataloader.dataset.pipeline.2.scale={SCALE}',
    f'val_dataloader.dataset.pipeline.1.scale={SCALE}',
    f'test_dataloader.dataset.pipeline.1.scale={SCALE}',
    'train_dataloader.batch_size=2', 'train_cfg.max_epochs=1',
    'model.train_cfg.rpn_proposal.max_per_img=64', 'model.train_cfg.rcnn.sampler.num=32',
    'model.test_cfg.rpn.max_per_img=64', 'model.test_cfg.rcnn.score_thr=0.0',
    'model.test_cfg.rcnn.max_per_img=10',
] + [f'{loader}_dataloader.{key}' for loader in ('train', 'val', 'test')
     for key in ('num_workers=0', 'persistent_workers=False')]

# config -> (norm in the backbone, in the neck and heads, conv type in them)
EXPECTED = {
    'mask_rcnn_bn_scratch.py': ('BatchNorm2d', 'BatchNorm2d', 'Conv2d'),
    'mask_rcnn_brn_scratch.py': ('BRN', 'BRN', 'Conv2d'),
    'mask_rcnn_mabn.py': ('MABN', 'MABN', 'CenConv'),
    'mask_rcnn_mabn_1img.py': ('MABN', 'MABN', 'CenConv'),
    'mask_rcnn_mabn_imagenet.py': ('MABN', 'MABN', 'CenConv'),
    'mask_rcnn_syncbn_scratch.py': ('SyncBatchNorm', 'SyncBatchNorm', 'Conv2d'),
    'mask_rcnn_syncbn_imagenet.py': ('SyncBatchNorm', 'SyncBatchNorm', 'Conv2d'),
    'mask_rcnn_frozenbn_1x.py': ('BatchNorm2d', None, 'Conv2d'),
    'mask_rcnn_syncbn_heads_1x.py': ('BatchNorm2d', 'SyncBatchNorm', 'Conv2d'),
    'mask_rcnn_gn_heads_1x.py': ('BatchNorm2d', 'GroupNorm', 'Conv2d'),
    'mask_rcnn_cbn_1x.py': ('BatchNorm2d', 'CBN', 'Conv2d'),
    'mask_rcnn_gnws_2x.py': ('GroupNorm', 'GroupNorm', 'WSConv'),
    'mask_rcnn_gnws_20-23-24e.py': ('GroupNorm', 'GroupNorm', 'WSConv'),
}


def build_model(config):
    import mmdet.models  # noqa: F401
    from mmengine.registry import MODELS

    import mmnorm  # noqa: F401
    return MODELS.build(Config.fromfile(REPO / 'configs' / config).model)


def test_every_config_has_an_expectation():
    assert sorted(EXPECTED) == CONFIGS


@pytest.mark.parametrize('config', CONFIGS)
def test_layers_are_the_rows(config):
    backbone_norm, head_norm, conv = EXPECTED[config]
    model = build_model(config)
    norms = {name: type(m).__name__ for name, m in model.named_modules()
             if isinstance(m, (_BatchNorm, torch.nn.GroupNorm))}
    assert norms['backbone.bn1' if backbone_norm != 'GroupNorm' else 'backbone.gn1'] \
        == backbone_norm
    heads = [n for n in norms if n.startswith(('neck.', 'roi_head.'))]
    if head_norm is None:
        assert not heads
    else:
        assert heads and {norms[n] for n in heads} == {head_norm}
        assert any(n.startswith('roi_head.bbox_head.shared_convs') for n in heads)
        assert any(n.startswith('roi_head.mask_head.convs') for n in heads)
    assert not any(n.startswith('rpn_head') for n in norms)
    convs = {type(m).__name__ for name, m in model.named_modules()
             if name.startswith(('backbone.layer', 'neck.', 'roi_head.mask_head.convs'))
             and isinstance(m, torch.nn.Conv2d)}
    assert convs == {conv}


def test_mabn_window_spans_32_images():
    for config, images_per_gpu in (('mask_rcnn_mabn.py', 2), ('mask_rcnn_mabn_1img.py', 1)):
        cfg = Config.fromfile(REPO / 'configs' / config)
        assert cfg.train_dataloader.batch_size == images_per_gpu
        window = {m.buffer_size for m in build_model(config).modules() if hasattr(m, 'buffer_size')}
        assert window == {32 // images_per_gpu}


def write_checkpoints(directory):
    """The ImageNet files the configs name, built locally in their layouts:
    torchvision's ResNet-50 (with its fc), an MMDetection ResNet-50 with MABN +
    CenConv, and one with GN + WS."""
    import mmdet.models  # noqa: F401
    from mmengine.registry import MODELS

    import mmnorm  # noqa: F401
    directory.mkdir()
    base = dict(type='mmdet.ResNet', depth=50)
    torchvision_layout = MODELS.build(base).state_dict()
    torchvision_layout.update({'fc.weight': torch.zeros(1000, 2048), 'fc.bias': torch.zeros(1000)})
    torch.save(torchvision_layout, directory / 'resnet50_torchvision.pth')
    mabn = MODELS.build(dict(base, norm_cfg=dict(type='MABN'), conv_cfg=dict(type='CenConv')))
    torch.save(mabn.state_dict(), directory / 'resnet50_mabn_cenconv_imagenet.pth')
    gnws = MODELS.build(dict(base, norm_cfg=dict(type='GN', num_groups=32),
                             conv_cfg=dict(type='WSConv')))
    torch.save(gnws.state_dict(), directory / 'resnet50_gn_ws_imagenet.pth')


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp('coco_workspace')
    from mmdet.datasets import CocoDataset
    # All 80 categories (the evaluator maps every predicted label); shapes use the first two.
    write_tiny_coco(root / 'data' / 'coco', classes=CocoDataset.METAINFO['classes'],
                    coco_layout=True)
    write_checkpoints(root / 'checkpoints')
    return root


@pytest.mark.parametrize('config', CONFIGS)
@pytest.mark.end_to_end
def test_config_trains_and_evaluates(config, workspace, tmp_path):
    path = REPO / 'configs' / config
    work_dir = tmp_path / 'work'
    out = run([sys.executable, REPO / 'tools' / 'train.py', path, '--work-dir', work_dir,
               '--cfg-options', *OVERRIDES], cwd=workspace).stdout
    assert re.search(r'Epoch\(train\)\s+\[1\]\[2/2\]', out), out[-3000:]
    assert 'coco/bbox_mAP' in out and 'coco/segm_mAP' in out
    init = Config.fromfile(path).model.backbone.get('init_cfg') or {}
    if init.get('checkpoint'):
        assert f'Loads checkpoint by local backend from path: {init["checkpoint"]}' in out
    checkpoint = work_dir / 'epoch_1.pth'
    assert checkpoint.is_file()
    out = run([sys.executable, REPO / 'tools' / 'test.py', path, checkpoint,
               '--work-dir', tmp_path / 'test', '--cfg-options', *OVERRIDES], cwd=workspace).stdout
    assert re.search(r'coco/segm_mAP: -?\d', out), out[-3000:]


@pytest.mark.end_to_end
def test_config_without_coco_stops_with_a_message(tmp_path):
    proc = run([sys.executable, REPO / 'tools' / 'train.py',
                REPO / 'configs' / 'mask_rcnn_mabn.py', '--work-dir', tmp_path / 'work'],
               cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stdout, proc.stdout[-3000:]
    assert 'Looked for:' in proc.stdout
    assert str(Path(tmp_path) / 'data/coco/annotations/instances_train2017.json') in proc.stdout
    assert 'cocodataset.org' in proc.stdout
    options = ('train_dataloader.dataset.data_root=/path/to/coco/ '
               'val_dataloader.dataset.data_root=/path/to/coco/ '
               'test_dataloader.dataset.data_root=/path/to/coco/ '
               'val_evaluator.ann_file=/path/to/coco/annotations/instances_val2017.json '
               'test_evaluator.ann_file=/path/to/coco/annotations/instances_val2017.json')
    assert f'--cfg-options {options}' in proc.stdout


@pytest.mark.parametrize('config', [*CONFIGS, 'demo/mask_rcnn_r18_mabn.py'])
def test_the_hint_moves_every_data_path_of_the_config(config, tmp_path):
    """With the hint's options, every file the train and test phases read is
    looked for under the new root, nothing under the old one."""
    from mmnorm.engine.data_check import DataNotFoundError, check_data_present, moving_options
    cfg = Config.fromfile(REPO / 'configs' / config)
    new_root = f'{tmp_path}/moved/'
    options = moving_options(cfg, new_root)
    assert len(options) == 5  # 3 loaders, 2 evaluators
    cfg.merge_from_dict(dict(option.split('=', 1) for option in options))
    for phase in ('train', 'test'):
        with pytest.raises(DataNotFoundError) as error:
            check_data_present(cfg, phase)
        looked = [line.split()[-1] for line in str(error.value).splitlines()
                  if line.startswith('  MISSING')]
        assert looked and all(path.startswith(new_root) for path in looked), looked
