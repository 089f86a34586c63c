"""The Fashion-MNIST scenes data set (mmnorm/datasets/scenes.py, tools/prepare_scenes.py)
and the demo configs that train on it (configs/demo/).

The scene tests read the real Fashion-MNIST files (Debian's
dataset-fashion-mnist); the config tests train each demo config for 2
iterations on a few generated scenes and evaluate it with the COCO metric.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmnorm.datasets import scenes
from mmnorm.datasets.fashion_mnist import CLASSES, DEFAULT_DATA_ROOT, load_fashion_mnist

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / 'configs' / 'demo'

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(DEFAULT_DATA_ROOT, 'train-images-idx3-ubyte.gz')),
    reason='Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)')


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def fmnist():
    """Both Fashion-MNIST splits: {'train': (images, labels), 'test': (...)}."""
    return {split: load_fashion_mnist(split) for split in ('train', 'test')}


@pytest.fixture(scope='module')
def small_set(tmp_path_factory):
    """8 train + 4 val scenes, seed 0, written once for this module."""
    out = tmp_path_factory.mktemp('scenes') / 'fmnist_scenes'
    result = scenes.prepare(str(out), num_train=8, num_val=4, seed=0)
    return out, result


def load_json(path):
    with open(path) as f:
        return json.load(f)


def read_png(path):
    import cv2
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def fake_loader(calls, count=60):
    """A stand-in for load_fashion_mnist: the 'train' split has labels 0-4 only,
    the 'test' split labels 5-9 only; every image is a solid block."""

    def load(split, data_root):
        calls.append(split)
        images = np.zeros((count, 28, 28), np.uint8)
        images[:, 4:24, 6:22] = 200
        offset = 0 if split == 'train' else 5
        return images, (np.arange(count) % 5 + offset).astype(np.int64)

    return load


# -------------------------------------------------------------- the recipe
def test_silhouette_fills_dark_prints_and_drops_specks():
    garment = np.zeros((28, 28), np.uint8)
    garment[4:24, 6:22] = 200
    garment[10:16, 10:18] = 0  # a dark print inside the garment
    garment[0, 0] = 255  # a speck
    sil = scenes.garment_silhouette(garment)
    expected = np.zeros((28, 28), bool)
    expected[4:24, 6:22] = True
    assert np.array_equal(sil, expected)
    # a gap open to the outside is not a hole
    garment[10:16, 10:22] = 0
    assert not scenes.garment_silhouette(garment)[12, 12]


def test_mask_to_polygons_rasterises_back_exactly():
    from pycocotools import mask as mask_utils
    rng = np.random.default_rng(0)
    masks = [scenes.fill_holes(rng.random((24, 20)) < p) for p in np.linspace(0.2, 0.7, 40)]
    thin = np.zeros((10, 10), bool)
    thin[3, 1:9] = True  # a 1 px line
    diagonal = np.zeros((10, 10), bool)
    diagonal[[2, 3, 4], [2, 3, 4]] = True  # pixels touching only at corners
    corner = np.zeros((10, 10), bool)
    corner[9, 9] = True
    for mask in masks + [thin, diagonal, corner]:
        polygons = scenes.mask_to_polygons(mask)
        assert polygons and all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
        h, w = mask.shape
        decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w)))
        assert np.array_equal(decoded.astype(bool), mask)
    assert scenes.mask_to_polygons(np.zeros((5, 5), bool)) == []


def test_scenes_follow_the_recipe(fmnist):
    """Visible masks = silhouette minus the later silhouettes, >= 40 % visible,
    disjoint; garments pasted as they are; occlusion occurs and can split a
    garment; counts and scales as documented."""
    import cv2
    images, labels = fmnist['train']
    counts, fractions, split_garments, drops = [], [], 0, 0
    for i in range(150):
        image, instances, dropped = scenes.make_scene(scenes.scene_rng(1, 'train', i), images,
                                                      labels)
        drops += dropped
        assert image.shape == (128, 128) and image.dtype == np.uint8
        assert scenes.MIN_OBJECTS <= len(instances) + dropped <= scenes.MAX_OBJECTS
        counts.append(len(instances))
        covered = np.zeros((128, 128), bool)
        for k, inst in enumerate(instances):
            later = np.zeros((128, 128), bool)
            for other in instances[k + 1:]:
                later |= other['silhouette']
            assert np.array_equal(inst['mask'], inst['silhouette'] & ~later)
            area = int(inst['mask'].sum())
            assert area == round(inst['visible_fraction'] * inst['full_area'])
            assert inst['visible_fraction'] >= scenes.MIN_VISIBLE_FRACTION
            assert area >= scenes.MIN_VISIBLE_AREA
            assert np.array_equal(scenes.fill_holes(inst['mask']), inst['mask'])  # no holes
            assert not (covered & inst['mask']).any()
            covered |= inst['mask']
            assert 28 <= inst['size'] <= 84 and 1.0 <= inst['scale'] <= 3.0
            assert inst['label'] == labels[inst['index']]
            fractions.append(inst['visible_fraction'])
            split_garments += len(scenes.mask_to_polygons(inst['mask'])) > 1
        # the top garment is pasted as it is, up to its contrast gain (0.6-1)
        # and the noise (sigma <= 6)
        top = instances[-1]
        x, y, s = top['x'], top['y'], top['size']
        src = images[top['index']]
        resized = src if s == 28 else cv2.resize(src, (s, s), interpolation=cv2.INTER_LINEAR)
        sil = top['silhouette'][y:y + s, x:x + s]
        ink = resized[sil].astype(float)
        seen = image[y:y + s, x:x + s][sil].astype(float)
        gain = ink @ seen / (ink @ ink)
        assert 0.55 <= gain <= 1.05 and (seen - gain * ink).std() < 8
    assert min(counts) >= 1 and max(counts) == scenes.MAX_OBJECTS
    assert 0 < sum(f < 1 for f in fractions) < len(fractions)  # some occlusion, not all
    assert split_garments > 0  # an occluder split some garment into pieces
    assert drops < 0.2 * sum(counts)


# ----------------------------------------------------------- written files
def test_prepare_writes_coco_that_pycocotools_reads_exactly(small_set, fmnist):
    from pycocotools.coco import COCO
    out, result = small_set
    for split, num, source in (('train', 8, 'train'), ('val', 4, 'test')):
        record = result[split]
        assert record['written'] and record['num_images'] == num
        coco = COCO(record['ann_file'])
        cats = coco.loadCats(coco.getCatIds())
        assert [(c['id'], c['name']) for c in cats] == [(i + 1, n) for i, n in enumerate(CLASSES)]
        assert len(coco.getImgIds()) == num and len(coco.getAnnIds()) == record['num_annotations']
        images, labels = fmnist[source]
        for img in coco.loadImgs(coco.getImgIds()):
            i = img['id'] - 1
            assert img['file_name'] == f'{i:06d}.png'
            assert (img['width'], img['height']) == (128, 128)
            png = read_png(out / split / img['file_name'])
            scene, instances, _ = scenes.make_scene(scenes.scene_rng(0, split, i), images, labels)
            assert np.array_equal(png, scene)  # lossless, from this split's garments
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img['id']))
            assert len(anns) == len(instances) >= 1
            for ann, inst in zip(anns, instances):
                assert ann['iscrowd'] == 0 and ann['fmnist_split'] == source
                assert ann['fmnist_index'] == inst['index']
                assert ann['category_id'] == labels[ann['fmnist_index']] + 1
                decoded = coco.annToMask(ann).astype(bool)
                # polygon rasterisation gives back the composed mask (exact by
                # construction; allow 1 % of the area)
                assert (decoded != inst['mask']).sum() <= 0.01 * inst['mask'].sum()
                assert ann['area'] == inst['mask'].sum()
                x, y, w, h = ann['bbox']
                ys, xs = np.nonzero(inst['mask'])
                assert [x, y, w, h] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                        ys.max() - ys.min() + 1]
                inside = np.zeros_like(decoded)
                inside[y:y + h, x:x + w] = True
                assert decoded.any() and not (decoded & ~inside).any()
                assert ann['area'] >= scenes.MIN_VISIBLE_AREA
        info = load_json(record['ann_file'])['info']
        assert info['params'] == scenes.scene_params(split, num, 0)


def test_same_seed_same_files_other_seed_other_files(small_set, tmp_path):
    out, _ = small_set
    again = tmp_path / 'again'
    scenes.prepare(str(again), num_train=8, num_val=4, seed=0)
    other = tmp_path / 'other'
    scenes.prepare(str(other), num_train=8, num_val=4, seed=1)
    for split in ('train', 'val'):
        name = f'annotations/instances_{split}.json'
        assert (out / name).read_bytes() == (again / name).read_bytes()
        assert (out / name).read_bytes() != (other / name).read_bytes()
        files = sorted(p.name for p in (out / split).iterdir())
        assert files == sorted(p.name for p in (again / split).iterdir())
        for f in files:
            assert (out / split / f).read_bytes() == (again / split / f).read_bytes()
            assert not np.array_equal(read_png(out / split / f), read_png(other / split / f))
    # scene i does not depend on how many scenes are written
    prefix = tmp_path / 'prefix'
    scenes.prepare(str(prefix), num_train=3, num_val=2, seed=0)
    for f in ('000000.png', '000002.png'):
        assert (prefix / 'train' / f).read_bytes() == (out / 'train' / f).read_bytes()


def test_train_scenes_come_from_the_training_split(tmp_path):
    calls = []
    result = scenes.prepare(str(tmp_path / 's'), num_train=6, num_val=6, seed=0,
                            loader=fake_loader(calls))
    assert calls == ['train', 'test']
    train = load_json(result['train']['ann_file'])
    val = load_json(result['val']['ann_file'])
    assert {a['category_id'] for a in train['annotations']} <= {1, 2, 3, 4, 5}
    assert {a['category_id'] for a in val['annotations']} <= {6, 7, 8, 9, 10}
    assert {a['fmnist_split'] for a in train['annotations']} == {'train'}
    assert {i['fmnist_split'] for i in val['images']} == {'test'}
    assert len(train['annotations']) > 6 and len(val['annotations']) > 6


def test_prepare_is_idempotent_and_redoes_what_changed(tmp_path):
    out = tmp_path / 's'
    calls = []
    first = scenes.prepare(str(out), num_train=4, num_val=2, seed=3, loader=fake_loader(calls))
    assert first['train']['written'] and first['val']['written']
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob('*') if p.is_file()}
    second = scenes.prepare(str(out), num_train=4, num_val=2, seed=3, loader=fake_loader(calls))
    assert not second['train']['written'] and not second['val']['written']
    assert calls == ['train', 'test']  # nothing was even loaded the second time
    assert {k: second['train'][k] for k in ('num_images', 'num_annotations')} == \
        {k: first['train'][k] for k in ('num_images', 'num_annotations')}
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob('*') if p.is_file()}
    # fewer train scenes: train is rewritten (old extra images removed), val kept
    third = scenes.prepare(str(out), num_train=2, num_val=2, seed=3, loader=fake_loader(calls))
    assert third['train']['written'] and not third['val']['written']
    assert sorted(p.name for p in (out / 'train').iterdir()) == ['000000.png', '000001.png']
    assert load_json(third['train']['ann_file'])['info']['params']['num_images'] == 2
    # a missing image makes the split incomplete: rewritten
    (out / 'val' / '000001.png').unlink()
    fourth = scenes.prepare(str(out), num_train=2, num_val=2, seed=3, loader=fake_loader(calls))
    assert fourth['val']['written'] and not fourth['train']['written']
    assert (out / 'val' / '000001.png').is_file()
    with pytest.raises(ValueError, match='num_train'):
        scenes.prepare(str(out), num_train=0, num_val=2)


@pytest.mark.end_to_end
def test_cli_prepares_then_does_nothing(tmp_path):
    cmd = [sys.executable, str(REPO / 'tools' / 'prepare_scenes.py'), '--out',
           str(tmp_path / 's'), '--num-train', '3', '--num-val', '2', '--seed', '5']
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert 'train: wrote 3 images' in first.stdout and 'val: wrote 2 images' in first.stdout
    assert (tmp_path / 's' / 'annotations' / 'instances_val.json').is_file()
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count('up to date') == 2 and 'wrote' not in second.stdout
    bad = subprocess.run(cmd[:2] + ['--out', str(tmp_path / 'x'), '--data-root',
                                    str(tmp_path / 'nowhere')],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and 'dataset-fashion-mnist' in bad.stderr


# ----------------------------------------------------------- demo configs
def conv_and_norm_types(module):
    import torch.nn as nn
    from torch.nn.modules.batchnorm import _BatchNorm
    convs = {type(m) for m in module.modules() if isinstance(m, nn.Conv2d)}
    norms = [m for m in module.modules() if isinstance(m, (_BatchNorm, nn.GroupNorm))]
    return convs, norms


def demo_parts(model):
    """The four places a demo config sets: name -> (module, its 3x3/1x1 convs
    that feed a norm)."""
    roi = model.roi_head
    return {
        'backbone': (model.backbone, list(model.backbone.modules())),
        'neck': (model.neck, [c.conv for c in list(model.neck.lateral_convs) +
                              list(model.neck.fpn_convs)]),
        'bbox_head': (roi.bbox_head, [c.conv for c in roi.bbox_head.shared_convs]),
        'mask_head': (roi.mask_head, [c.conv for c in roi.mask_head.convs]),
    }


def check_bn(model):
    import torch.nn as nn
    for name, (module, convs) in demo_parts(model).items():
        _, norms = conv_and_norm_types(module)
        assert norms and all(type(n) is nn.BatchNorm2d for n in norms), name
        assert all(type(c) is nn.Conv2d for c in convs if isinstance(c, nn.Conv2d)), name
        assert all(n.weight.requires_grad for n in norms)


def layer_check(norm_name, conv_name=None):
    def check(model):
        import torch.nn as nn
        from mmengine.registry import MODELS
        norm_cls = MODELS.get(norm_name)
        conv_cls = MODELS.get(conv_name) if conv_name else nn.Conv2d
        for name, (module, convs) in demo_parts(model).items():
            _, norms = conv_and_norm_types(module)
            assert norms and all(type(n) is norm_cls for n in norms), (name, norms[:1])
            fed = [c for c in convs if isinstance(c, nn.Conv2d)]
            assert fed and all(type(c) is conv_cls for c in fed), (name, {type(c) for c in fed})
            if hasattr(norms[0], 'num_batches_tracked'):
                # these layers trained: 2 training calls
                assert all(int(n.num_batches_tracked) == 2 for n in norms), name
        # the RPN head is left alone: plain convs, no norm
        convs, norms = conv_and_norm_types(model.rpn_head)
        assert convs == {nn.Conv2d} and not norms
    return check


def check_gnws(model):
    layer_check('GN', 'WSConv')(model)
    import torch.nn as nn
    for name, (module, _) in demo_parts(model).items():
        assert all(n.num_groups == 16 for n in module.modules() if isinstance(n, nn.GroupNorm))


def check_cbn_active(model):
    layer_check('CBN')(model)
    from mmengine.registry import MODELS
    cbn = [m for m in model.modules() if isinstance(m, MODELS.get('CBN'))]
    # burnin=1: step 2 used and stored cross-iteration statistics in every layer
    assert cbn and all(int(m.history_pushes) == 1 for m in cbn)


def check_frozenbn(model):
    import torch
    import torch.nn as nn
    _, norms = conv_and_norm_types(model.backbone)
    assert norms and all(type(n) is nn.BatchNorm2d for n in norms)
    for n in norms:  # frozen from scratch: identity statistics, untouched by training
        assert not n.weight.requires_grad and not n.bias.requires_grad
        assert torch.equal(n.weight, torch.ones_like(n.weight))
        assert torch.equal(n.bias, torch.zeros_like(n.bias))
        assert torch.equal(n.running_mean, torch.zeros_like(n.running_mean))
        assert torch.equal(n.running_var, torch.ones_like(n.running_var))
    assert model.backbone.norm_eval
    for part in (model.neck, model.roi_head.bbox_head, model.roi_head.mask_head):
        assert not conv_and_norm_types(part)[1]


def norm_options(**kwargs):
    keys = ('model.backbone.norm_cfg', 'model.neck.norm_cfg', 'model.roi_head.bbox_head.norm_cfg',
            'model.roi_head.mask_head.norm_cfg')
    return {f'{k}.{name}': value for k in keys for name, value in kwargs.items()}


DEMOS = {
    'bn': ('mask_rcnn_r18_bn.py', {}, check_bn),
    'bn-8img': ('mask_rcnn_r18_bn_8img.py', {}, check_bn),
    'mabn': ('mask_rcnn_r18_mabn.py', {}, layer_check('MABN', 'CenConv')),
    # the MABN schedule compressed into the 2 steps: moving averages and
    # renormalisation on step 2
    'mabn-averaging': ('mask_rcnn_r18_mabn.py',
                       norm_options(buffer_size=1, warmup_iters=1, renorm_start_iter=1),
                       layer_check('MABN', 'CenConv')),
    'cbn': ('mask_rcnn_r18_cbn.py', {}, layer_check('CBN')),
    # burn-in over after step 1: cross-iteration statistics on step 2
    'cbn-after-burnin': ('mask_rcnn_r18_cbn.py', norm_options(burnin=1), check_cbn_active),
    'brn': ('mask_rcnn_r18_brn.py', {}, layer_check('BRN')),
    'gnws': ('mask_rcnn_r18_gnws.py', {}, check_gnws),
    'frozenbn': ('mask_rcnn_r18_frozenbn.py', {}, check_frozenbn),
}


def test_every_demo_config_is_tested():
    tested = {v[0] for v in DEMOS.values()}
    assert tested == {p.name for p in DEMO.glob('mask_rcnn_*.py')}


def test_demo_base_matches_the_scenes():
    from mmengine.config import Config
    cfg = Config.fromfile(str(DEMO / '_base_.py'))
    assert tuple(cfg.metainfo['classes']) == tuple(c['name'] for c in scenes.CATEGORIES)
    assert cfg.train_dataloader.dataset.metainfo == cfg.metainfo
    assert cfg.data_root.rstrip('/') == scenes.DEFAULT_OUT_DIR
    assert cfg.model.roi_head.bbox_head.num_classes == 10
    assert cfg.model.roi_head.mask_head.num_classes == 10
    assert cfg.model.backbone.depth == 18 and cfg.model.backbone.init_cfg is None
    assert cfg.train_dataloader.batch_size == 2
    resizes = [t for t in cfg.train_pipeline + cfg.test_pipeline if t['type'] == 'Resize']
    assert resizes and all(tuple(t['scale']) == (scenes.CANVAS_SIZE,) * 2 for t in resizes)
    assert cfg.train_cfg.type == 'IterBasedTrainLoop'
    assert cfg.train_cfg.val_interval == cfg.train_cfg.max_iters
    assert cfg.val_evaluator.ann_file == 'data/fmnist_scenes/annotations/instances_val.json'
    assert set(cfg.val_evaluator.metric) == {'bbox', 'segm'}




@pytest.mark.parametrize('demo', sorted(DEMOS))
@pytest.mark.end_to_end
def test_demo_config_trains_and_evaluates(demo, small_set, tmp_path, one_thread):
    import torch
    from mmengine.config import Config
    from mmengine.runner import Runner
    name, options, check = DEMOS[demo]
    out, _ = small_set
    root = f'{out}/'
    cfg = Config.fromfile(str(DEMO / name))
    cfg.merge_from_dict({
        'train_dataloader.dataset.data_root': root,
        'val_dataloader.dataset.data_root': root,
        'test_dataloader.dataset.data_root': root,
        'val_evaluator.ann_file': f'{root}annotations/instances_val.json',
        'test_evaluator.ann_file': f'{root}annotations/instances_val.json',
        'train_cfg.max_iters': 2,
        'train_cfg.val_interval': 2,
        'train_dataloader.num_workers': 0,
        'val_dataloader.num_workers': 0,
        'test_dataloader.num_workers': 0,
        'default_hooks.logger.interval': 1,
        'default_hooks.checkpoint.interval': 2,
        **options,
    })
    cfg.work_dir = str(tmp_path / 'work')
    cfg.experiment_name = f'test_demo_{demo}'
    runner = Runner.from_cfg(cfg)
    model = runner.train()
    hub = runner.message_hub
    assert runner.iter == 2
    loss = hub.get_scalar('train/loss').current()
    assert math.isfinite(loss) and loss > 0
    for metric in ('bbox', 'segm'):
        value = hub.get_scalar(f'val/coco/{metric}_mAP').current()
        assert 0.0 <= value <= 1.0, (metric, value)
    assert (tmp_path / 'work' / 'iter_2.pth').is_file()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    check(model)


@pytest.mark.end_to_end
def test_dist_train_two_cpu_processes_on_the_demo_then_evaluate(small_set, tmp_path):
    """tools/dist_train.sh with 2 CPU processes (gloo) trains the MABN demo a
    few iterations; tools/test.py evaluates the checkpoint it wrote."""
    import sys

    from conftest import REPO, free_port, run, tool_env
    out, _ = small_set
    root = f'{out}/'
    data = [f'{loader}_dataloader.dataset.data_root={root}' for loader in ('train', 'val', 'test')]
    data += [f'{phase}_evaluator.ann_file={root}annotations/instances_val.json'
             for phase in ('val', 'test')]
    data += [f'{loader}_dataloader.num_workers=0' for loader in ('train', 'val', 'test')]
    config = DEMO / 'mask_rcnn_r18_mabn.py'
    work_dir = tmp_path / 'dist'
    proc = run(['bash', REPO / 'tools' / 'dist_train.sh', config, '2', '--work-dir', work_dir,
                '--cfg-options', *data, 'train_cfg.max_iters=3', 'train_cfg.val_interval=3',
                'default_hooks.checkpoint.interval=3'],
               env=tool_env(PORT=str(free_port()), PYTHON=sys.executable))
    for rank in (0, 1):
        assert f'[mmnorm rank {rank}/2] training finished at epoch 0, iter 3' in proc.stdout
    assert 'coco/segm_mAP' in proc.stdout
    checkpoint = work_dir / 'iter_3.pth'
    assert checkpoint.is_file()
    proc = run([sys.executable, REPO / 'tools' / 'test.py', config, checkpoint,
                '--work-dir', tmp_path / 'test', '--cfg-options', *data])
    assert 'coco/bbox_mAP' in proc.stdout and 'coco/segm_mAP' in proc.stdout
