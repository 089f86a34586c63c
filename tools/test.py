"""Test (and evaluate) a detector whose config may use mmnorm's layers.

Same command line as MMDetection 3.x's tools/test.py, e.g.
    python tools/test.py CONFIG CHECKPOINT [--out results.pkl]
    bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [...]
CHECKPOINT may also be a file written by tools/deploy.py: the folded model it
holds is evaluated instead of the config's model. --precise-bn N first
recomputes the norms' inference statistics from N training batches
(mmnorm/engine/precise_bn.py), with the checkpoint's weights.
"""
import argparse

from mmdet.evaluation import DumpDetResults
from mmdet.utils import setup_cache_size_limit_of_dynamo
from mmengine.runner import Runner

import mmnorm  # noqa: F401  (registers the layers even without custom_imports)
from mmnorm.checkpoints.deployed import load_deployed, use_deployed_model
from mmnorm.engine.command_line import UsageError, add_common_args, parse_common, run_tool
from mmnorm.engine.config import load_config
from mmnorm.engine.data_check import check_data_present
from mmnorm.engine.distributed import report_rank_finished
from mmnorm.engine.precise_bn import PreciseBNHook
from mmnorm.engine.runner import build_runner


def parse_args():
    p = argparse.ArgumentParser(description='Test a detector (mmnorm)')
    p.add_argument('config', help='test config file path')
    p.add_argument('checkpoint', help='checkpoint file')
    p.add_argument('--work-dir', help='the dir to save evaluation metrics')
    p.add_argument('--out', help='dump predictions to this .pkl file')
    p.add_argument('--show-dir', help='save painted predictions under '
                   'work_dir/TIMESTAMP/SHOW_DIR')
    p.add_argument('--precise-bn', type=int, metavar='N',
                   help='before testing, recompute the inference statistics of every '
                   'BN-family layer from N batches of the config\'s training data '
                   '(PreciseBNHook), keeping the weights (default: use the checkpoint\'s)')
    add_common_args(p)
    args = parse_common(p)
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        p.error('--out must be a .pkl or .pickle file')
    if args.precise_bn is not None and args.precise_bn < 1:
        p.error(f'--precise-bn must be at least 1, got {args.precise_bn}')
    return args


def main():
    args = parse_args()
    setup_cache_size_limit_of_dynamo()
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    deployed = load_deployed(args.checkpoint)
    cfg.load_from = None if deployed is not None else args.checkpoint
    if args.precise_bn is not None:
        if deployed is not None:
            raise UsageError('--precise-bn needs a training checkpoint: the deployed '
                             f'model in {args.checkpoint} has its norms folded away')
        check_data_present(cfg, 'train')

    if args.show_dir:
        if 'visualization' not in cfg.default_hooks:
            raise RuntimeError('--show-dir needs a visualization hook in '
                               'default_hooks')
        cfg.default_hooks.visualization.draw = True
        cfg.default_hooks.visualization.test_out_dir = args.show_dir

    runner = build_runner(cfg, 'test')
    if deployed is not None:
        use_deployed_model(runner, deployed)
    if args.precise_bn is not None:
        runner.load_or_resume()  # the checkpoint's weights first; runner.test() keeps them
        PreciseBNHook(args.precise_bn).recompute(
            runner, 'before testing', Runner.build_dataloader(cfg.train_dataloader))
    if args.out is not None:
        runner.test_evaluator.metrics.append(
            DumpDetResults(out_file_path=args.out))
    runner.test()
    report_rank_finished('testing')


if __name__ == '__main__':
    run_tool(main)
