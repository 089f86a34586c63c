"""mmnorm where users are: its declared requirements, the torch versions it
accepts, the layers without mmcv or mmdet, and its wheel: the package with
the configs and tools under mmnorm/.mim, where mmengine resolves
``_base_ = 'mmnorm::DIR/FILE.py'`` (an editable install links them instead)."""
import json
import os
import shutil
import sys
import zipfile
from email import message_from_bytes
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from mmnorm.compat import TorchTooOldError, require_torch

from conftest import REPO, run, tool_env

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


#: what a wheel is built from (as the sdist holds it, MANIFEST.in)
SOURCE = ('setup.py', 'MANIFEST.in', 'pyproject.toml', 'README.md', 'mmnorm', 'configs', 'tools')
#: the tools users run, in the wheel; the repository's own, not
USER_TOOLS = {'train.py', 'test.py', 'deploy.py', 'convert_checkpoint.py', 'dist_train.sh',
              'dist_test.sh', 'slurm_train.sh', 'torchrun.sh'}
REPOSITORY_TOOLS = {'bootstrap.sh', 'install_mmcv.py', 'gpu_check.sh', 'main_job.py'}
#: a user's config inheriting one of mmnorm's (mmengine wants DIR/FILE after ``::``)
USER_CONFIG = "_base_ = 'mmnorm::demo/mask_rcnn_r18_mabn.py'\n"
#: run in the installed mmnorm's environment: what mmengine resolves, one line each
RESOLVE = r'''
import warnings

import mmnorm
from mmengine.config import Config
from mmengine.config.utils import MODULE2PACKAGE, _get_external_cfg_base_path
from mmengine.utils import get_installed_path

warnings.simplefilter('ignore')  # pkg_resources' deprecation, imported by get_installed_path
print('module', mmnorm.__file__)
installed = get_installed_path('mmnorm')
print('installed', installed)
# mmengine's path for 'mmnorm::X' (Config._get_cfg_path), the config loaded from there
cfg = Config.fromfile(_get_external_cfg_base_path(installed, 'mask_rcnn_mabn.py'))
print('mask_rcnn_mabn', cfg.model.backbone.norm_cfg.type, cfg.model.backbone.conv_cfg.type)
# stock mmengine 0.10.7 takes 'PKG::' only for the OpenMMLab packages it lists
MODULE2PACKAGE.setdefault('mmnorm', 'mmnorm')
print('resolved', Config._get_cfg_path('mmnorm::demo/mask_rcnn_r18_mabn.py', 'user.py')[0])
cfg = Config.fromfile('user.py')
print('user', cfg.model.backbone.norm_cfg.type, cfg.model.backbone.norm_cfg.buffer_size)
'''


def source_copy(folder):
    """The repository's files a wheel is built from, copied into ``folder``
    (building writes build/ and mmnorm.egg-info beside them)."""
    ignore = shutil.ignore_patterns('__pycache__', '.mim', '*.egg-info')
    folder.mkdir()
    for name in SOURCE:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, folder / name, ignore=ignore)
        elif (REPO / name).exists():
            shutil.copy2(REPO / name, folder / name)
    return folder


def resolve(python_path, folder):
    """RESOLVE's lines as {first word: the rest}, run from ``folder`` (not the
    repository) with only ``python_path`` before the environment's own paths."""
    folder.mkdir()
    (folder / 'user.py').write_text(USER_CONFIG)
    out = run([sys.executable, '-c', RESOLVE], cwd=folder,
              env=tool_env(PYTHONPATH=os.pathsep.join(map(str, python_path)))).stdout
    return dict(line.split(' ', 1) for line in out.splitlines() if ' ' in line)


@pytest.mark.end_to_end
def test_wheel_is_the_whole_plugin(tmp_path):
    """``pip wheel .`` holds the package, every config and the users' tools
    under mmnorm/.mim, and the README as its description; installed alone
    (``pip install --target``), mmengine resolves mmnorm's configs in it: the
    path of ``mmnorm::mask_rcnn_mabn.py`` loads with its own bases, and a
    user's config inheriting ``mmnorm::demo/...`` loads from the wheel."""
    source = source_copy(tmp_path / 'source')
    run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
         '--disable-pip-version-check', '-w', tmp_path / 'dist', source], cwd=source)
    wheel, = (tmp_path / 'dist').glob('mmnorm-*.whl')
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = message_from_bytes(archive.read(next(
            n for n in names if n.endswith('.dist-info/METADATA'))))
    mim = {n[len('mmnorm/.mim/'):] for n in names if n.startswith('mmnorm/.mim/')}
    configs = {str(p.relative_to(REPO)) for p in (REPO / 'configs').rglob('*.py')}
    tools = {n[len('tools/'):] for n in mim if n.startswith('tools/')}
    assert {n for n in mim if n.startswith('configs/')} == configs
    assert USER_TOOLS <= tools and not REPOSITORY_TOOLS & tools, sorted(tools)
    assert mim == configs | {f'tools/{n}' for n in tools} | {'model-index.yml'}
    assert {n for n in names if n.startswith('mmnorm/') and n.endswith('.py')} >= {
        str(p.relative_to(REPO)) for p in (REPO / 'mmnorm').rglob('*.py')
        if '__pycache__' not in p.parts and '.mim' not in p.parts}
    assert metadata['Description-Content-Type'] == 'text/markdown'
    assert metadata.get_payload().strip() == (REPO / 'README.md').read_text().strip()

    target = tmp_path / 'target'
    run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--disable-pip-version-check',
         '--target', target, wheel])
    seen = resolve([target], tmp_path / 'elsewhere')
    assert seen['module'] == str(target / 'mmnorm' / '__init__.py')  # not the repository's
    assert seen['installed'] == str(target / 'mmnorm')
    assert seen['mask_rcnn_mabn'] == 'MABN CenConv'
    assert seen['resolved'] == str(target / 'mmnorm/.mim/configs/demo/mask_rcnn_r18_mabn.py')
    assert seen['user'] == 'MABN 16'


@pytest.mark.end_to_end
def test_editable_install_links_the_source_trees_configs(tmp_path):
    """``setup.py develop`` (what ``pip install --no-use-pep517 -e .`` runs,
    as tools/bootstrap.sh does) links mmnorm/.mim to the source tree's configs
    and tools, links that git ignores; mmengine then resolves ``mmnorm::``
    to the source tree's configs."""
    source = source_copy(tmp_path / 'source')
    site = tmp_path / 'site'
    site.mkdir()
    run([sys.executable, 'setup.py', '-q', 'develop', '--no-deps', '--install-dir', site],
        cwd=source, env=tool_env(PYTHONPATH=str(site)))
    mim = source / 'mmnorm' / '.mim'
    assert (mim / 'configs').resolve() == source / 'configs'
    assert {p.name for p in (mim / 'tools').iterdir()} >= USER_TOOLS
    assert all(p.resolve() == source / 'tools' / p.name for p in (mim / 'tools').iterdir())
    run(['git', 'init', '-q', source])
    assert '.mim' not in run(['git', 'status', '--porcelain', '--untracked-files=all'],
                             cwd=source).stdout

    # the egg-link in site, then the source tree as its easy-install.pth adds it
    seen = resolve([site, source], tmp_path / 'elsewhere')
    assert seen['module'] == str(source / 'mmnorm' / '__init__.py')
    assert seen['installed'] == str(source / 'mmnorm')
    assert seen['mask_rcnn_mabn'] == 'MABN CenConv'
    resolved = Path(seen['resolved'])
    assert resolved == source / 'mmnorm/.mim/configs/demo/mask_rcnn_r18_mabn.py'
    assert resolved.resolve() == source / 'configs' / 'demo' / 'mask_rcnn_r18_mabn.py'
    assert seen['user'] == 'MABN 16'


def test_this_environment_resolves_mmnorm_configs_to_the_repository(tmp_path):
    """The suite's own environment (tools/bootstrap.sh's editable install):
    ``mmnorm::`` configs are the repository's. A PEP 660 editable install
    (plain ``pip install -e .`` where pyproject.toml exists) fails here:
    mmengine then looks for mmnorm/.mim in site-packages."""
    seen = resolve([], tmp_path / 'elsewhere')
    assert seen['installed'] == str(REPO / 'mmnorm'), (
        'mmengine does not find this repository as the installed mmnorm: reinstall it with '
        '`pip install --no-build-isolation --no-use-pep517 --no-deps -e .` (tools/bootstrap.sh)')
    resolved = Path(seen['resolved'])
    assert resolved.resolve() == REPO / 'configs' / 'demo' / 'mask_rcnn_r18_mabn.py', resolved
    assert seen['mask_rcnn_mabn'] == 'MABN CenConv'
    assert seen['user'] == 'MABN 16'
