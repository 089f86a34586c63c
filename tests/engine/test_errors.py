"""Mistakes in the tools' input end in one line, ``error: ...``, with exit
status 1 and no traceback unless asked for: the config checks of
mmnorm.engine.config_check, and the checkpoint check of every tool that reads a
checkpoint."""
import glob
import sys

import pytest
from mmengine.config import Config

from mmnorm.engine.config_check import ConfigError, check_layer_cfgs

from conftest import REPO, run, tool_env

MABN_CONFIG = REPO / 'configs' / 'demo' / 'mask_rcnn_r18_mabn.py'
TINY_CONFIG = REPO / 'tests' / 'configs' / 'tiny_mask_rcnn.py'


def model_cfg(**layers):
    return Config(dict(model=dict(type='MaskRCNN', backbone=dict(type='ResNet', **layers),
                                  roi_head=dict(bbox_head=[dict(norm_cfg=dict(type='BN'))]))))


@pytest.mark.parametrize('layers, message', [
    (dict(norm_cfg=dict(type='MABN', buffer_size=0)),
     'model.backbone.norm_cfg: MABN: buffer_size must be > 0, got 0'),
    (dict(norm_cfg=dict(type='MABN', bufer_size=16)),
     "model.backbone.norm_cfg: MABN has no option 'bufer_size' (did you mean 'buffer_size'?); "
     'MABN takes: type, requires_grad, eps, momentum, buffer_size, warmup_iters, '
     'renorm_start_iter, rmax, sync_stats'),
    (dict(norm_cfg=dict(type='BRN', rmax=0.5)), 'model.backbone.norm_cfg: BRN: rmax must be'),
    (dict(conv_cfg=dict(type='WSConv', epss=1e-5)),
     "model.backbone.conv_cfg: WSConv has no option 'epss' (did you mean 'eps'?); "
     'WSConv takes: type, eps, stride, padding, dilation, groups, bias, padding_mode, '
     'device, dtype'),
])
def test_layer_mistakes_name_where_what_and_the_allowed(layers, message):
    with pytest.raises(ConfigError) as error:
        check_layer_cfgs(model_cfg(**layers))
    assert str(error.value).startswith(message)


def test_a_mistake_in_a_list_is_located_by_index():
    cfg = model_cfg(norm_cfg=dict(type='BN'))
    cfg.model.roi_head.bbox_head[0].norm_cfg = dict(type='CBN', buffer_num=-1)
    with pytest.raises(ConfigError, match=r'^model\.roi_head\.bbox_head\[0\]\.norm_cfg: CBN: '):
        check_layer_cfgs(cfg)


def test_every_config_of_the_project_passes():
    for path in sorted(glob.glob(str(REPO / 'configs' / '**' / '*.py'), recursive=True)):
        if '_base_' not in path:
            check_layer_cfgs(Config.fromfile(path))


def train(*args, env=None):
    return run([sys.executable, REPO / 'tools' / 'train.py', *map(str, args)],
               env=env, check=False)


def assert_one_line_error(proc, message):
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert lines[-1] == f'error: {message}'
    assert 'Traceback' not in proc.stdout
    assert len(lines) <= 3  # at most mmnorm's trusted-loading note before it


@pytest.mark.end_to_end
def test_train_reports_a_bad_value_in_one_line(tmp_path):
    proc = train(MABN_CONFIG, '--work-dir', tmp_path, '--cfg-options',
                 'model.backbone.norm_cfg.buffer_size=0')
    assert_one_line_error(proc, 'model.backbone.norm_cfg: MABN: buffer_size must be > 0, got 0')


@pytest.mark.end_to_end
def test_train_names_the_closest_key_of_a_misspelled_one(tmp_path):
    proc = train(MABN_CONFIG, '--work-dir', tmp_path, '--cfg-options',
                 'model.backbone.norm_cfg.bufer_size=16')
    assert proc.stdout.strip().splitlines()[-1].startswith(
        "error: model.backbone.norm_cfg: MABN has no option 'bufer_size' "
        "(did you mean 'buffer_size'?); MABN takes: ")
    assert_one_line_error(proc, proc.stdout.strip().splitlines()[-1][len('error: '):])


@pytest.mark.end_to_end
def test_train_names_the_closest_config_of_a_missing_one(tmp_path):
    proc = train('configs/demo/mask_rcnn_r18_mabm.py')
    assert_one_line_error(proc, 'config file configs/demo/mask_rcnn_r18_mabm.py does not exist; '
                          'did you mean configs/demo/mask_rcnn_r18_mabn.py or '
                          'configs/demo/mask_rcnn_r18_bn.py or configs/demo/mask_rcnn_r18_cbn.py?')


@pytest.mark.parametrize('how', ['--debug', 'MMNORM_DEBUG=1'])
@pytest.mark.end_to_end
def test_the_traceback_is_shown_when_asked_for(tmp_path, how):
    args = [MABN_CONFIG, '--work-dir', tmp_path, '--cfg-options',
            'model.backbone.norm_cfg.buffer_size=0']
    if how == '--debug':
        proc = train(*args, '--debug')
    else:
        proc = train(*args, env=tool_env(MMNORM_DEBUG='1'))
    assert proc.returncode == 1
    assert 'Traceback (most recent call last)' in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == (
        'mmnorm.engine.config_check.ConfigError: model.backbone.norm_cfg: MABN: buffer_size '
        'must be > 0, got 0')


@pytest.fixture(scope='module')
def truncated(tmp_path_factory):
    """A real checkpoint (zip format) cut to half its size."""
    import torch
    folder = tmp_path_factory.mktemp('truncated')
    torch.save({'state_dict': {'w': torch.zeros(1000)}, 'meta': {}}, folder / 'whole.pth')
    data = (folder / 'whole.pth').read_bytes()
    (folder / 'half.pth').write_bytes(data[:len(data) // 2])
    return folder / 'half.pth'


@pytest.mark.parametrize('tool, args, what', [
    ('deploy.py', [MABN_CONFIG, '{ckpt}', '{out}'], 'checkpoint'),
    ('test.py', [TINY_CONFIG, '{ckpt}', '--cfg-options', '{data}'], 'checkpoint'),
    ('convert_checkpoint.py', ['{ckpt}', '{out}', '--from', 'torchvision', '--norm', 'MABN'],
     'source checkpoint'),
])
@pytest.mark.end_to_end
def test_every_tool_refuses_a_truncated_checkpoint_in_one_line(truncated, tiny_coco_session,
                                                               tmp_path, tool, args, what):
    args = [str(a).format(ckpt=truncated, out=tmp_path / 'out.pth', data='{data}') for a in args]
    if '{data}' in args:  # the data check comes first: give it the tiny data set
        at = args.index('{data}')
        args[at:at + 1] = tiny_coco_session.cfg_options()
    proc = run([sys.executable, REPO / 'tools' / tool, *args], check=False)
    assert_one_line_error(proc, f'{what} {truncated} cannot be used: truncated or corrupt: the '
                          'zip directory at its end is missing or damaged (File is not a zip '
                          f'file); the file has {truncated.stat().st_size} bytes')
    assert not (tmp_path / 'out.pth').exists()
