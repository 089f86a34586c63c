"""The study scripts (docs/classification_study.md, docs/detection_study.md)
run end to end on a tiny setting:
tools/study_classification.py (normalization batch on Fashion-MNIST, logic in
mmnorm/studies/classification.py) and
tools/study_detection.py (the demo Mask R-CNN per norm on the scenes, logic in
mmnorm/studies/detection.py).
The real runs are in docs/; these tests only show the scripts work."""
import json
import math
import os
import sys

import pytest
import torch

from mmnorm.datasets.fashion_mnist import DEFAULT_DATA_ROOT

from conftest import REPO, run, tool_env

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(DEFAULT_DATA_ROOT, 'train-images-idx3-ubyte.gz')),
    reason='Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)')


@pytest.fixture(scope='module')
def cls_study():
    from mmnorm.studies import classification
    return classification


def tables(markdown):
    """The data rows of each markdown table, as lists of cells."""
    found, lines = [], markdown.splitlines() + ['']
    for i, line in enumerate(lines):
        if line.startswith('|') and not lines[i - 1].startswith('|'):
            found.append([])
        if line.startswith('|') and i >= 2 and lines[i - 2].startswith('|'):
            found[-1].append([cell.strip() for cell in line.strip('|').split('|')])
    return found


def table_rows(markdown):
    """Data rows of the first markdown table, as lists of cells."""
    return tables(markdown)[0]


# ------------------------------------------------------------ classification
def test_learning_rate_warms_up_then_follows_the_cosine(cls_study):
    lr = cls_study.learning_rate
    assert lr(0, 100) == pytest.approx(0.1 / 5)
    assert lr(4, 100) == pytest.approx(0.1)
    assert lr(5, 100) == pytest.approx(0.1)
    assert lr(52, 100) == pytest.approx(0.05 * (1 + math.cos(math.pi * 47 / 95)))
    assert lr(99, 100) < 0.001


def test_small_batch_rows_accumulate_sixteen_passes_of_two(cls_study):
    """Each SGD step of a 2-image row is 16 training steps of every norm
    layer; the 32-image row takes one."""
    x = torch.randn(64, 1, 28, 28)
    y = torch.arange(64) % 10
    for row, per_step in (('mabn2', 16), ('bn32', 1)):
        model, losses = cls_study.train(row, 0, 3, x, y)
        counters = {int(m.num_batches_tracked) for m in model.modules()
                    if hasattr(m, 'num_batches_tracked')}
        assert counters == {3 * per_step}, (row, counters)
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    accuracy = cls_study.top1(model, x[:10], y[:10])
    assert 0.0 <= accuracy <= 100.0 and not model.training


def test_ordering_verdict(cls_study):
    def summary(**means):
        return [(row, '', 0, mean, 0.0, 3) for row, mean in means.items()]

    holds = cls_study.ordering_verdict(summary(bn32=80.0, mabn2=79.0, brn2=75.0, bn2=70.0))
    assert holds.startswith("The paper's ordering holds here")
    broken = cls_study.ordering_verdict(summary(bn32=80.0, mabn2=70.0, brn2=75.0, bn2=71.0))
    assert 'does not hold' in broken
    assert broken.index('BRN 2 (75.00)') < broken.index('BN 2 (71.00)') < broken.index(
        'MABN + CenConv 2 (70.00)')


@pytest.mark.end_to_end
def test_classification_study_writes_table_and_plot_and_reuses_runs(tmp_path):
    work, out = tmp_path / 'work', tmp_path / 'out'
    cmd = [sys.executable, REPO / 'tools' / 'study_classification.py', '--rows', 'bn32', 'mabn2',
           '--seeds', '0', '1', '--steps', '2', '--test-images', '500',
           '--work-dir', work, '--out-dir', out]
    proc = run(cmd, env=tool_env())
    assert proc.stdout.count('[study] ') == 5  # 4 runs and the report
    for name in ('bn32_seed0', 'bn32_seed1', 'mabn2_seed0', 'mabn2_seed1'):
        stored = json.loads((work / f'{name}.json').read_text())
        assert len(stored['losses']) == 2 and 0 <= stored['top1'] <= 100
    rows = table_rows((out / 'classification_study.md').read_text())
    assert [(r[0], r[1], r[4]) for r in rows] == [('BN', '32', '2'), ('MABN + CenConv', '2', '2')]
    mean = (json.loads((work / 'mabn2_seed0.json').read_text())['top1']
            + json.loads((work / 'mabn2_seed1.json').read_text())['top1']) / 2
    assert float(rows[1][2]) == pytest.approx(mean, abs=0.006)
    assert (out / 'classification_study.png').stat().st_size > 10_000
    again = run(cmd, env=tool_env())
    assert 'seed 0: top-1' not in again.stdout  # read back, not trained again


# ----------------------------------------------------------------- detection
@pytest.mark.end_to_end
def test_detection_study_trains_and_tests_each_run_and_reads_back(tmp_path):
    """Each (row, seed) is trained, then tested after PreciseBN; the 8-image
    reference row with the first seed only; a second call reads back."""
    from mmnorm.datasets import scenes
    data = tmp_path / 'scenes'
    scenes.prepare(str(data), num_train=8, num_val=4, seed=0)
    work, out = tmp_path / 'work', tmp_path / 'out'
    options = ['train_cfg.max_iters=2', 'train_cfg.val_interval=2',
               'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1',
               *[f'{loader}_dataloader.num_workers=0' for loader in ('train', 'val', 'test')]]
    cmd = [sys.executable, REPO / 'tools' / 'study_detection.py', '--rows', 'bn', 'bn_8img',
           '--seeds', '0', '1', '--data-root', data, '--work-dir', work, '--out-dir', out,
           '--cfg-options', *options]
    proc = run(cmd, env=tool_env())
    assert proc.stdout.count('tools/train.py') == 3 and proc.stdout.count('tools/test.py') == 3
    assert proc.stdout.count('randomness.seed=1') == 2  # bn: trained and tested
    report = (out / 'detection_study.md').read_text()
    assert 'Made by `python tools/study_detection.py --rows bn bn_8img --seeds 0 1`' in report
    rows, runs = tables(report)
    assert [(r[0], r[1], r[2], r[3]) for r in rows[:2]] == [
        ('BN', '2', '2', '2'), ('BN, 8 images per batch (reference)', '8', '2', '1')]
    assert [(r[0], r[1]) for r in runs] == [('BN', '0'), ('BN', '1'),
                                            ('BN, 8 images per batch (reference)', '0')]
    bn_box = [float(r[2]) for r in runs[:2]]
    assert float(rows[0][4]) == pytest.approx(sum(bn_box) / 2, abs=0.051)
    assert float(rows[0][5]) == pytest.approx(max(bn_box) - min(bn_box), abs=0.051)
    for run_row in runs:
        assert all(0.0 <= float(ap) <= 100.0 for ap in run_row[2:6])
        assert int(run_row[6]) > 0  # BN layers recomputed before the test
    assert float(rows[0][12]) >= 0.0  # minutes, from the runs' logs
    for name in ('ap', 'loss'):
        assert (out / f'detection_study_{name}.png').stat().st_size > 10_000
    again = run(cmd, env=tool_env())
    assert 'tools/train.py' not in again.stdout and 'tools/test.py' not in again.stdout
    assert tables((out / 'detection_study.md').read_text()) == [rows, runs]  # read back


def test_logged_minutes_spans_the_newest_log(tmp_path):
    from mmnorm.studies.results import logged_minutes
    assert logged_minutes(str(tmp_path)) is None
    run_dir = tmp_path / '20261122_080457'
    run_dir.mkdir()
    (run_dir / '20261122_080457.log').write_text(
        '2026/11/22 08:04:58 - mmengine - INFO - start\n'
        'a line without a time stamp\n'
        '2026/11/22 08:30:28 - mmengine - INFO - end\n')
    assert logged_minutes(str(tmp_path)) == pytest.approx(25.5)
