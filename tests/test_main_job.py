"""The main job (tools/main_job.py) and its pictures (mmnorm/studies/pictures.py):
one readable grid of predictions next to the ground truth, the loss curve, a
drawing pass that computes no metric, a summary in a few human lines, and a
warning instead of silence when the model predicted nothing."""
import itertools
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

from mmnorm.datasets.fashion_mnist import DEFAULT_DATA_ROOT
from mmnorm.studies import pictures

from conftest import REPO, run

PANEL = 128 * pictures.SCALE
CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Ankle boot')
#: 2 training iterations, each logged; 4 scenes evaluated (the drawing pass still draws 6)
FEW = ['train_cfg.max_iters=2', 'default_hooks.logger.interval=1',
       'val_dataloader.dataset.indices=4', 'test_dataloader.dataset.indices=4']
needs_fashion_mnist = pytest.mark.skipif(
    not os.path.isfile(os.path.join(DEFAULT_DATA_ROOT, 'train-images-idx3-ubyte.gz')),
    reason='Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)')


def instances(boxes, labels, scores=None, size=128):
    """An instance set whose masks fill the ``boxes`` (x0, y0, x1, y1)."""
    masks = np.zeros((len(boxes), size, size), bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes):
        mask[y0:y1, x0:x1] = True
    found = dict(bboxes=np.array(boxes, float).reshape(-1, 4), labels=np.array(labels),
                 masks=masks)
    if scores is not None:
        found['scores'] = np.array(scores, float)
    return found


def gradient_image():
    """A 128 x 128 scene whose gray level grows with x (40 .. 167)."""
    return np.tile(np.arange(40, 168, dtype=np.uint8), (128, 1))


#: Labels that would leave the image (top edge, right edge, bottom right
#: corner) or lie on each other (four equal boxes, and two boxes side by side).
CROWDED = [(0, 0, 30, 20), (100, 40, 128, 70), (110, 118, 128, 128)] + [(40, 40, 80, 80)] * 4 + [
    (20, 100, 40, 110), (30, 100, 50, 110)]


def crowded_scene():
    labels = [i % len(CLASSES) for i in range(len(CROWDED))]
    scores = [0.9] * (len(CROWDED) - 1) + [0.1]  # the last one is not drawn
    return dict(name='crowded.png', image=gradient_image(), truth=instances(CROWDED, labels),
                prediction=instances(CROWDED, labels, scores))


def overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_place_labels_keeps_labels_inside_and_apart():
    sizes = [(120, 20)] * 6
    preferred = [(-30, -30), (480, 100), (480, 100), (480, 100), (200, 600), (200, 600)]
    placed = pictures.place_labels(sizes, preferred, 512, 512)
    assert placed[:2] == [(0, 0), (392, 100)]  # clamped inside, and not moved further
    rects = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(placed, sizes)]
    for x0, y0, x1, y1 in rects:
        assert 0 <= x0 and 0 <= y0 and x1 <= 512 and y1 <= 512
    assert not any(overlap(a, b) for a, b in itertools.combinations(rects, 2))


def test_grid_has_two_scaled_up_panels_per_scene(tmp_path):
    scenes = [crowded_scene(), crowded_scene(), crowded_scene()]
    path = tmp_path / 'grid.png'
    layout = pictures.draw_grid(scenes, CLASSES, str(path), 0.3, 'a title')
    picture = np.asarray(Image.open(path).convert('RGB'))
    height, width = picture.shape[:2]
    assert (width // PANEL, height // PANEL) == (2, 3)  # 2 columns x 3 rows of 512 px panels
    image = np.repeat(gradient_image()[..., None], 3, axis=2)
    for row in layout:
        assert len(row) == 2
        for panel in (p['panel'] for p in row):
            x0, y0, x1, y1 = panel
            assert (x1 - x0, y1 - y0) == (PANEL, PANEL)
            drawn = picture[y0:y1, x0:x1]
            # below every box and label the scene shows, 4x its size
            assert (drawn[PANEL - 4:, :4 * 60] == np.repeat(image[-1:, :60], 4, axis=1)).all()
            title = picture[y0 - pictures.TITLE_HEIGHT:y0, x0:x1]
            assert (title < 128).any()  # a title is written above the panel


def test_labels_stay_inside_their_panel_and_apart(tmp_path):
    layout = pictures.draw_grid([crowded_scene()], CLASSES, str(tmp_path / 'grid.png'), 0.3,
                                'a title')
    truth, prediction = layout[0]
    assert len(truth['labels']) == len(CROWDED)
    assert len(prediction['labels']) == len(CROWDED) - 1  # the one scoring 0.1 is not drawn
    for panel in (truth, prediction):
        x0, y0, x1, y1 = panel['panel']
        for label in panel['labels']:
            assert x0 <= label[0] < label[2] <= x1 and y0 <= label[1] < label[3] <= y1, label
        for a, b in itertools.combinations(panel['labels'], 2):
            assert not overlap(a, b), (a, b)


def test_masks_are_translucent(tmp_path):
    path = tmp_path / 'grid.png'
    scene = dict(name='one.png', image=gradient_image(), truth=instances([(20, 64, 100, 100)], [2]),
                 prediction=instances([], [], []))
    layout = pictures.draw_grid([scene], CLASSES, str(path), 0.3, 'a title')
    x0, y0 = layout[0][0]['panel'][:2]
    picture = np.asarray(Image.open(path).convert('RGB')).astype(int)
    y = y0 + 80 * pictures.SCALE
    left, right = picture[y, x0 + 30 * pictures.SCALE], picture[y, x0 + 90 * pictures.SCALE]
    assert len(set(left)) > 1 and len(set(right)) > 1  # tinted: not the gray scene
    # the scene shows through: brighter garment pixels stay brighter under the mask
    assert (right > left).all(), (left, right)


@pytest.fixture(scope='module')
def main_job(tmp_path_factory, default_scenes):
    """One short main job: its output and work dir."""
    work_dir = tmp_path_factory.mktemp('main_job')
    out = run([sys.executable, REPO / 'tools' / 'main_job.py', '--work-dir', work_dir,
               '--cfg-options', *FEW]).stdout
    return out, work_dir


@needs_fashion_mnist
@pytest.mark.end_to_end
@pytest.mark.xdist_group('main_job')
def test_main_job_draws_one_grid_and_the_loss_curve(main_job):
    out, work_dir = main_job
    width, height = Image.open(work_dir / 'predictions.png').size
    assert (width // PANEL, height // PANEL) == (2, 6)  # 6 scenes, each truth and prediction
    assert Image.open(work_dir / 'loss.png').size[0] > 400
    assert f'on 6 validation scenes: {work_dir / "predictions.png"}' in out
    assert f'training loss: {work_dir / "loss.png"}' in out


@needs_fashion_mnist
@pytest.mark.end_to_end
@pytest.mark.xdist_group('main_job')
def test_drawing_pass_computes_no_metric(main_job):
    out, work_dir = main_job
    drawing = out[out.index(str(REPO / 'tools' / 'test.py')):]
    assert 'mAP' not in drawing and 'coco/' not in drawing
    assert 'Iter(test) [6/6]' in drawing
    assert (work_dir / 'drawing_pass' / 'predictions.pkl').is_file()


@needs_fashion_mnist
@pytest.mark.end_to_end
@pytest.mark.xdist_group('main_job')
def test_main_job_sums_up_in_human_lines(main_job):
    out, _ = main_job
    lines = [line for line in out.splitlines() if line.startswith('[main job]')]
    assert not any('{' in line for line in lines), lines  # no raw Python dict
    assert re.search(r'^\[main job\]   \d+ training scenes with \d+ garments, \d+ validation '
                     r'scenes with \d+ garments$', out, flags=re.M), lines
    assert re.search(r'^\[main job\] trained the MABN \+ CenConv Mask R-CNN \(ResNet-18, from '
                     r'scratch\) on the Fashion-MNIST scenes for 2 iterations: \d+\.\d min', out,
                     flags=re.M), lines
    assert re.search(r'^\[main job\] box AP \d\.\d{3}, mask AP \d\.\d{3} \(COCO metric, 4 '
                     r'validation scenes\)$', out, flags=re.M), lines


@needs_fashion_mnist
@pytest.mark.end_to_end
def test_main_job_warns_when_the_model_predicted_nothing(tmp_path, default_scenes):
    nothing_passes = 'model.test_cfg.rcnn.score_thr=1.01'  # scores are at most 1
    proc = run([sys.executable, REPO / 'tools' / 'main_job.py', '--work-dir', tmp_path,
                '--cfg-options', *FEW, nothing_passes])
    assert 'The testing results of the whole dataset is empty' in proc.stdout  # mmdet's error
    warning = re.search(r'^\[main job\] WARNING: .*$', proc.stdout, flags=re.M)
    assert warning, proc.stdout[-3000:]
    assert 'predicted nothing on 4 validation scenes' in warning.group()
    assert 'too few iterations (2 trained' in warning.group()
    assert '[main job] box AP 0.000, mask AP 0.000' in proc.stdout
    assert (tmp_path / 'predictions.png').is_file()
