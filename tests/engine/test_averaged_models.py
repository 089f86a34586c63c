"""Averaged models (mmengine's EMAHook with ExponentialMovingAverage or
MMDetection's ExpMomentumEMA) with every layer: the copy made before the first
step follows the model, its running statistics averaged (update_buffers=True)
or copied (False), its counters, windows and rings copied
(mmnorm.engine.averaged_models, docs/layer_state.md "Averaged models")."""
import math
import sys

import pytest
import torch
from mmengine.model import ExponentialMovingAverage
from torch import nn

from mmnorm import BRN, CBN, MABN

from conftest import REPO, run

LAYERS = {'MABN': lambda: MABN(4), 'BRN': lambda: BRN(4),
          'CBN': lambda: CBN(4, buffer_num=2, burnin=0)}


def ema_classes():
    classes = [ExponentialMovingAverage]
    try:
        from mmdet.models.layers import ExpMomentumEMA
        classes.append(ExpMomentumEMA)
    except ImportError:  # pragma: no cover - mmdet is installed on both stacks
        pass
    return classes


def expected_momentum(ema, steps):
    """The weight of the new value at update ``steps`` (> 0), from the classes'
    documented formulas."""
    if type(ema).__name__ == 'ExpMomentumEMA':
        return (1 - ema.momentum) * math.exp(-float(1 + steps) / ema.gamma) + ema.momentum
    return ema.momentum


@pytest.mark.parametrize('update_buffers', [True, False])
@pytest.mark.parametrize('ema_class', ema_classes(), ids=lambda c: c.__name__)
@pytest.mark.parametrize('kind', LAYERS)
def test_averaged_model_follows_every_layer(kind, ema_class, update_buffers):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), LAYERS[kind]())
    ema = ema_class(model, momentum=0.3, update_buffers=update_buffers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    averaged = {}  # the running statistics as the documented formula averages them
    for step in range(4):
        model(torch.randn(2, 3, 6, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update_parameters(model)
        for name, value in model[1].named_buffers():
            if name in ('running_mean', 'running_var'):
                if step == 0 or not update_buffers:
                    averaged[name] = value.clone()
                else:
                    weight = expected_momentum(ema, step)
                    averaged[name] = averaged[name] + weight * (value - averaged[name])
    mine = dict(ema.module[1].named_buffers())
    for name, value in model[1].named_buffers():
        if name in averaged:
            torch.testing.assert_close(mine[name], averaged[name], rtol=1e-5, atol=1e-6,
                                       msg=name)
        else:  # counters, windows, rings: copied
            assert torch.equal(mine[name], value), name
    if update_buffers:
        assert not torch.equal(mine['running_var'], model[1].running_var)
    ema.eval()
    with torch.no_grad():
        assert torch.isfinite(ema(torch.randn(2, 3, 6, 6))).all()


def test_averaged_model_resumes_cbn_from_a_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CBN(4, buffer_num=2, burnin=0))
    ema = ExponentialMovingAverage(model, momentum=0.3, update_buffers=True)
    for _ in range(2):
        model(torch.randn(2, 3, 6, 6)).square().mean().backward()
        ema.update_parameters(model)
    fresh = ExponentialMovingAverage(nn.Sequential(nn.Conv2d(3, 4, 3), CBN(4, buffer_num=2)),
                                     momentum=0.3, update_buffers=True)
    fresh.load_state_dict(ema.state_dict())
    model(torch.randn(2, 3, 6, 6)).square().mean().backward()
    fresh.update_parameters(model)  # the loaded ring has the model's shapes
    assert torch.equal(fresh.module[1].history_weight, model[1].history_weight)


EMA_CONFIG = """_base_ = {base!r}
model = dict(backbone=dict(norm_cfg=dict(type={norm!r}, requires_grad=True)))
custom_hooks = [dict(type='EMAHook', ema_type={ema!r}, momentum=0.001,
                     update_buffers={update!r}, priority=49)]
"""


@pytest.mark.end_to_end
@pytest.mark.parametrize('norm, ema, update', [
    ('CBN', 'ExpMomentumEMA', True), ('MABN', 'ExponentialMovingAverage', False),
    ('BRN', 'ExpMomentumEMA', True)])
def test_ema_hook_trains_and_evaluates_with_every_layer(norm, ema, update, tiny_coco_session,
                                                        tmp_path):
    config = tmp_path / 'ema.py'
    config.write_text(EMA_CONFIG.format(base=str(REPO / 'tests' / 'configs' / 'tiny_mask_rcnn.py'),
                                        norm=norm, ema=ema, update=update))
    proc = run([sys.executable, REPO / 'tools' / 'train.py', config, '--work-dir',
                tmp_path / 'work', '--cfg-options', *tiny_coco_session.cfg_options(),
                'train_cfg.max_iters=2', 'train_cfg.val_interval=2',
                'default_hooks.checkpoint.interval=2'])
    assert 'coco/bbox_mAP' in proc.stdout  # the EMA model was evaluated
    checkpoint = torch.load(tmp_path / 'work' / 'iter_2.pth', map_location='cpu',
                            weights_only=False)
    ema_state = checkpoint['ema_state_dict']
    assert any(key.endswith('num_batches_tracked') for key in ema_state)
    if norm == 'CBN':
        rings = [key for key in ema_state if key.endswith('history_weight')]
        assert rings and all(ema_state[key].numel() > 0 for key in rings)
