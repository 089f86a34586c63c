"""mmnorm.engine.collect_dir, in process (2-process runs of the tools that
leave nothing outside their work dirs: tests/test_tools.py)."""
from types import SimpleNamespace

from mmengine.evaluator import BaseMetric, Evaluator

from mmnorm.engine.collect_dir import CollectInWorkDirHook


class NoMetric(BaseMetric):
    def process(self, data_batch, data_samples):
        pass

    def compute_metrics(self, results):
        return {}


def test_hook_gives_the_work_dir_to_metrics_that_name_no_folder(tmp_path):
    """Validation and test: a metric that collects on the CPU without a folder
    gets WORK_DIR/.dist_test; one with its own folder, or collecting on a GPU,
    is left as it is."""
    for hook_point in ('before_val', 'before_test'):
        own = str(tmp_path / 'own')
        metrics = [NoMetric(), NoMetric(collect_dir=own), NoMetric(collect_device='gpu')]
        loop = SimpleNamespace(evaluator=Evaluator(metrics))
        runner = SimpleNamespace(work_dir=str(tmp_path), val_loop=loop, test_loop=loop)
        getattr(CollectInWorkDirHook(), hook_point)(runner)
        assert [m.collect_dir for m in metrics] == [str(tmp_path / '.dist_test'), own, None]
