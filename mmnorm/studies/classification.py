"""The MABN paper's normalization-batch table, on Fashion-MNIST
classification at a scale two CPU cores can run (``tools/study_classification.py``).

Every SGD step sees 32 training images in every row. Only the normalization
batch changes: the "BN, 32" row runs one forward/backward pass of 32 images
per step; every other row runs 16 passes of 2 images and accumulates their
gradients (each pass's loss divided by 16) before the step, as the MABN
authors simulated small batches. So each norm layer counts 16 of its own
training steps per SGD step, and MABN's 16-step window spans one SGD step.

Model: MMDetection's ResNet (BasicBlock, depth 18's two blocks per stage) with
three stages of 16, 32 and 64 channels on the 28 x 28 images (maps of 14, 7, 4
and 2 pixels after the stem, the max-pool and the stages), global average
pooling and a linear classifier: :class:`mmnorm.studies.classifier.NormStudyClassifier`
built from the registry with each row's ``norm_cfg`` / ``conv_cfg``.
Training: SGD momentum 0.9, lr 0.1 for 32 images, weight decay 1e-4 (none on
norm affine parameters), linear warm-up over the first 5 % of the steps, then
cosine to 0; pixels scaled by the training set's mean and std; no
augmentation. The same steps, schedule and image order (for a seed) in every
row. Top-1 accuracy on all 10,000 test images, norm layers in eval mode.

The norms' own schedules are counted in forward passes; for the 8,000 passes
of 2 images of the default run: MABN and CBN keep their published defaults
(MABN warm-up 100, renormalisation from pass 1,000; CBN k = 3), CBN's burn-in
is 1,000 passes (1/8 of the run) and BRN's schedule is the default divided by
10 (BN up to pass 500, r_max reaching 3 at pass 4,000 and d_max reaching 5 at
2,500) so that it opens within the run.

Each finished run is stored as ``WORK_DIR/ROW_seedS.json`` and read back on
the next call (``--retrain`` trains again). Writes
``OUT_DIR/classification_study.md`` (mean and spread of top-1 per row, the
paper's ImageNet column beside it, and whether the paper's ordering holds)
and ``OUT_DIR/classification_study.png``.
"""
import json
import math
import os
import os.path as osp
import time

import numpy as np
import torch

IMAGES_PER_STEP = 32

#: row -> (label, images per normalization batch, norm_cfg, conv_cfg,
#: top-1 of the MABN paper's ImageNet table or None).
ROWS = {
    'bn32': ('BN', 32, dict(type='BN'), None, 76.59),
    'bn2': ('BN', 2, dict(type='BN'), None, 64.78),
    'brn2': ('BRN', 2, dict(type='BRN', warmup_iters=500, rmax_iters=4000, dmax_iters=2500),
             None, 69.71),
    'mabn2': ('MABN + CenConv', 2, dict(type='MABN'), dict(type='CenConv'), 76.33),
    'cbn2': ('CBN', 2, dict(type='CBN', buffer_num=3, burnin=1000), None, None),
    'gn2': ('GN (8 groups)', 2, dict(type='GN', num_groups=8), None, None),
    'gnws2': ('GN (8 groups) + WS', 2, dict(type='GN', num_groups=8), dict(type='WSConv'), None),
}
#: The paper's ordering at 2 images (ImageNet top-1): BN 32 > MABN > BRN > BN.
PAPER_ORDER = ('bn32', 'mabn2', 'brn2', 'bn2')


def build_model(norm_cfg, conv_cfg):
    from mmengine.registry import MODELS

    import mmnorm  # noqa: F401  (registers the layers)
    backbone = dict(
        type='mmdet.ResNet', depth=18, in_channels=1, stem_channels=16, base_channels=16,
        num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1), out_indices=(2, ),
        style='pytorch', norm_cfg=dict(norm_cfg, requires_grad=True), conv_cfg=conv_cfg,
        norm_eval=False, frozen_stages=-1, init_cfg=None)
    return MODELS.build(dict(type='NormStudyClassifier', backbone=backbone, num_classes=10,
                             feat_channels=64))


def learning_rate(step, steps, base_lr=0.1):
    """Linear warm-up over the first 5 % of ``steps``, then cosine to 0."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * base_lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def optimizer_for(model):
    """SGD; no weight decay on the affine parameters of norm layers."""
    from torch.nn.modules.batchnorm import _BatchNorm
    norm_params, other = [], []
    for module in model.modules():
        is_norm = isinstance(module, (_BatchNorm, torch.nn.GroupNorm))
        for param in module.parameters(recurse=False):
            (norm_params if is_norm else other).append(param)
    return torch.optim.SGD([dict(params=other, weight_decay=1e-4),
                            dict(params=norm_params, weight_decay=0.0)],
                           lr=0.1, momentum=0.9)


def train(row, seed, steps, train_x, train_y):
    """Train one row's model for ``steps`` SGD steps of 32 images.

    Returns (model, [loss of each step]), the loss being the mean over the 32
    images of the step."""
    _, per_norm, norm_cfg, conv_cfg, _ = ROWS[row]
    torch.manual_seed(seed)
    model = build_model(norm_cfg, conv_cfg)
    optimizer = optimizer_for(model)
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    passes = IMAGES_PER_STEP // per_norm
    losses = []
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group['lr'] = learning_rate(step, steps)
        idx = order[(step * IMAGES_PER_STEP + torch.arange(IMAGES_PER_STEP)) % len(order)]
        step_loss = 0.0
        for part in idx.view(passes, per_norm):
            loss = model(train_x[part], train_y[part], mode='loss')['loss_cls'] / passes
            loss.backward()
            step_loss += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f'{row} seed {seed}: non-finite loss at step {step}')
        losses.append(step_loss)
    return model, losses


@torch.no_grad()
def top1(model, test_x, test_y):
    """Top-1 accuracy in % with the model in eval mode (running statistics)."""
    model.eval()
    preds = torch.cat([model(test_x[i:i + 500], mode='tensor').argmax(1)
                       for i in range(0, len(test_x), 500)])
    return 100.0 * (preds == test_y).float().mean().item()


def run(row, seed, steps, data, test_images):
    """One run; returns dict(top1=..., losses=[loss per step], seconds=...)."""
    train_x, train_y, test_x, test_y = data
    start = time.time()
    model, losses = train(row, seed, steps, train_x, train_y)
    accuracy = top1(model, test_x[:test_images], test_y[:test_images])
    return dict(top1=accuracy, losses=losses, seconds=time.time() - start)


def load_data(data_root):
    """Standardised float32 (N, 1, 28, 28) images and int64 labels."""
    from mmnorm.datasets.fashion_mnist import DEFAULT_DATA_ROOT, load_fashion_mnist
    root = data_root or DEFAULT_DATA_ROOT
    train_x, train_y = load_fashion_mnist('train', root)
    test_x, test_y = load_fashion_mnist('test', root)
    mean, std = train_x.mean(), train_x.std()

    def prep(x):
        return torch.from_numpy((x.astype(np.float32) - mean) / std).unsqueeze(1)

    return prep(train_x), torch.from_numpy(train_y), prep(test_x), torch.from_numpy(test_y)


def summarise(results, rows):
    """(row, label, images, mean, spread, n) with spread = max - min."""
    summary = []
    for row in rows:
        top1 = [r['top1'] for r in results[row]]
        summary.append((row, ROWS[row][0], ROWS[row][1], float(np.mean(top1)),
                        float(np.max(top1) - np.min(top1)), len(top1)))
    return summary


def ordering_verdict(summary):
    """A sentence on whether the paper's ordering BN 32 > MABN > BRN > BN (2
    images) holds for the measured means."""
    means = {row: mean for row, _, _, mean, _, _ in summary}
    if not all(row in means for row in PAPER_ORDER):
        return 'Not all four rows of the paper\'s ordering were run.'
    ours = sorted(PAPER_ORDER, key=lambda row: -means[row])
    names = {row: f'{ROWS[row][0]} {ROWS[row][1]}' for row in PAPER_ORDER}
    measured = ' > '.join(f'{names[row]} ({means[row]:.2f})' for row in ours)
    if tuple(ours) == PAPER_ORDER:
        return f'The paper\'s ordering holds here: {measured}.'
    return (f'The paper\'s ordering (BN 32 > MABN 2 > BRN 2 > BN 2) does not hold here; '
            f'measured: {measured}.')


def write_report(summary, results, steps, seeds, test_images, out_dir):
    import matplotlib

    from mmnorm.studies.results import markdown_table
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [f'{label.replace(" (8 groups)", "")}\n{images} img'
              for _, label, images, _, _, _ in summary]
    means = [mean for *_, mean, _, _ in summary]
    lows = [mean - min(r['top1'] for r in results[row]) for row, *_, mean, _, _ in summary]
    highs = [max(r['top1'] for r in results[row]) - mean for row, *_, mean, _, _ in summary]
    bars.bar(range(len(summary)), means, yerr=[lows, highs], capsize=4, color='tab:blue')
    bars.set_xticks(range(len(summary)), labels, fontsize=7)
    bars.set_ylim(max(0.0, min(means) - 5), min(100.0, max(means) + 2))
    bars.set_ylabel('test top-1 (%), mean; bars: min-max over seeds')
    for row, label, images, *_ in summary:
        loss = np.mean([r['losses'] for r in results[row]], axis=0)
        window = max(1, len(loss) // 25)
        smooth = np.convolve(loss, np.ones(window) / window, mode='valid')
        curves.plot(np.arange(len(smooth)) + window, smooth, label=f'{label}, {images} img',
                    linewidth=1.1)
    curves.set_xlabel('SGD step (32 images)')
    curves.set_ylabel(f'training loss (mean over seeds, {window}-step average)')
    curves.legend(fontsize=7)
    curves.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(osp.join(out_dir, 'classification_study.png'), dpi=110)
    plt.close(fig)

    header = ('norm', 'images per norm batch', 'top-1 % (mean)', 'spread (max-min)', 'seeds',
              'minutes per run (wall, shared machine)', 'paper, ImageNet R-50 top-1')
    table = [(label, images, f'{mean:.2f}', f'{spread:.2f}', n,
              f'{np.mean([r["seconds"] for r in results[row]]) / 60:.1f}',
              '-' if ROWS[row][4] is None else f'{ROWS[row][4]:.2f} (paper)')
             for row, label, images, mean, spread, n in summary]
    with open(osp.join(out_dir, 'classification_study.md'), 'w') as f:
        f.write('# Classification study: the normalization batch on Fashion-MNIST\n\n'
                f'Made by `python tools/study_classification.py` ({steps} SGD steps of '
                f'{IMAGES_PER_STEP} images = {steps * IMAGES_PER_STEP:,} training images, '
                f'seeds {", ".join(map(str, seeds))}, top-1 on the first '
                f'{test_images:,} test images; one thread). The recipe is in the '
                'docstring of mmnorm/studies/classification.py. The last column is the '
                'MABN paper\'s ImageNet ResNet-50 table, for the ordering only: a different '
                'data set and scale.\n\n')
        f.write(markdown_table(header, table))
        f.write(f'\n{ordering_verdict(summary)}\n\n![top-1 and loss](classification_study.png)\n')


def run_study(rows, seeds, steps, test_images, work_dir, out_dir, data_root=None,
              retrain=False):
    """Train (or read back from ``work_dir``) every row x seed, then write the
    table and the plot to ``out_dir``; returns the summary (see
    :func:`summarise`)."""
    os.makedirs(work_dir, exist_ok=True)
    data = load_data(data_root)
    results = {}
    for row in rows:
        results[row] = []
        for seed in seeds:
            path = osp.join(work_dir, f'{row}_seed{seed}.json')
            if osp.exists(path) and not retrain:
                with open(path) as f:
                    stored = json.load(f)
                if (stored['steps'], stored['test_images']) == (steps, test_images):
                    results[row].append(stored)
                    continue
            result = run(row, seed, steps, data, test_images)
            result.update(steps=steps, test_images=test_images)
            with open(path, 'w') as f:
                json.dump(result, f)
            results[row].append(result)
            print(f'[study] {row} seed {seed}: top-1 {result["top1"]:.2f} % '
                  f'({result["seconds"] / 60:.1f} min)', flush=True)
    summary = summarise(results, rows)
    write_report(summary, results, steps, seeds, test_images, out_dir)
    return summary
