"""Every command the README shows runs as written, and the README stays a signpost.

Each line of the README's ``bash`` blocks is either a command ``.ci/run`` runs
(the two test commands) or is run here: each block, in README order, in one
fresh ``bash`` whose PATH has no virtual environment, as in a new shell, in
one scratch folder that links the repository's files, so what the commands
write stays there. Only arguments that shrink the work are appended, per
command (``APPENDED``): 2 training iterations, 8 evaluation scenes, the main
job's work dir in the scratch folder, ``--dry-run`` for pip.

``shell`` blocks hold commands for machines this one is not (GPUs, two nodes,
Slurm): they are parsed by ``bash -n`` and the tools and configs they name must
exist. The ``python`` blocks run (the torchvision example) or build (the config
snippet). Every relative link in the README and in ``docs/`` points at an
existing file, and every ``#anchor`` at a heading of its target; the README
keeps to its size (``MAX_LINES`` lines, ``MAX_WIDTH`` characters outside tables).
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
#: the README is a signpost: its length, and its width outside table rows
MAX_LINES = 250
MAX_WIDTH = 100
#: what the README's norm_config command writes (the README names the file)
NORM_CONFIG_OUT = 'cascade-mask-rcnn_r50_fpn_1x_coco_mabn.py'


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
    if any(line.startswith('python tools/norm_config.py') for line in block):
        # the table of key paths, with the RPN head left alone, and the file the README names
        assert re.search(r'^model\.rpn_head\s*\|', out, flags=re.M), out[-3000:]
        assert re.search(rf'^wrote {re.escape(NORM_CONFIG_OUT)}$', out, flags=re.M), out[-3000:]
        assert (scratch / NORM_CONFIG_OUT).is_file()
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


# --- commands for other machines, the config snippet


def shell_blocks():
    """The README's ``shell`` blocks (commands for GPU machines and clusters),
    each a list of its command lines without comments."""
    blocks = re.findall(r'```shell\n(.*?)```', README, flags=re.S)
    return [[without_comment(line) for line in block.splitlines()
             if line.strip() and not line.startswith('#')] for block in blocks]


def test_readme_shell_blocks_parse_and_name_existing_tools_and_configs():
    """The GPU and cluster commands cannot run here; they parse, and every
    ``tools/`` script and ``configs/`` file they name exists."""
    blocks = shell_blocks()
    assert blocks, 'the README shows no command for GPUs or clusters'
    for block in blocks:
        script = '\n'.join(block)
        run(['bash', '-n', '-c', script])
        paths = re.findall(r'(?<![\w/])((?:tools|configs)/[\w./-]+)', script)
        assert any(path.startswith('tools/') for path in paths), script
        missing = [path for path in paths if not (REPO / path).is_file()]
        assert not missing, f'the README names files that do not exist: {missing}'


def test_readme_config_snippet_builds_the_norm_everywhere_it_says(tmp_path):
    """The hand-written config snippet (the ``python`` block with ``_base_``) is
    a whole config: it builds, with MABN and CenConv in the backbone, the neck
    and both RoI heads, and the backbone's norms train (``norm_eval=False``)."""
    block, = [b for b in re.findall(r'```python\n(.*?)```', README, flags=re.S)
              if b.startswith('_base_')]
    pytest.importorskip('mmdet')
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import mmnorm  # noqa: F401  (custom_imports imports it too)
    from mmnorm.layers import MABN, CenConv

    path = tmp_path / 'mask_rcnn_mabn.py'
    path.write_text(block)
    cfg = Config.fromfile(str(path))
    assert cfg.model.backbone.norm_eval is False
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    parts = {'backbone': model.backbone, 'neck': model.neck,
             'bbox_head': model.roi_head.bbox_head, 'mask_head': model.roi_head.mask_head}
    for name, part in parts.items():
        types = {type(module) for module in part.modules()}
        assert {MABN, CenConv} <= types, f'{name}: {sorted(t.__name__ for t in types)}'


# --- links and size


def markdown_files():
    return [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]


def without_fences(text):
    """``text`` without its fenced code blocks."""
    return re.sub(r'^```.*?^```', '', text, flags=re.S | re.M)


def outside_code(text):
    """``text`` without its fenced code blocks and inline code spans."""
    return re.sub(r'`[^`\n]*`', '', without_fences(text))


def anchors(path):
    """The anchors GitHub makes for the headings of ``path``: lower case, only
    word characters, hyphens and spaces kept, spaces as hyphens, repeats
    numbered."""
    seen, found = {}, set()
    for heading in re.findall(r'^#{1,6}[ \t]+(.*?)[ \t#]*$', without_fences(path.read_text()),
                              flags=re.M):
        slug = re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f'{slug}-{count}')
    return found


def relative_links(path):
    """The relative link and image targets of the markdown file ``path``."""
    targets = re.findall(r'\]\(([^)\s]+)(?:\s+"[^"]*")?\)', outside_code(path.read_text()))
    return [target for target in targets if not re.match(r'[a-z][a-z0-9+.-]*:', target)]


@pytest.mark.parametrize('page', markdown_files(), ids=lambda path: path.name)
def test_relative_links_point_at_files_and_headings_that_exist(page):
    broken = []
    for target in relative_links(page):
        file, _, anchor = target.partition('#')
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(f'{target}: no such file')
        elif anchor and resolved.suffix == '.md' and anchor not in anchors(resolved):
            broken.append(f'{target}: no heading #{anchor} in {resolved.name}')
    assert not broken, f'{page.relative_to(REPO)}: ' + '; '.join(broken)


def test_the_readme_links_every_docs_page_it_moved_text_to():
    linked = {(REPO / target.partition('#')[0]).resolve()
              for target in relative_links(REPO / 'README.md') if target.partition('#')[0]}
    pages = ('install', 'training', 'deployment', 'results', 'development', 'layers',
             'main_job', 'gpu', 'checkpoint_conversion', 'testing')
    missing = [page for page in pages if (REPO / 'docs' / f'{page}.md').resolve() not in linked]
    assert not missing, f'the README links no docs/{missing[0]}.md'


def test_the_readme_is_a_signpost():
    lines = README.splitlines()
    assert len(lines) <= MAX_LINES, f'the README has {len(lines)} lines; move text to docs/'
    wide = [f'{number}: {line[:60]}...' for number, line in enumerate(lines, 1)
            if len(line) > MAX_WIDTH and not line.startswith('|')]
    assert not wide, f'lines over {MAX_WIDTH} characters outside tables: {wide}'
