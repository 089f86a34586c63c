"""Build mmengine's Runner for tools/train.py and tools/test.py: :func:`build_runner`.

In order: the data of the phase is on disk (:mod:`mmnorm.engine.data_check`),
the checkpoint to load is intact (:mod:`mmnorm.engine.checkpoint_check`),
distributed set-up (:mod:`mmnorm.engine.distributed`), ``--amp`` without an
accelerator (:mod:`mmnorm.engine.amp`), the Runner the config asks for, then
the additions to it: data-loader workers that end with the process
(:mod:`mmnorm.engine.workers`), results collected in the work dir
(:mod:`mmnorm.engine.collect_dir`) and, for training, atomic checkpoint writes
and the random state in every checkpoint (:mod:`mmnorm.engine.resume`).
The config comes from :func:`mmnorm.engine.config.load_config`.
"""
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from . import checkpoint_check
from .amp import use_cpu_amp
from .collect_dir import CollectInWorkDirHook
from .data_check import check_data_present
from .distributed import setup_distributed
from .resume import ResumeRandomStateHook
from .workers import end_workers_with_runner

__all__ = ['build_runner']


def _check_checkpoint(cfg, phase) -> None:
    """Raise ``CheckpointFileError`` if the checkpoint the run will load is
    missing, truncated or corrupt: ``--resume`` without a path (the one
    ``WORK_DIR/last_checkpoint`` names), ``--resume PATH`` or ``load_from`` when
    training, the CHECKPOINT argument when testing."""
    resume = phase == 'train' and bool(cfg.get('resume'))
    if resume and cfg.get('load_from') is None:
        checkpoint_check.latest_checkpoint(cfg.work_dir)
    elif cfg.get('load_from'):
        what = '--resume' if resume else 'load_from' if phase == 'train' else 'checkpoint'
        checkpoint_check.verify_checkpoint(cfg.load_from, what)


def build_runner(cfg, phase):
    """Check that the data of ``phase`` ('train' or 'test') is on disk and that
    the checkpoint to load is intact (clear errors otherwise, see
    :data:`mmnorm.engine.command_line.USER_ERRORS`), set up distributed
    training for ``cfg.launcher`` and AMP on the CPU, and build the runner the
    config asks for. Its data-loader workers end with the process
    (:mod:`mmnorm.engine.workers`) and its evaluations collect the processes'
    results in the work dir (:mod:`mmnorm.engine.collect_dir`). For training,
    its checkpoints are then written atomically and carry the random state
    (:class:`ResumeRandomStateHook`)."""
    check_data_present(cfg, phase)
    _check_checkpoint(cfg, phase)
    setup_distributed(cfg, cfg.launcher)
    if phase == 'train':
        use_cpu_amp(cfg)
    runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
    end_workers_with_runner(runner)
    runner.register_hook(CollectInWorkDirHook())
    if phase == 'train':
        checkpoint_check.make_checkpoint_saves_atomic(runner)
        if not any(isinstance(hook, ResumeRandomStateHook) for hook in runner.hooks):
            runner.register_hook(ResumeRandomStateHook())
    return runner
