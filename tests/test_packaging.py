"""mmnorm where users are: its declared requirements, the torch versions it
accepts, and the layers without mmcv or mmdet."""
import json
import sys

import pytest
import torch
from packaging.requirements import Requirement

from mmnorm.compat import TorchTooOldError, require_torch

from conftest import REPO, run

#: Versions MMDetection 3.x accepts (in) and does not (out), per package.
ACCEPTED = {
    'mmcv': (['2.0.0', '2.0.1', '2.1.0'], ['1.7.2', '2.2.0']),
    'mmengine': (['0.7.1', '0.8.5', '0.10.7'], ['0.7.0', '1.0.0']),
    'mmdet': (['3.0.0', '3.1.0', '3.3.0'], ['2.28.2', '3.4.0']),
}

STANDALONE = r'''
import sys


class NoOpenMMLabBuilds:
    """Import of mmcv or mmdet fails, as where they are not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('mmcv', 'mmdet'):
            raise ModuleNotFoundError(f'No module named {name!r}', name=name)
        return None


sys.meta_path.insert(0, NoOpenMMLabBuilds())
import copy

import torch
from torch import nn

from mmnorm import BRN, CBN, MABN, CenConv, WSConv, convert, fuse

torch.manual_seed(0)
plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
recipes = {MABN: dict(norm=dict(type='MABN', buffer_size=2, warmup_iters=1),
                      conv=dict(type='CenConv')),
           BRN: dict(norm=dict(type='BRN'), conv=None),
           CBN: dict(norm=dict(type='CBN', buffer_num=2, burnin=1), conv=dict(type='WSConv'))}
for norm_class, recipe in recipes.items():
    model = convert(copy.deepcopy(plain), **recipe)
    assert [type(m) for m in model if not isinstance(m, nn.ReLU)] == [
        recipe['conv'] and {'CenConv': CenConv, 'WSConv': WSConv}[recipe['conv']['type']]
        or nn.Conv2d, norm_class] * 2, model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(4):
        loss = model(torch.randn(2, 3, 8, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        folded = fuse(copy.deepcopy(model))
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-5)
    assert [type(m) for m in folded] == [nn.Conv2d, nn.Identity, nn.ReLU] + [
        nn.Conv2d, nn.Identity], folded
try:
    convert(copy.deepcopy(plain), norm=dict(type='GN', num_groups=2))
except KeyError as error:
    print(error)
loaded = sorted(name for name in sys.modules if name.split('.')[0] in ('mmcv', 'mmdet'))
assert not loaded, loaded
print('standalone ok')
'''


def test_layers_stand_alone_without_mmcv_and_mmdet():
    """With imports of mmcv and mmdet failing, the public names import,
    convert a plain PyTorch model, train it and fold it; MMCV's own types say
    that they need mmcv."""
    out = run([sys.executable, '-c', STANDALONE]).stdout
    assert out.strip().splitlines()[-1] == 'standalone ok', out
    assert "convert: norm type 'GN' is not a registered layer" in out
    assert "MMCV's own types, e.g. GN, need mmcv" in out


def test_import_refuses_torch_before_2_0():
    proc = run([sys.executable, '-c', "import torch; torch.__version__ = '1.13.1+cu117'; "
                "import mmnorm"], check=False)
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1].endswith(
        'mmnorm needs torch >= 2.0; this environment has torch 1.13.1+cu117'), proc.stdout


def test_require_torch_names_the_feature_and_both_versions(monkeypatch):
    monkeypatch.setattr(torch, '__version__', '2.1.2+cu121')
    require_torch((2, 1), 'feature')
    require_torch((1, 13), 'feature')
    with pytest.raises(TorchTooOldError, match=r'^the feature needs torch >= 2\.3; this '
                       r'environment has torch 2\.1\.2\+cu121$'):
        require_torch((2, 3), 'the feature')
    monkeypatch.setattr(torch, '__version__', '2.10.0')
    require_torch((2, 3), 'feature')  # 2.10 is newer than 2.3, not older


def dry_run_install(*args):
    """pip's report of what ``pip install ARGS`` would install here, with no
    package index: anything not already installed makes it fail."""
    proc = run([sys.executable, '-m', 'pip', 'install', '--dry-run', '--no-index',
                '--disable-pip-version-check', '--quiet', '--report', '-', *args])
    return json.loads(proc.stdout[proc.stdout.index('{'):])['install']


def test_installs_beside_an_existing_mmdetection_alone():
    """``pip install -e .`` in an environment with MMDetection installs
    mmnorm and nothing else (no mmcv build, no torch); the declared ranges
    accept every mmcv, mmengine and mmdet release MMDetection 3.x accepts."""
    for editable in ([], ['-e']):
        items = dry_run_install('--no-build-isolation', *editable, str(REPO))
        assert [item['metadata']['name'] for item in items] == ['mmnorm']
    declared = [Requirement(line) for line in items[0]['metadata']['requires_dist']]
    requires = {r.name: r for r in declared if r.marker is None}  # not an extra's
    assert set(requires) == set(ACCEPTED)  # no torch, nothing pinned beyond these
    for name, (accepted, refused) in ACCEPTED.items():
        assert all(requires[name].specifier.contains(v) for v in accepted), requires[name]
        assert not any(requires[name].specifier.contains(v) for v in refused), requires[name]
