"""tools/install_mmcv.py never leaves an mmcv built for another torch installed.

A throwaway virtual environment gets a stand-in ``torch`` (only a version) and
a stand-in mmcv source whose build records the torch it was built against:
its ``mmcv.ops`` fails to import under another torch with the ``undefined
symbol`` error of the real compiled ops. Switching torch between set-ups then
shows each case of the installer: build, keep, reuse the kept wheel of the
same torch, rebuild for a new torch, and a stale kept wheel replaced.
"""
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from conftest import load_tool

VERSION = '2.1.0'

BACKEND = """
import base64, hashlib, zipfile
import torch

VERSION = '@VERSION@'
INFO = f'mmcv-{VERSION}.dist-info'
OPS = ('import torch\\n'
       'if torch.__version__ != {!r}:\\n'
       '    raise ImportError("mmcv/_ext.so: undefined symbol: _ZN3c1017RegisterOperators")\\n')


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = f'mmcv-{VERSION}-py3-none-any.whl'
    files = {
        'mmcv/__init__.py': '',
        'mmcv/ops/__init__.py': OPS.format(torch.__version__),
        f'{INFO}/METADATA': f'Metadata-Version: 2.1\\nName: mmcv\\nVersion: {VERSION}\\n',
        f'{INFO}/WHEEL': 'Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\n'
                         'Tag: py3-none-any\\n',
    }
    record = []
    with zipfile.ZipFile(f'{wheel_directory}/{name}', 'w') as wheel:
        for path, text in files.items():
            data = text.encode()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=')
            record.append(f'{path},sha256={digest.decode()},{len(data)}')
            wheel.writestr(path, data)
        record.append(f'{INFO}/RECORD,,')
        wheel.writestr(f'{INFO}/RECORD', '\\n'.join(record) + '\\n')
    return name
""".replace('@VERSION@', VERSION)


@pytest.fixture(scope='module')
def environment(tmp_path_factory):
    """(python, set_torch, source): a venv, a function that installs a
    stand-in torch of a version and CUDA version, and the stand-in mmcv
    source directory."""
    root = tmp_path_factory.mktemp('install_mmcv')
    venv.create(root / 'venv', with_pip=True)
    python = str(root / 'venv' / 'bin' / 'python')
    site = Path(subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()'
                                '["purelib"])'], check=True, capture_output=True,
                               text=True).stdout.strip())

    def set_torch(version, cuda):
        (site / 'torch').mkdir(exist_ok=True)
        (site / 'torch' / '__init__.py').write_text(
            f'__version__ = {version!r}\nclass version:\n    cuda = {cuda!r}\n'
            'class cuda:\n    is_available = staticmethod(lambda: False)\n')

    source = root / 'mmcv_source'
    source.mkdir()
    (source / 'pyproject.toml').write_text(textwrap.dedent('''\
        [build-system]
        requires = []
        build-backend = "backend"
        backend-path = ["."]
        '''))
    (source / 'backend.py').write_text(BACKEND)
    return python, set_torch, str(source)


@pytest.mark.end_to_end
def test_switching_torch_never_keeps_an_mmcv_built_for_another(environment, tmp_path,
                                                                capfd):
    python, set_torch, source = environment
    installer = load_tool('install_mmcv')
    cache = tmp_path / 'wheels'

    def install():
        return installer.install_mmcv(python, VERSION, source, cache)

    set_torch('2.13.0+cpu', None)
    assert install() == 'built'
    assert install() == 'present'
    new_key = 'torch2.13.0+cpu-cudanone-cpuops-cp%d%d' % sys.version_info[:2]
    assert [p.name for p in cache.iterdir()] == [new_key]

    # the environment's torch changes: the installed mmcv no longer imports
    set_torch('2.1.2+cu121', '12.1')
    capfd.readouterr()
    assert install() == 'built'
    out = capfd.readouterr().out
    assert 'the installed mmcv is not usable here (ImportError: mmcv/_ext.so: undefined symbol' \
        in out
    old_key = 'torch2.1.2+cu121-cuda12.1-cpuops-cp%d%d' % sys.version_info[:2]
    assert sorted(p.name for p in cache.iterdir()) == sorted([new_key, old_key])
    assert install() == 'present'

    # back to the first torch: its kept wheel is reinstalled, nothing is built
    set_torch('2.13.0+cpu', None)
    assert install() == 'kept wheel'
    assert installer.mmcv_problem(python, VERSION) is None

    # a stale wheel under the 2.1.2 key (e.g. copied by hand): replaced
    stale = next((cache / new_key).glob('*.whl'))
    for kept in (cache / old_key).glob('*.whl'):
        kept.unlink()
    (cache / old_key / stale.name).write_bytes(stale.read_bytes())
    set_torch('2.1.2+cu121', '12.1')
    capfd.readouterr()
    assert install() == 'built'
    assert 'that wheel does not work here (ImportError: mmcv/_ext.so: undefined symbol' \
        in capfd.readouterr().out
    assert installer.mmcv_problem(python, VERSION) is None


@pytest.mark.end_to_end
def test_another_mmcv_version_counts_as_missing(environment, tmp_path):
    python, set_torch, source = environment
    installer = load_tool('install_mmcv')
    set_torch('2.13.0+cpu', None)
    installer.install_mmcv(python, VERSION, source, tmp_path / 'wheels')
    assert installer.mmcv_problem(python, '2.0.1') == \
        'another mmcv version than 2.0.1 is installed'
