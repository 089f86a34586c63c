"""Precise inference statistics for every BN-family layer (PreciseBN; Wu and
Johnson, "Rethinking 'Batch' in BatchNorm", 2021).

The running statistics a norm layer infers with are moving averages of noisy
per-batch figures, taken while the weights moved. :func:`precise_statistics`
recomputes them with the current weights: it runs ``num_iters`` batches
through the model in training mode without gradients and sets, per layer that
trains (BatchNorm, SyncBatchNorm, BRN, CBN: ``running_mean`` and
``running_var``; MABN: ``running_var``, its second moment), from that layer's
inputs x over all batches (per channel, every dim but 1 reduced):

    running_mean = mean(x)                     (the population mean)
    running_var  = var(x), unbiased            (BN-family: the variance of the union
                                                of the batches = mean of the batch
                                                variances + variance of the batch
                                                means, batches weighted by their
                                                element counts)
    running_var  = mean(x^2)                   (MABN)

Everything else is left as it was: weights, every other buffer (step
counters, MABN's windows, CBN's history; the batches' training-mode updates
are undone), the training mode and the random states. Layers that do not train
(``norm_eval``, frozen stages: in eval mode after ``model.train()``) are left
alone; a batch with no element for a layer (no RoI) is skipped for that layer.
With torch.distributed initialised, the sums are added over all processes, so
every process gets the same statistics. :class:`PreciseBNHook` runs it in a
Runner.
"""
import time

import torch
import torch.distributed as dist
from mmengine.dist import get_dist_info
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from ..layers.distributed import sync_world
from .random_state import capture_random_state, restore_random_state

__all__ = ['PreciseBNHook', 'precise_statistics', 'trained_norms']


def trained_norms(model):
    """(name, layer) of the BN-family layers of ``model`` that train: running
    statistics tracked and in training mode after ``model.train()``."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_var is not None
            and m.training]


class _Sums:
    """Per-channel sums of x and x^2 (float64), the element count and the
    number of batches that reached the layer."""

    def __init__(self):
        self.total = self.square = None
        self.count = 0
        self.batches = 0

    def __call__(self, module, args):
        x = args[0]
        count = x.numel() // x.size(1)
        if count == 0:
            return
        dims = [0] + list(range(2, x.dim()))
        total = x.sum(dims, dtype=torch.float64)
        square = torch.linalg.vector_norm(x, 2, dims, dtype=torch.float64).square()
        if self.total is None:
            self.total, self.square = total, square
        else:
            self.total, self.square = self.total + total, self.square + square
        self.count += count
        self.batches += 1


@torch.no_grad()
def precise_statistics(model, batches, num_iters, forward=None):
    """Recompute the inference statistics of ``model``'s BN-family layers (see
    the module docstring).

    Args:
        model (nn.Module): the model; its training mode is restored.
        batches (iterable): what ``forward`` takes, one item per iteration.
        num_iters (int): how many items of ``batches`` to run (fewer if it ends).
        forward (callable): ``forward(model, batch)``; default ``model(batch)``.

    Returns:
        dict: ``layers`` {name: batches used}, ``skipped`` [names of layers no
        batch reached], ``iters`` (items run) and ``seconds``.
    """
    start = time.perf_counter()
    forward = forward or (lambda module, batch: module(batch))
    was_training = model.training
    model.train()
    norms = trained_norms(model)
    saved = {name: dict(m._buffers) for name, m in norms}  # the tensors themselves ...
    values = {name: {k: b.clone() for k, b in m._buffers.items() if b is not None}
              for name, m in norms}  # ... and their values, both restored afterwards
    states = capture_random_state()
    sums = {name: _Sums() for name, _ in norms}
    handles = [m.register_forward_pre_hook(sums[name]) for name, m in norms]
    iters = 0
    try:
        for batch in batches:
            if iters == num_iters:
                break
            forward(model, batch)
            iters += 1
    finally:
        for handle in handles:
            handle.remove()
        for name, m in norms:
            m._buffers.update(saved[name])
            for key, value in values[name].items():
                m._buffers[key].copy_(value)
        restore_random_state(states)
        model.train(was_training)
    report = dict(layers={}, skipped=[], iters=iters)
    for name, m in norms:
        total, square, count = _combined(sums[name], m)
        if count == 0:
            report['skipped'].append(name)
            continue
        mean, second = total / count, square / count
        if not getattr(m, 'SUBTRACTS_MEAN', True):  # MABN: the second moment
            m.running_var.copy_(second.to(m.running_var.dtype))
        else:
            var = (second - mean.square()).clamp_min(0) * (count / max(count - 1, 1))
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
        report['layers'][name] = sums[name].batches
    report['seconds'] = time.perf_counter() - start
    return report


def _combined(sums, layer):
    """(sum of x, sum of x^2, count) over this process, or over all processes
    (one all-reduce of 2C + 1 numbers per layer)."""
    channels = layer.num_features
    device = layer.running_var.device
    total = sums.total if sums.total is not None else torch.zeros(channels, dtype=torch.float64,
                                                                   device=device)
    square = sums.square if sums.square is not None else torch.zeros_like(total)
    if not sync_world():
        return total, square, sums.count
    packed = torch.cat([total.to(device), square.to(device),
                        torch.tensor([float(sums.count)], dtype=torch.float64, device=device)])
    dist.all_reduce(packed)
    return packed[:channels], packed[channels:2 * channels], int(packed[-1].item())


@HOOKS.register_module()
class PreciseBNHook(Hook):
    """Recompute the inference statistics (:func:`precise_statistics`) with
    ``num_iters`` training batches after the training iteration (or epoch)
    that a validation follows, and after the last one: before the checkpoint
    of that step is written (CheckpointHook runs later), so validation, the
    checkpoint and every process see the same statistics. Config::

        custom_hooks = [dict(type='PreciseBNHook', num_iters=200)]

    The batches come from the training data set, read by a loader of the
    hook's own (same batch size and collate function, no workers, this
    process's share of the first ``num_iters`` x batch size x processes
    samples in order), so the training loader's position is untouched, and the
    random states are restored: a resumed run ends as an uninterrupted one.
    The model runs as in training: ``data_preprocessor(batch, True)``, then
    ``mode='loss'``, without gradients.
    """

    priority = 'ABOVE_NORMAL'

    def __init__(self, num_iters=200):
        if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
            raise ValueError(f'PreciseBNHook: num_iters must be an int >= 1, got {num_iters!r}')
        self.num_iters = num_iters
        self.reports = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if not isinstance(runner.train_loop, EpochBasedTrainLoop):
            self._recompute_if_due(runner, runner.iter + 1, runner.train_loop.max_iters,
                                   'iteration')

    def after_train_epoch(self, runner):
        if isinstance(runner.train_loop, EpochBasedTrainLoop):
            self._recompute_if_due(runner, runner.epoch + 1, runner.train_loop.max_epochs,
                                   'epoch')

    def _recompute_if_due(self, runner, done, last, unit):
        loop = runner.train_loop
        validates = (getattr(runner, 'val_loop', None) is not None
                     and done >= getattr(loop, 'val_begin', 1)
                     and (done % getattr(loop, 'val_interval', last + 1) == 0 or done == last))
        if validates or done == last:
            self.recompute(runner, f'after {unit} {done}')

    def recompute(self, runner, when, loader=None):
        """Recompute now; ``loader`` (default the runner's training loader)
        gives the data set, batch size and collate function."""
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if loader is None:
            loader = runner.train_dataloader
        rank, world = get_dist_info()
        size = loader.batch_size
        share = list(range(rank, min(len(loader.dataset), self.num_iters * size * world), world))
        batches = DataLoader(loader.dataset, batch_size=size, sampler=share,
                             collate_fn=loader.collate_fn, num_workers=0)

        def forward(module, batch):
            module(**module.data_preprocessor(batch, True), mode='loss')

        report = precise_statistics(model, batches, self.num_iters, forward)
        self.reports.append(report)
        skipped = f'; no batch reached {report["skipped"]}' if report['skipped'] else ''
        print_log(f'PreciseBNHook ({when}): statistics of {len(report["layers"])} layers '
                  f'recomputed from {report["iters"]} batches of {size} per process in '
                  f'{report["seconds"]:.1f} s{skipped}', logger='current')
