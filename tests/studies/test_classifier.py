"""Fashion-MNIST reader and dataset, NormStudyClassifier, ClassificationAccuracy,
and the main job's config trained for a few iterations through mmengine's Runner."""
import gzip
import json
import math
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.registry import DATASETS, METRICS, MODELS
from mmengine.runner import Runner

import mmnorm  # noqa: F401
from mmnorm.datasets.fashion_mnist import (
    CLASSES,
    DEFAULT_DATA_ROOT,
    IMAGES_MAGIC,
    FashionMNIST,
    load_fashion_mnist,
    read_idx,
)
from mmnorm.studies.classifier import ClassificationAccuracy, NormStudyClassifier

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(ROOT, 'configs', 'fmnist', 'cls_r18_brn.py')
BRN = MODELS.get('BRN')

needs_data = pytest.mark.skipif(
    not osp.isfile(osp.join(DEFAULT_DATA_ROOT, 'train-images-idx3-ubyte.gz')),
    reason='Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)')


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """This module's (small) models run on one thread (see conftest.one_thread)."""


def write_idx(path, magic, shape, payload):
    header = magic.to_bytes(4, 'big') + b''.join(n.to_bytes(4, 'big') for n in shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + bytes(payload))


# --------------------------------------------------------------------- reader
@needs_data
def test_reader_shapes_dtypes_and_labels():
    for split, count in (('train', 60000), ('test', 10000)):
        images, labels = load_fashion_mnist(split)
        assert images.shape == (count, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (count, ) and labels.dtype == np.int64
        assert labels.min() == 0 and labels.max() == 9
        # Every class is present, about count / 10 times (the release is balanced).
        assert (np.bincount(labels, minlength=10) == count // 10).all()
        assert images.max() == 255 and images.min() == 0
    assert len(CLASSES) == 10
    assert CLASSES[0] == 'T-shirt/top' and CLASSES[9] == 'Ankle boot'


def test_reader_rejects_wrong_magic(tmp_path):
    path = tmp_path / 'train-images-idx3-ubyte.gz'
    # A labels header (magic 2049) where the images file should be.
    write_idx(path, 0x00000801, (3, ), [1, 2, 3])
    with pytest.raises(ValueError, match='magic number 0x00000801, expected 0x00000803') as err:
        load_fashion_mnist('train', str(tmp_path))
    assert str(path) in str(err.value)


def test_reader_rejects_truncated_payload_and_non_gzip(tmp_path):
    path = tmp_path / 'x.gz'
    write_idx(path, IMAGES_MAGIC, (2, 28, 28), [0] * (2 * 28 * 28 - 5))
    with pytest.raises(ValueError, match=r'header shape \(2, 28, 28\) needs 1568 bytes'):
        read_idx(str(path), IMAGES_MAGIC)
    path.write_bytes(b'not gzip at all')
    with pytest.raises(ValueError, match='not a readable gzip file'):
        read_idx(str(path), IMAGES_MAGIC)
    # A well-formed file with the wrong number of samples for the split.
    write_idx(tmp_path / 'train-images-idx3-ubyte.gz', IMAGES_MAGIC, (2, 28, 28),
              [0] * (2 * 28 * 28))
    write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', 0x00000801, (2, ), [0, 1])
    with pytest.raises(ValueError, match=r'expected \(60000, 28, 28\) for the train split'):
        load_fashion_mnist('train', str(tmp_path))
    # The reader itself reads it.
    assert read_idx(str(tmp_path / 'train-labels-idx1-ubyte.gz'), 0x00000801).tolist() == [0, 1]


def test_reader_missing_file_message(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist('test', str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path / 't10k-images-idx3-ubyte.gz') in msg
    assert 'apt-get install dataset-fashion-mnist' in msg
    with pytest.raises(ValueError, match='split must be one of'):
        load_fashion_mnist('val', str(tmp_path))


@needs_data
def test_dataset_items_and_collate():
    dataset = DATASETS.build(dict(type='FashionMNIST', split='test', num_samples=5))
    assert isinstance(dataset, FashionMNIST) and len(dataset) == 5
    assert dataset.metainfo['classes'] == CLASSES
    images, labels = load_fashion_mnist('test')
    item = dataset[3]
    assert set(item) == {'inputs', 'data_samples'}
    assert item['inputs'].shape == (1, 28, 28) and item['inputs'].dtype == torch.float32
    assert torch.equal(item['inputs'][0], torch.tensor(images[3], dtype=torch.float32))
    assert item['data_samples'] == labels[3] and isinstance(item['data_samples'], int)
    batch = pseudo_collate([dataset[i] for i in range(4)])
    assert len(batch['inputs']) == 4 and batch['data_samples'] == labels[:4].tolist()
    with pytest.raises(ValueError, match='num_samples'):
        FashionMNIST(split='test', num_samples=10001)


# ---------------------------------------------------------------------- model
def small_model_cfg(**backbone):
    backbone = dict(type='mmdet.ResNet', depth=18, in_channels=1, out_indices=(3, ),
                    norm_cfg=dict(type='BRN', warmup_iters=1, rmax_iters=2, dmax_iters=2),
                    norm_eval=False, **backbone)
    return dict(type='NormStudyClassifier', num_classes=10, input_size=56, backbone=backbone,
                data_preprocessor=dict(type='ImgDataPreprocessor', mean=[72.94], std=[90.02]))


def test_mmdet_scope_resolves_from_root_registry():
    import mmdet.models
    assert MODELS.get('mmdet.ResNet') is mmdet.models.backbones.ResNet
    assert METRICS.get('ClassificationAccuracy') is ClassificationAccuracy


def test_model_forward_modes():
    torch.manual_seed(0)
    model = MODELS.build(small_model_cfg())
    model.init_weights()
    assert isinstance(model, NormStudyClassifier)
    norms = [m for m in model.backbone.modules() if isinstance(m, BRN)]
    assert len(norms) == 1 + 2 * 8 + 3  # stem, two per basic block, three downsamples
    data = dict(inputs=[torch.rand(1, 28, 28) * 255 for _ in range(4)],
                data_samples=[0, 3, 9, 3])

    model.train()
    batch = model.data_preprocessor(data, True)
    assert batch['inputs'].shape == (4, 1, 28, 28)
    assert model.extract_feat(batch['inputs']).shape == (4, 512)
    losses = model(**batch, mode='loss')
    assert set(losses) == {'loss_cls', 'acc'}
    assert losses['loss_cls'].dim() == 0 and torch.isfinite(losses['loss_cls'])
    losses['loss_cls'].backward()
    assert model.head.weight.grad is not None and model.backbone.conv1.weight.grad.abs().sum() > 0
    assert 0 <= losses['acc'].item() <= 100

    model.eval()
    with torch.no_grad():
        batch = model.data_preprocessor(data, False)
        logits = model(batch['inputs'], mode='tensor')
        assert logits.shape == (4, 10)
        preds = model(**batch, mode='predict')
    assert len(preds) == 4
    for pred, gt, row in zip(preds, data['data_samples'], logits):
        assert pred['gt_label'] == gt
        assert pred['pred_label'] == int(row.argmax())
        assert pred['pred_score'].shape == (10, )
        assert math.isclose(float(pred['pred_score'].sum()), 1.0, rel_tol=1e-5)
    # Stacked tensors (default_collate) work the same as lists.
    with torch.no_grad():
        stacked = model(batch['inputs'], torch.tensor(data['data_samples']), mode='predict')
    assert [p['gt_label'] for p in stacked] == data['data_samples']
    with pytest.raises(ValueError, match='invalid mode'):
        model(batch['inputs'], mode='bogus')


def test_metric_value():
    metric = ClassificationAccuracy()
    metric.process({}, [dict(pred_label=1, gt_label=1), dict(pred_label=2, gt_label=0),
                        dict(pred_label=3, gt_label=3)])
    assert metric.evaluate(3) == {'accuracy/top1': pytest.approx(200 / 3)}


# -------------------------------------------------------------------- config
@needs_data
def test_config_trains_through_runner(tmp_path):
    cfg = Config.fromfile(CONFIG)
    assert cfg.model.backbone.type == 'mmdet.ResNet'
    assert cfg.model.backbone.norm_cfg.type == 'BRN' and cfg.model.backbone.norm_eval is False
    iters = 12
    cfg.work_dir = str(tmp_path)
    # 8 images in batches of 4, each seen 6 times: the loss must go down.
    cfg.train_dataloader.batch_size = 4
    cfg.train_dataloader.dataset.num_samples = 8
    # (mmengine's loop sleeps 2 s each time a DefaultSampler's epoch ends.)
    cfg.train_dataloader.sampler = dict(type='InfiniteSampler', shuffle=True)
    cfg.val_dataloader.dataset.num_samples = 100
    cfg.train_cfg.max_iters = iters
    cfg.train_cfg.val_interval = iters
    cfg.param_scheduler = []  # constant lr
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.interval = iters
    # BRN's renormalization (r, d clipped at > 1, > 0) from step 3 on.
    cfg.model.backbone.norm_cfg.update(warmup_iters=2, rmax_iters=6, dmax_iters=6)
    runner = Runner.from_cfg(cfg)
    runner.train()

    norms = [m for m in runner.model.modules() if isinstance(m, BRN)]
    assert len(norms) == 20 and all(int(m.num_batches_tracked) == iters for m in norms)
    assert all(torch.isfinite(m.running_var).all() and (m.running_var > 0).all() for m in norms)
    with open(osp.join(runner.log_dir, 'vis_data', 'scalars.json')) as f:
        records = [json.loads(line) for line in f]
    losses = [r['loss_cls'] for r in records if 'loss_cls' in r]
    assert len(losses) == iters and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2, losses
    accs = [(r['step'], r['accuracy/top1']) for r in records if 'accuracy/top1' in r]
    assert len(accs) == 1 and accs[0][0] == iters and 0 <= accs[0][1] <= 100
    assert osp.isfile(osp.join(str(tmp_path), f'iter_{iters}.pth'))
