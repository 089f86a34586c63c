"""tools/norm_config.py and mmnorm.engine.norm_config: the generated config of
MMDetection's own configs (Mask R-CNN, Cascade Mask R-CNN, RetinaNet, HTC, a
RegNet Mask R-CNN, a C4 Mask R-CNN with a shared head) builds a model whose
norm layers are what the printed table says, reads with mmengine's plain
Config.fromfile (custom_imports), trains (Mask R-CNN and Cascade, 2 iterations
on a tiny COCO set at 64 px), and the mistakes mmengine raises while reading a
config end in one line, exit 2.
"""
import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from torch.nn.modules.batchnorm import _BatchNorm

from mmnorm.engine.norm_config import ConfigReadError, NormConfigError, check_names, read_config

from conftest import REPO, load_tool, run, tool_env, write_tiny_coco

CASCADE = 'mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py'
MASK_RCNN = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
# name -> (base, --norm, --conv, --everywhere)
CASES = {
    'mask_rcnn_everywhere': (MASK_RCNN, 'MABN', 'CenConv', True),
    'cascade': (CASCADE, 'MABN', 'CenConv', False),
    'cascade_everywhere': (CASCADE, 'MABN', 'CenConv', True),
    'retinanet_cbn_everywhere': ('mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', 'CBN', None,
                                 True),
    'htc_brn_everywhere': ('mmdet::htc/htc_r50_fpn_1x_coco.py', 'BRN', None, True),
    'regnet': ('mmdet::regnet/mask-rcnn_regnetx-3.2GF_fpn_1x_coco.py', 'MABN', 'CenConv', False),
    'mask_rcnn_gnws_everywhere': (MASK_RCNN, 'GN', 'WSConv', True),
    'mask_rcnn_c4': ('mmdet::mask_rcnn/mask-rcnn_r50-caffe-c4_1x_coco.py', 'MABN', None, False),
}
TOOL = load_tool('norm_config')


def parse_table(out):
    """The printed table as (key, before, after) rows."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r'key\s+\| before', line))
    rows = []
    for line in lines[start + 2:]:
        if line.startswith('wrote ') or ' | ' not in line:
            break
        rows.append(tuple(part.strip() for part in line.split(' | ', 2)))
    return rows


def module_path(key):
    """``model.roi_head.bbox_head[0].norm_cfg`` -> ``roi_head.bbox_head.0``."""
    key = key.rsplit('.', 1)[0]
    return re.sub(r'\[(\d+)\]', r'.\1', key).removeprefix('model').lstrip('.')


def under(model, prefix):
    return [(n, m) for n, m in model.named_modules() if n == prefix or n.startswith(prefix + '.')]


_generated = {}


@pytest.fixture(scope='module')
def generated(tmp_path_factory):
    """name -> (written file, table rows), each case generated once with the tool."""
    def get(name):
        if name not in _generated:
            base, norm, conv, everywhere = CASES[name]
            out = tmp_path_factory.mktemp('generated') / f'{name}.py'
            argv = [base, '--norm', norm, '--out', str(out)]
            argv += ['--conv', conv] if conv else []
            argv += ['--everywhere'] if everywhere else []
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                code = TOOL.main(argv)
            assert code == 0, buffer.getvalue()
            _generated[name] = (out, parse_table(buffer.getvalue()))
        return _generated[name]
    return get


def norm_class(norm):
    from mmnorm.layers import norm_types
    return torch.nn.GroupNorm if norm == 'GN' else norm_types()[norm]


@pytest.mark.parametrize('name', list(CASES))
def test_the_table_is_the_built_model(name, generated):
    import mmdet.utils
    from mmdet.registry import MODELS

    from mmnorm.layers import conv_types
    base, norm, conv, everywhere = CASES[name]
    out, rows = generated(name)
    text = out.read_text()
    assert f"_base_ = '{base}'" in text
    assert "custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)" in text
    assert '_delete_' not in text  # BN bases: plain merges, lists whole
    cfg = Config.fromfile(out)
    mmdet.utils.register_all_modules(init_default_scope=False)
    model = MODELS.build(cfg.model)
    wanted = norm_class(norm)
    any_norm = (_BatchNorm, torch.nn.GroupNorm)
    keys = {key for key, _, _ in rows}

    changed = [(key, after) for key, _, after in rows
               if key.endswith('.norm_cfg') and not after.startswith('left alone')]
    assert changed and changed[0][0] == 'model.backbone.norm_cfg'
    for key, after in changed:
        count = int(re.match(rf'{norm} \((\d+) layers(: \d+ in each of the 3 stages)?\)$',
                             after).group(1))
        norms = [m for _, m in under(model, module_path(key)) if isinstance(m, any_norm)]
        assert len(norms) == count > 0, key
        assert all(isinstance(m, wanted) for m in norms), key  # no BatchNorm2d left
        if conv:
            convs = [m for _, m in under(model, module_path(key))
                     if isinstance(m, conv_types()[conv])]
            conv_after = dict((k, a) for k, _, a in rows)[key.replace('norm_cfg', 'conv_cfg')]
            assert conv_after == f'{conv} ({len(convs)} convs)', key
    # Every layer of the requested norm is where the table says it changed ...
    prefixes = [module_path(key) for key, _ in changed]
    for module_name, module in model.named_modules():
        if isinstance(module, wanted):
            assert any(module_name == p or module_name.startswith(p + '.') for p in prefixes), \
                module_name
    # ... and what it leaves alone is listed, with the reason.
    left = {key: after for key, _, after in rows if after.startswith('left alone: ')}
    for key in left:
        if key.endswith('.norm_cfg'):
            assert not any(isinstance(m, wanted) for _, m in under(model, module_path(key)))
    if hasattr(model, 'rpn_head'):
        assert left['model.rpn_head'] == 'left alone: RPNHead takes no norm_cfg'
    if norm != 'GN':
        assert cfg.model.backbone.norm_eval is False and cfg.model.backbone.frozen_stages == -1
        assert model.backbone.norm_eval is False and model.backbone.frozen_stages == -1
    if not everywhere and 'neck' in cfg.model:
        assert left['model.neck.norm_cfg'] == \
            'left alone: no norm in the base (--everywhere adds one)'
        assert not any(isinstance(m, any_norm) for _, m in under(model, 'neck'))
    elif everywhere:
        assert 'model.neck.norm_cfg' in {k for k, _ in changed}
    if 'roi_head' in cfg.model and everywhere:
        heads = cfg.model.roi_head.bbox_head
        for head in heads if isinstance(heads, list) else [heads]:
            assert head.type == 'Shared4Conv1FCBBoxHead'
        assert any(k.startswith('model.roi_head.mask_head') for k, _ in changed)
    if name.startswith('cascade'):
        assert isinstance(cfg.model.roi_head.bbox_head, list) \
            and len(cfg.model.roi_head.bbox_head) == 3
        stages = [f'model.roi_head.bbox_head[{i}].norm_cfg' for i in range(3)]
        assert set(stages) <= keys
        if everywhere:
            assert 'bbox_head=[' in text  # the list written whole
        else:
            assert all(left[s] == 'left alone: no norm in the base (--everywhere adds one)'
                       for s in stages)
    if name == 'mask_rcnn_c4':  # the shared ResLayer head trains its norms too
        assert 'model.roi_head.shared_head.norm_cfg' in {k for k, _ in changed}
        assert cfg.model.roi_head.shared_head.norm_eval is False
        assert left['model.roi_head.bbox_head'] == 'left alone: BBoxHead takes no norm_cfg'
    if norm == 'CBN':
        assert cfg.custom_hooks[-1].type == 'CBNBurninHook'
        assert cfg.norm.burnin_epochs == 8  # 2/3 of the 12-epoch schedule
    if norm == 'MABN':
        assert {m.buffer_size for m in model.modules() if isinstance(m, wanted)} == {16}


def test_mmengine_reads_custom_imports_without_mmnorm_imported(generated):
    """What MMDetection's own tools/train.py does first: Config.fromfile, which
    runs custom_imports; the registered layers then build."""
    out, _ = generated('mask_rcnn_everywhere')
    code = (
        'import sys\n'
        'from mmengine.config import Config\n'
        'assert "mmnorm" not in sys.modules\n'
        f'cfg = Config.fromfile({str(out)!r})\n'
        'assert cfg.custom_imports.imports == ["mmnorm"]\n'
        'assert "mmnorm" in sys.modules\n'
        'from mmdet.utils import register_all_modules\n'
        'register_all_modules()\n'
        'from mmdet.registry import MODELS\n'
        'neck = MODELS.build(cfg.model.neck)\n'
        'print(sorted({type(m).__name__ for m in neck.modules()}))\n')
    proc = subprocess.run([sys.executable, '-c', code], env=tool_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "'CenConv'" in proc.stdout and "'MABN'" in proc.stdout


# The sizes a COCO-sized model needs to train 2 iterations on 2 CPU cores: the
# tiny images' own 64 px, 2 images a batch, one epoch (2 iterations), no
# validation and no checkpoint, fewer proposals and sampled RoIs, and no
# pretrained weights (nothing is downloaded).
SCALE = '(64,64)'
OVERRIDES = [
    f'train_dataloader.dataset.pipeline.2.scale={SCALE}', 'train_dataloader.batch_size=2',
    'train_cfg.max_epochs=1', 'train_cfg.val_begin=2', 'default_hooks.checkpoint.interval=2',
    'default_hooks.checkpoint.save_last=False', 'model.backbone.init_cfg=None',
    'model.train_cfg.rpn_proposal.max_per_img=64',
] + [f'{loader}_dataloader.{key}' for loader in ('train', 'val', 'test')
     for key in ('num_workers=0', 'persistent_workers=False')]
SAMPLERS = {'mask_rcnn_everywhere': ['model.train_cfg.rcnn.sampler.num=32'],
            'cascade_everywhere': [f'model.train_cfg.rcnn.{i}.sampler.num=32' for i in range(3)]}


@pytest.fixture(scope='module')
def coco_workspace(tmp_path_factory):
    """A folder holding data/coco: the tiny set laid out as COCO 2017 (all 80
    category names), so the mmdet configs' own data paths are used."""
    from mmdet.datasets import CocoDataset
    root = tmp_path_factory.mktemp('norm_config_coco')
    write_tiny_coco(root / 'data' / 'coco', classes=CocoDataset.METAINFO['classes'],
                    coco_layout=True)
    return root


@pytest.mark.end_to_end
@pytest.mark.parametrize('name', list(SAMPLERS))
def test_the_generated_config_trains(name, generated, coco_workspace, tmp_path):
    out, _ = generated(name)
    # One thread: on 2 shared cores two OpenMP threads made this 2.5x slower (50 s against 21 s).
    proc = run([sys.executable, REPO / 'tools' / 'train.py', out, '--work-dir', tmp_path / 'work',
                '--cfg-options', *OVERRIDES, *SAMPLERS[name]], cwd=coco_workspace,
               env=tool_env(OMP_NUM_THREADS='1'))
    losses = re.findall(r'Epoch\(train\)\s+\[1\]\[(\d)/2\].*?\bloss: (\S+)', proc.stdout)
    assert losses and losses[-1][0] == '2', proc.stdout[-3000:]
    assert all(torch.isfinite(torch.tensor(float(loss))) for _, loss in losses)
    assert '[mmnorm] training finished at epoch 1, iter 2' in proc.stdout


@pytest.mark.end_to_end
def test_the_generated_config_trains_with_mmdetections_own_train_py(generated, coco_workspace,
                                                                    tmp_path):
    # MMDetection's tools/train.py (shipped in mmdet/.mim/tools) imports
    # nothing of mmnorm: the generated file's custom_imports must do it.
    import mmdet
    out, _ = generated('mask_rcnn_everywhere')
    train_py = Path(mmdet.__file__).parent / '.mim' / 'tools' / 'train.py'
    proc = run([sys.executable, train_py, out, '--work-dir', tmp_path / 'work',
                '--cfg-options', *OVERRIDES, *SAMPLERS['mask_rcnn_everywhere']],
               cwd=coco_workspace, env=tool_env(OMP_NUM_THREADS='1'))
    losses = re.findall(r'Epoch\(train\)\s+\[1\]\[(\d)/2\].*?\bloss: (\S+)', proc.stdout)
    assert losses and losses[-1][0] == '2', proc.stdout[-3000:]
    assert all(torch.isfinite(torch.tensor(float(loss))) for _, loss in losses)
    assert "type='MABN'" in proc.stdout  # the config mmengine prints


# --- mistakes


README_SNIPPET = """\
_base_ = '{base}'
custom_imports = dict(imports=['mmnorm'], allow_failed_imports=False)
norm = dict(type='MABN', requires_grad=True)
conv = dict(type='CenConv')
model = dict(
    backbone=dict(norm_cfg=norm, conv_cfg=conv, norm_eval=False),
    neck=dict(norm_cfg=norm, conv_cfg=conv),
    roi_head=dict(bbox_head=dict(type='Shared4Conv1FCBBoxHead', norm_cfg=norm, conv_cfg=conv),
                  mask_head=dict(norm_cfg=norm, conv_cfg=conv)))
"""
MERGE_LINE = (': bbox_head is a list of 3 in the base config and a dict here: mmengine cannot '
              'merge a dict into a list (key model.roi_head.bbox_head; write the whole list with '
              'every entry, or generate the config with tools/norm_config.py '
              f'{CASCADE} --norm NORM)')


@pytest.mark.end_to_end
def test_the_readme_snippet_on_cascade_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / 'cascade_mabn.py'
    bad.write_text(README_SNIPPET.format(base=CASCADE))
    proc = subprocess.run([sys.executable, REPO / 'tools' / 'norm_config.py', bad, '--norm',
                           'MABN'], cwd=tmp_path, env=tool_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [f'error: {bad}{MERGE_LINE}'], proc.stderr
    assert not (tmp_path / 'cascade_mabn_mabn.py').exists()


def test_a_merge_error_in_a_base_names_the_base_and_debug_raises(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text(README_SNIPPET.format(base=CASCADE))
    child = tmp_path / 'sub' / 'child.py'
    child.parent.mkdir()
    child.write_text("_base_ = '../bad.py'\n")
    with pytest.raises(ConfigReadError) as error:
        read_config(str(child))
    assert str(error.value) == f'{bad}{MERGE_LINE}'
    assert isinstance(error.value.__cause__, TypeError)
    with pytest.raises(ConfigReadError):
        TOOL.main([str(child), '--norm', 'MABN', '--debug'])


@pytest.mark.parametrize('text, line', ids=['missing_base', 'missing_mmdet_base', 'syntax_error'],
                         argvalues=[
    ("_base_ = './nope.py'\n", "{file}: base config ./nope.py does not exist (key _base_, "
     "looked for {dir}/nope.py; give a path relative to {dir})"),
    ("_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_cocoo.py'\n",
     "{file}: base config mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_cocoo.py does not exist "
     "(key _base_, looked for {mmdet}/mask_rcnn/mask-rcnn_r50_fpn_1x_cocoo.py; did you mean "
     "mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py or "
     "mmdet::mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py?; give a config of mmdet's configs folder, "
     "e.g. 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py')"),
    ("model = dict(\n    backbone=dict(norm_cfg=dict(type='MABN')\n",
     "{file}: syntax error at line 2: '(' was never closed (fix the Python on that line)"),
])
def test_reading_mistakes_are_one_line(tmp_path, capsys, text, line):
    from mmengine.utils import get_installed_path
    bad = tmp_path / 'bad.py'
    bad.write_text(text)
    expected = line.format(file=bad, dir=tmp_path,
                           mmdet=f'{get_installed_path("mmdet")}/.mim/configs')
    with pytest.raises(ConfigReadError) as error:
        read_config(str(bad))
    assert str(error.value) == expected
    assert TOOL.main([str(bad), '--norm', 'MABN']) == 2
    assert capsys.readouterr().err == f'error: {expected}\n'


def test_a_missing_config_is_one_line(capsys, tmp_path):
    assert TOOL.main([str(tmp_path / 'nothere.py'), '--norm', 'MABN']) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path}/nothere.py: no such config (looked for {tmp_path}/nothere.py; give a "
        "config file or 'mmdet::FOLDER/NAME.py')\n")


@pytest.mark.parametrize('norm, conv, message', [
    ('MABM', None, "--norm 'MABM' is not one of BRN, CBN, MABN, GN (did you mean 'MABN'?); "
     'GN goes with --conv WSConv'),
    ('GN', None, '--norm GN needs --conv WSConv'),
    ('GN', 'CenConv', '--norm GN needs --conv WSConv'),
    ('MABN', 'CenConvv', "--conv 'CenConvv' is not one of CenConv, WSConv "
     "(did you mean 'CenConv'?)"),
])
def test_bad_names_are_refused_with_the_choices(norm, conv, message):
    with pytest.raises(NormConfigError) as error:
        check_names(norm, conv)
    assert str(error.value).startswith(message)
    assert check_names('mabn', 'cenconv') == ('MABN', 'CenConv')


def test_a_norm_that_cannot_be_built_there_and_a_config_without_batch_norms(capsys, tmp_path):
    assert TOOL.main(['mmdet::regnet/mask-rcnn_regnetx-3.2GF_fpn_1x_coco.py', '--norm', 'GN',
                      '--conv', 'WSConv', '--out', str(tmp_path / 'gn.py')]) == 2
    # (torch's own message: torch 2.1 leaves the numbers out)
    assert re.fullmatch(r'error: model\.backbone\.norm_cfg: GN cannot be built there: '
                        r'num_channels( \(432\))? must be divisible by num_groups( \(32\))?\n',
                        capsys.readouterr().err)
    assert TOOL.main(['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', '--norm', 'MABN',
                      '--out', str(tmp_path / 'swin.py')]) == 2
    captured = capsys.readouterr()
    rows = dict((k, a) for k, _, a in parse_table(captured.out))
    assert rows['model.backbone.norm_cfg'] == 'left alone: LN is not a batch or group norm'
    assert 'no component gets MABN' in captured.err
    assert not (tmp_path / 'gn.py').exists() and not (tmp_path / 'swin.py').exists()


def test_a_local_base_is_referenced_relative_to_the_output(tmp_path, capsys):
    """A base given as a file: ``_base_`` relative to the written file; a GN
    base merged with ``_delete_`` (GN's num_groups is no MABN option)."""
    base = tmp_path / 'mine' / 'base.py'
    base.parent.mkdir()
    base.write_text(f"_base_ = {str(REPO / 'tests' / 'configs' / 'tiny_mask_rcnn.py')!r}\n"
                    "norm_cfg = dict(type='GN', num_groups=8, requires_grad=True)\n"
                    "model = dict(backbone=dict(norm_cfg=norm_cfg))\n")
    out = tmp_path / 'out' / 'tiny_mabn.py'
    assert TOOL.main([str(base), '--norm', 'MABN', '--conv', 'CenConv', '--out', str(out)]) == 0
    rows = dict((k, (b, a)) for k, b, a in parse_table(capsys.readouterr().out))
    assert rows['model.backbone.norm_cfg'][0] == 'GN(num_groups=8)'
    assert rows['model.neck.norm_cfg'][0] == 'BRN'
    text = out.read_text()
    assert "_base_ = '../mine/base.py'" in text
    # The demo base has a key 'norm' of its own, so the variable is mmnorm_norm.
    assert 'backbone=dict(norm_cfg=dict(mmnorm_norm, _delete_=True)' in text
    cfg = Config.fromfile(out)
    assert cfg.model.backbone.norm_cfg == dict(type='MABN', buffer_size=16, requires_grad=True)
    assert cfg.model.roi_head.mask_head.conv_cfg == dict(type='CenConv')
