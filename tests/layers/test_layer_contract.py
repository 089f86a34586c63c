"""A fifth norm layer, defined here and registered, with no other file edited:
the layer contract of ``SmallBatchNorm`` (docs/architecture.md, "Adding a
method") is all the rest of mmnorm needs to check its config, convert a
model to it, train, resume, recompute its statistics, fold it and reload it."""
import copy

import pytest
import torch
from mmengine.registry import MODELS
from torch import nn

import mmnorm
from mmnorm.engine.config_check import ConfigError, check_layer_cfgs
from mmnorm.engine.precise_bn import precise_statistics
from mmnorm.layers import norm_types
from mmnorm.layers.base import SmallBatchNorm, check_number


class StartNorm(SmallBatchNorm):
    """BatchNorm whose running statistics average the first steps equally:
    the update weight is max(momentum, 1 / t), so the step counter is hidden
    state that a resume must restore. ``shrink`` in [0, 1] pulls the batch
    mean used for the output towards running_mean."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, shrink=0.0, sync_stats=False):
        super().__init__(num_features, eps, momentum, sync_stats)
        self.shrink = check_number(type(self).__name__, 'shrink', shrink, minimum=0,
                                   exclusive=False)
        if shrink > 1:
            raise ValueError(f'{type(self).__name__}: shrink must be <= 1, got {shrink!r}')

    def _train_forward(self, x, sync):
        dims, shape = self.reduce_dims(x), self.channel_shape(x)
        var, mean = torch.var_mean(x, dims, correction=0)
        with torch.no_grad():
            weight = torch.clamp(1.0 / self.num_batches_tracked, min=self.momentum)
            count = x.numel() // x.size(1)
            self.running_mean.lerp_(mean, weight)
            self.running_var.lerp_(var * count / max(count - 1, 1), weight)
        centre = mean + self.shrink * (self.running_mean - mean).detach()
        scale = self.weight / (var + (centre - mean) ** 2 + self.eps).sqrt()
        return (x - centre.view(shape)) * scale.view(shape) + self.bias.view(shape)


@pytest.fixture
def registered():
    MODELS.register_module(module=StartNorm)
    try:
        yield
    finally:
        MODELS.module_dict.pop('StartNorm')


def model_with_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    return model.eval()


def batches(count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 6, 6, generator=gen) * 2 + 1 for _ in range(count)]


def train(model, data):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in data:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return model


def test_a_registered_layer_is_found_by_the_registry(registered):
    assert norm_types()['StartNorm'] is StartNorm
    assert StartNorm.hyperparameters() == ('eps', 'momentum', 'shrink', 'sync_stats')
    assert 'shrink=0.5' in repr(StartNorm(4, shrink=0.5))


def test_config_check_names_a_misspelled_key_and_a_bad_value(registered):
    def cfg(**options):
        return dict(model=dict(type='Detector', norm_cfg=dict(type='StartNorm', **options)))

    check_layer_cfgs(cfg(shrink=0.5))
    with pytest.raises(ConfigError, match="StartNorm has no option 'shrnk' .*'shrink'"):
        check_layer_cfgs(cfg(shrnk=0.5))
    with pytest.raises(ConfigError, match='shrink must be <= 1'):
        check_layer_cfgs(cfg(shrink=2.0))


def test_convert_train_resume_precise_fold_and_reload(registered, tmp_path):
    model = model_with_bn()
    x = batches(1, seed=1)[0]
    before = model(x)
    model = mmnorm.convert(model, norm=dict(type='StartNorm', shrink=0.5), conv=None,
                           strict=True)
    assert type(model[1]) is StartNorm
    torch.testing.assert_close(model.eval()(x), before)  # BN's inference kept

    # trained, and resumed exactly from a checkpoint written mid-way
    data = batches(6)
    whole = train(copy.deepcopy(model), data)
    first = train(copy.deepcopy(model), data[:3])
    torch.save(first.state_dict(), tmp_path / 'mid.pth')
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(torch.load(tmp_path / 'mid.pth'), strict=True)
    resumed = train(resumed, data[3:])
    assert int(resumed[1].num_batches_tracked) == 6
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key

    # PreciseBN: the population statistics of the layer's inputs over the batches
    precise_statistics(whole, data, num_iters=len(data))
    with torch.no_grad():
        inputs = torch.cat([whole[0](b) for b in data]).double()
    var, mean = torch.var_mean(inputs, (0, 2, 3), correction=1)
    torch.testing.assert_close(whole[1].running_mean, mean.float())
    torch.testing.assert_close(whole[1].running_var, var.float())
    assert int(whole[1].num_batches_tracked) == 6  # hidden state left as it was

    # folded into the conv: the same inference, no StartNorm left
    expected = whole.eval()(x)
    folded = mmnorm.fuse(copy.deepcopy(whole), strict=True)
    assert not any(isinstance(m, StartNorm) for m in folded.modules())
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


def test_a_layer_names_itself_from_where_it_was_registered():
    layer = StartNorm(4)
    assert layer.describe() == 'StartNorm(4)'  # not a submodule
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.ReLU(), layer))
    assert layer.describe() == "StartNorm '1.1'"
    nn.DataParallel(model)  # the wrapper registers the model as 'module': left out
    assert layer.describe() == "StartNorm '1.1'"
    model[1][1] = nn.Identity()  # replaced: a submodule of nothing now
    assert layer.describe() == 'StartNorm(4)'
