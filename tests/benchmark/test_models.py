"""tools/benchmark_models.py runs on a tiny setting (64x96 images, a few RoIs)
and writes what it promises: the rows, positive times and memory from the
subprocess, the ratios between methods (no aims), the profile and the plot;
its inputs and configs (mmnorm.benchmark.models) are what docs/benchmarks.md
says. No timing assertions: a tiny run's numbers are noise."""
import math
import re

import pytest
import torch
from test_layers import numbers

from mmnorm.benchmark import models
from mmnorm.benchmark.common import markdown_tables

from conftest import load_tool

TINY = ['--scale', '0.1', '--repeats', '1', '--warmup', '1', '--threads', '1']
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def tool():
    return load_tool('benchmark_models')


@pytest.mark.end_to_end
def test_tiny_run_with_memory_and_profile(tool, tmp_path, capsys, keep_threads):
    out = tmp_path / 'docs' / 'model.md'
    markdown = tool.main(TINY + ['--methods', 'MABN', '--profile', '--out', str(out)])
    assert markdown in capsys.readouterr().out
    assert out.read_text() == markdown
    assert out.with_suffix('.png').read_bytes().startswith(PNG_SIGNATURE)
    assert '--methods MABN --profile' in markdown and 'torch ' in markdown
    assert '2 synthetic images of 64x96' in markdown and 'Load average' in markdown

    table, pairs, *profiles = markdown_tables(markdown)
    rows = {r['method']: r for r in table}
    assert list(rows) == ['FrozenBN', 'MABN']  # the baseline is always measured
    assert rows['FrozenBN']['train x'] == '1.00x' and rows['FrozenBN']['inference x'] == '1.00x'
    for row in rows.values():
        total, low, high = numbers(row['train ms (min-max)'])
        assert total > 0 and low == high == total  # one round: median = min = max
        parts = numbers(row['forward / backward / step ms'])
        assert len(parts) == 3 and min(parts) > 0
        assert sum(parts) <= total * 1.01  # the parts lie inside the timed iteration
        assert numbers(row['inference ms (min-max)'])[0] > 0
        assert row['detections'] == '2'  # score threshold 0: the quota, 1 per image at 0.1
        assert math.isfinite(float(row['last loss']))
        for column in ('train peak MB', 'inference peak MB'):
            assert float(row[column]) > 0, (row, column)  # from the memory subprocess
        for column in ('train x', 'inference x', 'train memory x', 'inference memory x'):
            assert re.fullmatch(r'\d+\.\d\dx', row[column]), (row, column)

    # measured ratios only, no aims: neither BN nor the fused / no-norm rows were asked for
    assert [(r['methods'], r['phase'], r['measured']) for r in pairs] == [
        ('MABN fused / no norm', 'inference', '-'), ('MABN / BN', 'train', '-')]
    assert not re.search(r'\b(aim|met|MISSED)\b', markdown)

    assert [list(p[0]) for p in profiles] == [['component', 'pass', 'FrozenBN', 'MABN'],
                                              ['module class', 'pass', 'FrozenBN', 'MABN']]
    classes = {(r['module class'], r['pass']) for r in profiles[1]}
    assert {('MABN', 'forward'), ('MABN', 'backward'), ('CenConv', 'backward')} <= classes
    assert float(profiles[0][-1]['MABN']) > 0  # the total
    assert 'Largest increases MABN - FrozenBN:' in markdown

    # --plot-from reads the ratios back from the table and redraws the plot.
    ratios = models.ratios_from_markdown(markdown)
    assert list(ratios) == ['FrozenBN', 'MABN']
    for name, row in rows.items():
        assert ratios[name] == {key: float(row[column].rstrip('x'))
                                for key, column in models.RATIO_COLUMNS.items()}
    out.with_suffix('.png').unlink()
    assert tool.main(['--plot-from', str(out)]) is None
    assert out.with_suffix('.png').read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.end_to_end
def test_fused_and_no_norm_rows(tool, keep_threads):
    """The fold's rows: inference only, the same architecture (checked by the
    script), and the fused / no-norm ratio."""
    markdown = tool.main(TINY + ['--methods', 'mabn-fused', 'no-norm', '--skip-memory'])
    table, pairs = markdown_tables(markdown)
    rows = {r['method']: r for r in table}
    assert list(rows) == ['FrozenBN', 'MABN fused', 'no norm']
    for name in ('MABN fused', 'no norm'):
        assert rows[name]['train ms (min-max)'] == '-'
        assert numbers(rows[name]['inference ms (min-max)'])[0] > 0
        assert rows[name]['detections'] == '2'
        assert rows[name]['train peak MB'] == 'not measured (--skip-memory)'
    fused, plain = (numbers(rows[n]['inference ms (min-max)'])[0] for n in ('MABN fused',
                                                                         'no norm'))
    fold, mabn_bn = pairs
    assert (fold['methods'], fold['phase']) == ('MABN fused / no norm', 'inference')
    # The table's times are rounded to 3 digits; the ratio is of the exact ones.
    assert float(fold['measured'].rstrip('x')) == pytest.approx(fused / plain, abs=0.02)
    assert mabn_bn['measured'] == '-'  # neither trained here
    assert 'same parameter and buffer shapes: yes.' in markdown
    ratios = models.ratios_from_markdown(markdown)
    assert math.isnan(ratios['no norm']['train']) and math.isnan(ratios['no norm']['train memory'])
    assert ratios['no norm']['inference'] == float(rows['no norm']['inference x'].rstrip('x'))


def test_no_norm_model_is_the_fused_architecture():
    """``without_norms`` leaves what ``mmnorm.fuse`` leaves (module classes,
    parameter and buffer shapes), the 'no norm' model computes what the folded
    one computes, and ``architecture_differences`` sees a change."""
    fused, _ = models.build(models.METHODS[-2], 0.1)
    plain, _ = models.build(models.METHODS[-1], 0.1)
    assert models.architecture_differences(fused, plain) == []
    types = {type(m).__name__ for m in plain.modules()}
    assert not types & {'MABN', 'CenConv'} and 'Identity' in types
    conv = plain.backbone.conv1
    assert type(conv) is torch.nn.Conv2d and conv.bias is not None
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():  # it carries the folded weights: the same function
        for mine, theirs in zip(plain.backbone(x), fused.backbone(x), strict=True):
            torch.testing.assert_close(mine, theirs)
    conv.bias = None
    assert models.architecture_differences(fused, plain) == ['backbone.conv1.bias: (64,) / None']


def test_batch_is_deterministic_and_masks_fill_the_boxes():
    first, second = models.make_batch(0.1), models.make_batch(0.1)
    assert len(first['inputs']) == 2
    for image, other, sample in zip(first['inputs'], second['inputs'], first['data_samples']):
        assert image.shape == (3, 64, 96) and image.dtype == torch.uint8
        assert torch.equal(image, other)
        boxes, masks = sample.gt_instances.bboxes, sample.gt_instances.masks.masks
        assert boxes.shape == (models.GT_PER_IMAGE, 4)
        assert masks.shape == (models.GT_PER_IMAGE, 64, 96)
        for (x0, y0, x1, y1), mask in zip(boxes.int().tolist(), masks):
            assert mask.sum() == (x1 - x0) * (y1 - y0) > 0
            assert mask[y0:y1, x0:x1].all()
    assert all(torch.equal(a.gt_instances.bboxes, b.gt_instances.bboxes)
               for a, b in zip(first['data_samples'], second['data_samples']))


def test_model_config_changes():
    """No pretrained file, CBN burn-in 0, score threshold 0, lr; RoI counts
    untouched at scale 1 and shrunk with the area below it."""
    by_key = {m.key: m for m in models.METHODS}
    cbn = models.model_config(by_key['cbn'], 1.0)
    assert cbn.model.backbone.init_cfg is None
    norms = [cbn.model.neck.norm_cfg, cbn.model.roi_head.bbox_head.norm_cfg,
             cbn.model.roi_head.mask_head.norm_cfg]
    assert all(n.type == 'CBN' and n.burnin == 0 and 'burnin_epochs' not in n for n in norms)
    assert cbn.model.train_cfg.rcnn.sampler.num == 512
    assert cbn.model.test_cfg.rpn.max_per_img == 1000 and cbn.model.test_cfg.rcnn.max_per_img == 100
    assert cbn.model.test_cfg.rcnn.score_thr == 0.0
    assert cbn.optim_wrapper.optimizer.lr == pytest.approx(2e-5)
    small = models.model_config(by_key['gnws'], 0.5)
    assert small.model.backbone.init_cfg is None
    assert small.model.train_cfg.rcnn.sampler.num == 128
    assert small.model.test_cfg.rpn.max_per_img == 250
    assert small.model.test_cfg.rcnn.max_per_img == 25
    assert models.image_size(1.0) == (512, 832) and models.image_size(0.1) == (64, 96)


def test_unknown_method_is_an_error(tool, capsys):
    with pytest.raises(SystemExit):
        tool.main(['--methods', 'NoSuchNorm'])
    assert "unknown methods ['nosuchnorm']" in capsys.readouterr().err


def test_help_shows_defaults(tool, capsys):
    with pytest.raises(SystemExit):
        tool.parse_args(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    for default in ('(default: 1.0)', '(default: 5)', '(default: 2)', '(default: 1)',
                    'default: all)', '(default: False)'):
        assert default in text, default
    assert '(default: None)' not in text
