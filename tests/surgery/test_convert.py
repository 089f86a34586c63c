"""mmnorm.convert (README.md, "Deployment and conversion").

torchvision is not installed here, so :class:`TorchvisionLayoutResNet` is a
small ResNet with torchvision's module names and registration order (stem
conv1/bn1/relu/maxpool, layer1..layer4 of BasicBlocks conv1/bn1/relu/conv2/bn2/
downsample = Sequential(conv, bn), avgpool, fc).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmnorm
from mmnorm.surgery.convert import convert
from mmnorm.surgery.fuse import fuse

F64 = torch.float64


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TorchvisionLayoutResNet(nn.Module):
    def __init__(self, widths=(8, 16, 32, 64), num_classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f'layer{i + 1}', nn.Sequential(BasicBlock(cin, width, stride),
                                                         BasicBlock(width, width, 1)))
            cin = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def pretrained_resnet(seed=0):
    """The model with BatchNorm statistics as after training (random, not 0/1)."""
    torch.manual_seed(seed)
    model = TorchvisionLayoutResNet()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(1000)
    return model


def modules_of(model, cls):
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}


FED_CONVS = ['conv1', 'layer1.0.conv1', 'layer1.0.conv2', 'layer2.0.conv1',
             'layer2.0.downsample.0', 'layer4.1.conv2']


def test_mabn_cenconv_conversion_keeps_weights_and_statistics():
    original = pretrained_resnet()
    model = convert(copy.deepcopy(original), norm=dict(type='MABN'), conv=dict(type='CenConv'))
    bns = modules_of(original, nn.BatchNorm2d)
    mabns = modules_of(model, mmnorm.MABN)
    assert set(mabns) == set(bns) and len(bns) == 20
    assert not modules_of(model, nn.BatchNorm2d)
    convs = modules_of(model, nn.Conv2d)
    assert all(type(c) is mmnorm.CenConv for c in convs.values())  # every conv feeds a BN
    assert set(FED_CONVS) <= set(convs)
    assert type(model.fc) is nn.Linear and torch.equal(model.fc.weight, original.fc.weight)
    old_state = original.state_dict()
    for name, conv in convs.items():
        assert torch.equal(conv.weight, old_state[f'{name}.weight']), name
        assert conv.stride == modules_of(original, nn.Conv2d)[name].stride
    for name, layer in mabns.items():
        bn = bns[name]
        # MABN's running_var is the second moment: var + mean^2; weight and
        # bias are rescaled so that inference stays BN's.
        second_moment = bn.running_var + bn.running_mean ** 2
        torch.testing.assert_close(layer.running_var, second_moment)
        bn_std = (bn.running_var + bn.eps).sqrt()
        rescaled = bn.weight * (second_moment + layer.eps).sqrt() / bn_std
        torch.testing.assert_close(layer.weight, rescaled)
        torch.testing.assert_close(layer.bias, bn.bias - bn.weight * bn.running_mean / bn_std)
        assert layer.num_batches_tracked == 0 and not layer.buffer_x2.any()
        assert layer.training


def test_converted_resnet_trains_three_sgd_steps_at_two_images(one_thread):
    model = convert(pretrained_resnet()).train()  # default: MABN + CenConv
    assert isinstance(model.layer3[0].bn2, mmnorm.MABN)
    assert isinstance(model.layer3[0].downsample[0], mmnorm.CenConv)
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    torch.manual_seed(1)
    for _ in range(3):
        x, target = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2,))
        loss = F.cross_entropy(model(x), target)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
    for layer in modules_of(model, mmnorm.MABN).values():
        assert layer.num_batches_tracked == 3
        assert layer.buffer_x2[1:4].gt(0).all() and layer.buffer_gz[1:4].ne(0).any()
    assert not torch.equal(model.conv1.weight, before['conv1.weight'])


def test_mabn_without_conv_keeps_the_convs_and_takes_extra_keys():
    original = pretrained_resnet()
    model = copy.deepcopy(original).eval()
    convs = modules_of(model, nn.Conv2d)
    model = convert(model, norm=dict(type='MABN', buffer_size=4, momentum=0.9), conv=None)
    assert modules_of(model, nn.Conv2d) == convs  # the very same modules
    assert all(type(c) is nn.Conv2d for c in convs.values())
    for layer in modules_of(model, mmnorm.MABN).values():
        assert layer.buffer_x2.shape == (4, layer.num_features)
        assert layer.momentum == 0.9 and not layer.training  # eval mode kept
    # With plain convs the converted stem computes what the BN stem computed.
    x = torch.randn(2, 3, 32, 32)
    bn = original.bn1.eval()
    u = original.conv1(x)
    expected = (bn.weight.view(1, -1, 1, 1) * (u - bn.running_mean.view(1, -1, 1, 1))
                / (bn.running_var + bn.eps).sqrt().view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
    with torch.no_grad():
        torch.testing.assert_close(model.bn1(model.conv1(x)), expected)


@pytest.mark.parametrize('norm_type, conv', [('BRN', None), ('CBN', None),
                                             ('BRN', dict(type='WSConv'))])
def test_convert_then_fuse_gives_plain_convs_and_the_same_eval_output(norm_type, conv):
    original = pretrained_resnet().to(F64).eval()
    x = torch.randn(2, 3, 48, 48, dtype=F64)
    with torch.no_grad():
        reference = original(x)
    model = convert(copy.deepcopy(original), norm=dict(type=norm_type), conv=conv)
    layers = modules_of(model, getattr(mmnorm, norm_type))
    assert len(layers) == 20
    for name, layer in layers.items():  # BN's running statistics are kept as they are
        bn = modules_of(original, nn.BatchNorm2d)[name]
        assert torch.equal(layer.running_mean, bn.running_mean)
        assert torch.equal(layer.running_var, bn.running_var)
        assert layer.num_batches_tracked == 0 and layer.running_var.dtype == F64
    with torch.no_grad():
        converted = model(x)
    if conv is None:  # BRN/CBN inference is BN with the same running statistics
        torch.testing.assert_close(converted, reference, rtol=1e-12, atol=1e-12)
    fused = fuse(model)
    assert {type(m) for m in fused.modules()} == {
        TorchvisionLayoutResNet, nn.Sequential, BasicBlock, nn.Conv2d, nn.Identity, nn.ReLU,
        nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear}
    with torch.no_grad():
        torch.testing.assert_close(fused(x), converted, rtol=1e-10, atol=1e-10)


def test_convert_to_group_norm_with_ws_and_frozen_parameters():
    original = pretrained_resnet()
    original.bn1.weight.requires_grad_(False)
    original.bn1.bias.requires_grad_(False)
    model = convert(copy.deepcopy(original), norm=dict(type='GN', num_groups=4),
                    conv=dict(type='WSConv'))
    assert type(model.bn1) is nn.GroupNorm and model.bn1.num_groups == 4
    assert type(model.layer2[0].downsample[0]) is mmnorm.WSConv
    assert torch.equal(model.bn1.weight, original.bn1.weight)
    assert not model.bn1.weight.requires_grad and model.layer1[0].bn1.weight.requires_grad
    stated = convert(copy.deepcopy(original), norm=dict(type='MABN', requires_grad=True),
                     conv=None)
    assert stated.bn1.weight.requires_grad  # a requires_grad in the config wins


def test_a_batch_norm_itself_and_a_double_model():
    bn = nn.BatchNorm2d(3).to(F64).eval()
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
    layer = convert(bn, norm=dict(type='BRN', eps=1e-3))
    assert type(layer) is mmnorm.BRN and not layer.training
    assert layer.eps == 1e-3 and layer.weight.dtype == F64
    assert torch.equal(layer.running_mean, bn.running_mean)
    assert convert(nn.BatchNorm2d(3, eps=1e-4)).eps == 1e-4  # the BN's eps by default


def test_shared_batch_norm_stays_one_module():
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), bn, nn.ReLU(), bn)
    model = convert(model, conv=None)
    assert isinstance(model[1], mmnorm.MABN) and model[1] is model[3]


def test_bad_arguments_name_the_argument():
    model = pretrained_resnet()
    with pytest.raises(TypeError, match='convert: norm must be a dict with a "type" key'):
        convert(model, norm=None)
    with pytest.raises(TypeError, match='convert: norm must be a dict'):
        convert(model, norm='MABN')
    with pytest.raises(KeyError, match="convert: norm type 'NoSuchNorm' is not a registered"):
        convert(model, norm=dict(type='NoSuchNorm'))
    with pytest.raises(KeyError, match="convert: conv type 'NoSuchConv' is not a registered"):
        convert(model, conv=dict(type='NoSuchConv'))
    with pytest.raises(TypeError, match="convert: conv type 'MABN' must be an nn.Conv2d"):
        convert(model, conv=dict(type='MABN'))
    with pytest.raises(TypeError, match='convert: conv must be a dict'):
        convert(model, conv=dict(kernel=3))
    with pytest.raises(TypeError, match="MABN.*'no_such_key'"):
        convert(model, norm=dict(type='MABN', no_such_key=1))
    with pytest.raises(ValueError, match="no weight and bias to keep those of the BatchNorm2d "
                                         "'bn1'"):
        convert(model, norm=dict(type='GN', num_groups=4, affine=False))
    # Nothing was converted by the failed calls.
    assert isinstance(model.bn1, nn.BatchNorm2d) and type(model.conv1) is nn.Conv2d
