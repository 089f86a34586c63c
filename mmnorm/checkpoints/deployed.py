"""The deployed file: a folded model (:func:`mmnorm.surgery.fuse.fuse`) pickled
whole, written by ``tools/deploy.py CONFIG CHECKPOINT OUT`` (``--to module``)
and evaluated by ``tools/test.py CONFIG OUT``.

The file is one ``torch.save``'d dict::

    {'deployed_model': the folded nn.Module (no mmnorm module in it),
     'meta': {'config': str, 'checkpoint': str, 'torch_version': str,
              'report': {'<action> <class name>': count}}}

The module is pickled, not stored as a state dict, because its architecture
is no longer the config's (its norms are folded away). It loads without
mmnorm, but unpickling runs code: only load files you trust. README,
"Deployment and conversion", says when to use it and when the plain
MMDetection pair (:mod:`mmnorm.checkpoints.plain_mmdet`).
"""
import os.path as osp

import torch
from torch import nn

from .._torch import load_mapped
from ..surgery.fuse import fuse, mmnorm_modules
from ..surgery.report import SurgeryReport

__all__ = ['DEPLOYED_KEY', 'deploy_checkpoint', 'load_deployed', 'save_deployed',
           'use_deployed_model']

#: The key of the module in a file written by :func:`save_deployed`.
DEPLOYED_KEY = 'deployed_model'


def save_deployed(model, path, meta):
    """Write ``dict(deployed_model=model, meta=meta)`` with ``torch.save``
    (the whole module pickled: its architecture differs from the config's)."""
    torch.save({DEPLOYED_KEY: model, 'meta': meta}, path)


def load_deployed(path):
    """The dict written by :func:`save_deployed` if ``path`` is such a file,
    else None (another checkpoint, a URL, a missing file: left to the usual
    checkpoint loading).

    The file is unpickled with ``weights_only=False``: only pass files you
    trust. Tensors are memory-mapped while checking (torch >= 2.1; torch 2.0
    reads the file into memory), so an ordinary checkpoint is not read here."""
    if not osp.isfile(path):
        return None
    try:
        content = load_mapped(path)
    except RuntimeError:  # e.g. the legacy (non-zip) format, which cannot be mapped
        return None
    if isinstance(content, dict) and isinstance(content.get(DEPLOYED_KEY), nn.Module):
        return content
    return None


def use_deployed_model(runner, deployed):
    """Make ``runner`` (an mmengine Runner built for testing, without
    ``load_from``) evaluate the module of ``deployed`` (from
    :func:`load_deployed`): it is moved and wrapped as the Runner does with
    the model it builds, and replaces ``runner.model``."""
    model = deployed[DEPLOYED_KEY]
    model.eval()  # (some modules' train() returns None: not chained)
    runner.model = runner.wrap_model(runner.cfg.get('model_wrapper_cfg'), model)
    runner.logger.info('mmnorm: evaluating the deployed (folded) model; made from '
                       f'{deployed["meta"].get("checkpoint")}')


def deploy_checkpoint(config, checkpoint, out, cfg_options=None):
    """Build the model of ``config`` (with ``cfg_options`` merged), load
    ``checkpoint`` (refused first if truncated or corrupt) with strict key
    checking, fuse it and save it to ``out`` (:func:`save_deployed`). Returns
    the :func:`~mmnorm.surgery.fuse.fuse` report (a
    :class:`~mmnorm.surgery.report.SurgeryReport`). Raises a RuntimeError if
    an mmnorm module would be left in the file."""
    from mmengine.registry import MODELS, DefaultScope
    from mmengine.runner import load_checkpoint

    from ..engine.checkpoint_check import verify_checkpoint
    from ..engine.config import load_config
    cfg = load_config(config, cfg_options)
    verify_checkpoint(checkpoint)
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope', 'mmdet')):
        model = MODELS.build(cfg.model)
    load_checkpoint(model, checkpoint, map_location='cpu', strict=True, logger='current')
    report = SurgeryReport()
    model = fuse(model, report)
    left = mmnorm_modules(model)
    if left:
        raise RuntimeError(f'deploy: these modules of {config} are mmnorm classes that fuse '
                           f'cannot replace, so {out} would need mmnorm to load: {left}')
    meta = dict(config=str(config), checkpoint=str(checkpoint),
                report={f'{action} {what}': n for (action, what), n in report.counts().items()},
                torch_version=torch.__version__)
    save_deployed(model, out, meta)
    return report
