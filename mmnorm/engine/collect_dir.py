"""Multi-process evaluations collect their results in the work dir.

Why: with ``collect_device='cpu'`` (the default), a metric gathers the
processes' results through files (mmengine's ``collect_results_cpu``); when
the metric names no ``collect_dir``, they go to a temporary folder in
``./.dist_test``, which mmengine leaves in the current directory. MMDetection
3.3's metrics (CocoMetric, DumpDetResults, ...) take no ``collect_dir``
argument, so a config cannot name one.

How: :class:`CollectInWorkDirHook` sets ``collect_dir`` to ``WORK_DIR/.dist_test``
on each such metric at the start of every validation and test, so metrics
added to an evaluator after the runner is built (``tools/test.py --out``) are
included. Rank 0 removes the folder after each collection (mmengine does), and
the metrics of one evaluator collect one after the other, so they can share it.
"""
import os.path as osp

from mmengine.hooks import Hook

__all__ = ['CollectInWorkDirHook']


class CollectInWorkDirHook(Hook):
    """Give the metrics that collect results through files and name no folder
    ``WORK_DIR/.dist_test`` as ``collect_dir``."""

    def before_val(self, runner):
        self._collect_in_work_dir(runner.val_loop, runner.work_dir)

    def before_test(self, runner):
        self._collect_in_work_dir(runner.test_loop, runner.work_dir)

    @staticmethod
    def _collect_in_work_dir(loop, work_dir):
        evaluator = getattr(loop, 'evaluator', None)
        for metric in getattr(evaluator, 'metrics', ()):
            if metric.collect_device == 'cpu' and metric.collect_dir is None:
                metric.collect_dir = osp.join(work_dir, '.dist_test')
