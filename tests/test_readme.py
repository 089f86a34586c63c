"""Every command the README shows runs as written.

Each line of the README's ``bash`` blocks is either a command ``.ci/run`` runs
(the two test commands) or is run here: each block, in README order, in one
fresh ``bash`` whose PATH has no virtual environment, as in a new shell, in
one scratch folder that links the repository's files, so what the commands
write stays there. Only arguments that shrink the work are appended, per
command (``APPENDED``): 2 training iterations, 8 evaluation scenes, the main
job's work dir in the scratch folder, ``--dry-run`` for pip.
"""
import re
import sys

import pytest

from conftest import REPO, run, tool_env

README = (REPO / 'README.md').read_text()
CI_LINES = [line for line in (REPO / '.ci' / 'run').read_text().splitlines()
            if line.startswith('bash tools/bootstrap.sh')]

FEW_SCENES = ['val_dataloader.dataset.indices=8', 'test_dataloader.dataset.indices=8']
#: command prefix -> arguments appended to shrink its work
APPENDED = {
    'bash tools/bootstrap.sh main': ['--work-dir', 'work_dirs/main_job', '--cfg-options',
                                     'train_cfg.max_iters=2', *FEW_SCENES],
    'python tools/train.py': ['--cfg-options', 'train_cfg.max_iters=2', *FEW_SCENES],
    'bash tools/dist_train.sh': ['--cfg-options', 'train_cfg.max_iters=2', *FEW_SCENES],
    'python tools/test.py': ['--cfg-options', *FEW_SCENES],
    'pip install': ['--dry-run', '--no-build-isolation', '--no-index'],
}
#: what links the scratch folder to the repository
LINKED = ('.venv', 'configs', 'data', 'mmnorm', 'requirements', 'setup.py', 'tools')


def bash_blocks():
    """The README's ``bash`` blocks, each a list of its command lines."""
    blocks = re.findall(r'```bash\n(.*?)```', README, flags=re.S)
    return [[line for line in block.splitlines() if line.strip() and not line.startswith('#')]
            for block in blocks]


def without_comment(line):
    return re.sub(r'\s+#.*$', '', line)


def command(line):
    """``line`` without its trailing comment, with the appended arguments."""
    line = without_comment(line)
    for prefix, extra in APPENDED.items():
        if line.startswith(prefix):
            return line + ' ' + ' '.join(extra)
    return line


BLOCKS = [[line for line in block if without_comment(line) not in CI_LINES]
          for block in bash_blocks()]
BLOCKS = [block for block in BLOCKS if block]


def git_status():
    return run(['git', 'status', '--porcelain', '--untracked-files=all']).stdout


def test_ci_runs_the_readme_test_commands_of_both_stacks():
    shown = {without_comment(line) for block in bash_blocks() for line in block}
    assert CI_LINES == ['bash tools/bootstrap.sh test',
                        'bash tools/bootstrap.sh --stack torch2.1 test']
    assert set(CI_LINES) <= shown
    assert BLOCKS, 'the README shows no command besides the CI ones'


@pytest.fixture(scope='module')
def scratch(tmp_path_factory, default_scenes):
    """One folder for all blocks (a later block reads what an earlier one
    wrote), linking the repository's files; the scenes are prepared."""
    folder = tmp_path_factory.mktemp('readme')
    for name in LINKED:
        (folder / name).symlink_to(REPO / name)
    return folder


@pytest.mark.skipif(sys.prefix != str(REPO / '.venv'),
                    reason="the README's commands use .venv (the default stack), whose suite "
                    'runs them')
@pytest.mark.parametrize('block', BLOCKS,
                         ids=[without_comment(block[-1])[:48] for block in BLOCKS])
@pytest.mark.end_to_end
@pytest.mark.xdist_group('readme')
def test_readme_block_runs_as_written(block, scratch):
    before = git_status()
    env = tool_env(PATH='/usr/local/bin:/usr/bin:/bin')
    env.pop('VIRTUAL_ENV', None)
    script = '\n'.join(['set -euo pipefail'] + [command(line) for line in block])
    out = run(['bash', '-c', script], env=env, cwd=scratch).stdout
    if any(line.startswith('pip install') for line in block):
        assert re.search(r'^Would install mmnorm-\S+$', out, flags=re.M), out[-3000:]
    if any(line.startswith('bash tools/bootstrap.sh main') for line in block):
        assert re.search(r'\[main job\] box AP \d\.\d{3}, mask AP \d\.\d{3}', out), out[-3000:]
    assert git_status() == before  # nothing written into the repository outside ignored paths
    installed = run([sys.executable, '-c', 'import mmnorm; print(mmnorm.__file__)'],
                    cwd=scratch.parent).stdout.strip().splitlines()[-1]
    assert installed == str(REPO / 'mmnorm' / '__init__.py')  # the set-up's mmnorm is this one


def test_readme_torchvision_example_runs():
    """The README's ``python`` block that uses torchvision runs as written
    (where a torchvision that works with this torch is installed)."""
    block, = [b for b in re.findall(r'```python\n(.*?)```', README, flags=re.S)
              if 'torchvision' in b]
    try:
        import torchvision  # noqa: F401
        from torchvision import ops  # noqa: F401  (fails where its compiled ops do not load)
    except Exception as error:  # noqa: BLE001  (any failure: the README says which works)
        pytest.skip(f'no working torchvision with this torch ({type(error).__name__}: {error})')
    out = run([sys.executable, '-c', block + '\nprint(type(folded).__name__, '
               'sorted({type(m).__name__ for m in folded.modules()} & {"MABN", "CenConv"}))'])
    assert out.stdout.strip().splitlines()[-1] == 'ResNet []'
