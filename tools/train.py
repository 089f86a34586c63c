"""Train a detector whose config may use mmnorm's normalization layers.

Same command line as MMDetection 3.x's tools/train.py, e.g.
    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]]
    bash tools/dist_train.sh CONFIG NUM_PROCS [...]
"""
import argparse

from mmdet.utils import setup_cache_size_limit_of_dynamo

import mmnorm  # noqa: F401  (registers the layers even without custom_imports)
from mmnorm.engine.command_line import UsageError, add_common_args, parse_common, run_tool
from mmnorm.engine.config import load_config
from mmnorm.engine.distributed import report_rank_finished
from mmnorm.engine.runner import build_runner


def parse_args():
    p = argparse.ArgumentParser(description='Train a detector (mmnorm)')
    p.add_argument('config', help='train config file path')
    p.add_argument('--work-dir', help='the dir to save logs and models')
    p.add_argument('--amp', action='store_true',
                   help='enable automatic-mixed-precision training (without a GPU: '
                   'bfloat16 autocast on the CPU, see mmnorm.engine.amp.CPUAmpOptimWrapper)')
    p.add_argument('--auto-scale-lr', action='store_true',
                   help='scale the LR by the actual total batch size')
    p.add_argument('--resume', nargs='?', type=str, const='auto',
                   help='resume from this checkpoint; without a path, from '
                   'the latest checkpoint in the work dir (a truncated or corrupt one is '
                   'refused, see mmnorm.engine.checkpoint_check)')
    add_common_args(p)
    args = parse_common(p)
    return args


def main():
    args = parse_args()
    setup_cache_size_limit_of_dynamo()
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.launcher)

    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        scale = cfg.get('auto_scale_lr') or {}
        if 'enable' not in scale or 'base_batch_size' not in scale:
            raise UsageError('--auto-scale-lr needs auto_scale_lr=dict('
                             'enable=..., base_batch_size=...) in the config')
        cfg.auto_scale_lr.enable = True

    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume

    runner = build_runner(cfg, 'train')
    runner.train()
    report_rank_finished('training', runner)


if __name__ == '__main__':
    run_tool(main)
