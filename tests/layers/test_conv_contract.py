"""A third transformed-weight conv, defined here and registered, with no other
file edited: the conv contract of ``TransformedWeightConv`` (``transform_weight``
and ``OPTIONS``, docs/architecture.md) is all ``convert``, ``fuse`` and the plain
MMDetection pair read of a conv."""
import copy

import pytest
import torch
from mmengine.registry import MODELS
from torch import nn

import mmnorm
from mmnorm.checkpoints.plain_mmdet import check_plain_model, plain_conv_cfg, plain_state_dict
from mmnorm.layers import MABN, conv_types
from mmnorm.layers.base import TransformedWeightConv


class GainConv(TransformedWeightConv):
    """Conv2d whose filters are scaled by ``gain`` and shifted by their mean
    (a weight transform that fusing with the raw weight would get wrong)."""

    OPTIONS = ('gain',)

    def __init__(self, *args, gain=2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = gain

    def transform_weight(self, weight):
        return self.gain * weight + weight.mean(dim=(1, 2, 3), keepdim=True)


@pytest.fixture
def registered():
    MODELS.register_module(module=GainConv)
    try:
        yield
    finally:
        MODELS.module_dict.pop('GainConv')


def bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def test_a_registered_conv_is_converted_trained_folded_and_made_plain(registered):
    assert conv_types()['GainConv'] is GainConv
    model = mmnorm.convert(bn_model(), norm=dict(type='MABN'), conv=dict(type='GainConv',
                                                                           gain=3.0))
    assert isinstance(model[0], GainConv) and model[0].gain == 3.0
    assert isinstance(model[1], MABN)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(2, 3, 8, 8, generator=gen)).square().mean().backward()
        optimizer.step()
    model.eval()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    with torch.no_grad():
        want = model(x)
        folded = mmnorm.fuse(copy.deepcopy(model))
        assert not any(isinstance(m, (GainConv, MABN)) for m in folded.modules())
        torch.testing.assert_close(folded(x), want, rtol=1e-5, atol=1e-5)

    # the plain MMDetection pair: Conv2d without the option, the weight it used
    assert plain_conv_cfg(dict(type='GainConv', gain=3.0, bias=False)) == dict(
        type='Conv2d', bias=False)
    state, counts = plain_state_dict(model)
    assert counts['GainConv -> Conv2d'] == 1
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()
    plain.load_state_dict(state)
    check_plain_model(model, plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)
