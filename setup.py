"""mmnorm: small-batch normalization for MMDetection 3.x.

install_requires states the ranges MMDetection 3.x accepts, so installing into
an existing MMDetection environment adds mmnorm alone (torch is the user's own).
The exact stacks the project is tested on are pinned in requirements/.

The wheel is the whole plug-in: besides the package it carries the configs and
the tools users run under ``mmnorm/.mim/``, where OpenMMLab packages keep them
(mmengine resolves ``_base_ = 'PKG::DIR/FILE.py'`` to
``<installed PKG>/.mim/configs/DIR/FILE.py``). They are copied from configs/ and
tools/ when the wheel is built, never committed twice. A ``setup.py develop``
install (``pip install --no-use-pep517 -e .``, as tools/bootstrap.sh runs it)
links ``mmnorm/.mim/`` to the repository's files instead (the links ignore
themselves in git). A PEP 660 editable install (a plain ``pip install -e .``)
gets neither: mmengine 0.10.7 looks for mmnorm/.mim beside the dist-info, in
site-packages.
"""
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

HERE = os.path.dirname(os.path.realpath(__file__))  # the repository, where setup.py is linked
#: tools/ files that need this repository (set-up, CI, GPU check, studies,
#: benchmarks, the main job and its data): left out of the wheel
REPOSITORY_TOOLS = {'bootstrap.sh', 'install_mmcv.py', 'gpu_check.sh', 'mutation_check.py',
                    'compile_kernels.py', 'main_job.py', 'prepare_scenes.py'}
#: mmengine reads .mim/model-index.yml before .mim/configs; an empty index
#: sends every ``mmnorm::`` path to .mim/configs (no model zoo metafiles)
MODEL_INDEX = 'Import: []\n'


def mim_files():
    """(path under mmnorm/.mim, path in the source tree) of what the wheel
    carries there: every config, and the tools users run."""
    files = []
    for folder, _, names in sorted(os.walk(os.path.join(HERE, 'configs'))):
        for name in sorted(names):
            if name.endswith('.py'):
                source = os.path.join(folder, name)
                files.append((os.path.relpath(source, HERE), source))
    tools = os.path.join(HERE, 'tools')
    for name in sorted(os.listdir(tools)):
        if (name.endswith(('.py', '.sh')) and name not in REPOSITORY_TOOLS
                and not name.startswith(('benchmark_', 'study_'))):
            files.append((os.path.join('tools', name), os.path.join(tools, name)))
    return files


def replace(path, make):
    """Make ``path`` anew with ``make(temporary_path)``, then rename it into
    place (two set-ups at once each leave a whole file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f'{path}.{os.getpid()}.tmp'
    make(temporary)
    os.replace(temporary, path)


def write(text):
    def make(path):
        with open(path, 'w') as f:
            f.write(text)
    return make


def symlink(target):
    return lambda path: os.symlink(target, path)


class BuildPyWithMim(build_py):
    """build_py, then the configs and tools copied into mmnorm/.mim of the build."""

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):  # a PEP 660 editable wheel: no copies
            return
        mim = os.path.join(self.build_lib, 'mmnorm', '.mim')
        shutil.rmtree(mim, ignore_errors=True)  # nothing left from an earlier build
        for target, source in mim_files():
            os.makedirs(os.path.dirname(os.path.join(mim, target)), exist_ok=True)
            shutil.copy2(source, os.path.join(mim, target))
        write(MODEL_INDEX)(os.path.join(mim, 'model-index.yml'))


class DevelopWithMim(develop):
    """setup.py develop, then mmnorm/.mim in the source tree linked to the
    repository's configs (the folder: a new config resolves at once) and tools
    (what ``mmnorm::`` finds in a dev install)."""

    def run(self):
        super().run()
        if self.uninstall:
            return
        mim = os.path.join(HERE, 'mmnorm', '.mim')
        replace(os.path.join(mim, '.gitignore'), write('# made by setup.py develop\n*\n'))
        replace(os.path.join(mim, 'model-index.yml'), write(MODEL_INDEX))
        links = {'configs': os.path.join(HERE, 'configs')}
        links.update((target, source) for target, source in mim_files()
                     if target.startswith('tools' + os.sep))
        for target, source in links.items():
            link = os.path.join(mim, target)
            replace(link, symlink(os.path.relpath(source, os.path.dirname(link))))


with open(os.path.join(HERE, 'README.md'), encoding='utf-8') as f:
    README = f.read()

setup(
    name='mmnorm',
    version='0.1.0',
    description='Small-batch normalization (MABN, CBN, BRN, WS-Conv) for MMDetection',
    long_description=README,
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmnorm', 'mmnorm.*']),
    python_requires='>=3.8',
    install_requires=['mmcv>=2.0.0,<2.2.0', 'mmengine>=0.7.1,<1.0', 'mmdet>=3.0.0,<3.4.0'],
    extras_require={'tests': ['pytest']},
    cmdclass={'build_py': BuildPyWithMim, 'develop': DevelopWithMim},
)
