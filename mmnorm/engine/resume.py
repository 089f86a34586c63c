"""Exact ``--resume``: the random states of the interrupted run go into every
checkpoint and come back on resume (:class:`ResumeRandomStateHook`, which
``mmnorm.engine.runner.build_runner`` registers for training)."""
import logging

from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

from .random_state import capture_random_state, restore_random_state

__all__ = ['ResumeRandomStateHook']


class _RestoreBeforeBatch:
    """Iterator over ``batches`` that passes ``skip`` batches through (the
    loop's replay after a resume) and restores ``state`` right before it
    fetches the next one."""

    def __init__(self, batches, skip: int, state: dict):
        self.batches, self.skip, self.state = batches, skip, state

    def __iter__(self):
        return self

    def __next__(self):
        if self.state is not None and self.skip == 0:
            restore_random_state(self.state)
            self.state = None
        self.skip -= 1
        return next(self.batches)


@HOOKS.register_module()
class ResumeRandomStateHook(Hook):
    """Resume with the random state the interrupted run had, so that
    ``--resume`` repeats the uninterrupted run (exactly, with deterministic
    settings, one process; tested in tests/engine/test_faults.py).

    What mmengine 0.10.7 restores by itself (``Runner.resume``): the model's
    parameters and buffers, the optimizer (with an AMP loss scaler), the
    parameter schedulers, the message hub, the epoch and iteration. The data
    order: ``InfiniteSampler`` draws its permutations from its own
    ``torch.Generator`` seeded with the run's seed, restarted by every run, and
    ``IterBasedTrainLoop.run`` replays (fetches and discards) the first
    ``iter`` batches before training on, so the next batch has the indices the
    uninterrupted run would take. With data-loader workers the replay also
    advances each worker's random state as in the uninterrupted run (mmengine's
    ``worker_init_fn`` seeds worker i with ``seed + i + rank * num_workers``
    whenever the workers start).

    What it does not: the main process's global random states. They restart
    from the seed, and with ``num_workers=0`` the replay runs the data pipeline
    (``RandomFlip`` draws from NumPy) ``iter`` times, so from the first resumed
    iteration the flips and the RoI samplers' draws (``torch.randperm`` in
    MMDetection's ``RandomSampler``) differ from the uninterrupted run.

    This hook adds those states to every checkpoint (key ``rng_states``) and,
    on resume, restores them right before the first new batch is fetched:
    after the replay of ``IterBasedTrainLoop`` (through a pass-through
    iterator; this is the case the tests check end to end), at the start of
    the resumed epoch of other loops (``EpochBasedTrainLoop`` resumes at the
    start of an epoch, before its data loader is iterated). Validation
    runs between a save of its training state and a restore of it, so the
    training stream does not depend on whether or when validation runs (a
    resumed run does not repeat a validation done before the checkpoint, and a
    validation's data loader draws its base seed from torch's generator). A
    checkpoint written during validation (``save_best``) stores the training
    state.

    A plain ``load_from`` (no resume) keeps the fresh seeded state. A resumed
    checkpoint without ``rng_states`` is resumed as mmengine does, with a
    warning. With several processes only rank 0 writes the checkpoint, so only
    rank 0's states are saved and restored; the other ranks resume as mmengine
    does (data order exact, augmentation and sampling draws not).
    """

    priority = 'NORMAL'
    CHECKPOINT_KEY = 'rng_states'

    def __init__(self):
        self._train_state = None  # training's state while a validation runs
        self._loaded = False  # a checkpoint was loaded, not acted on yet
        self._loaded_state = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint[self.CHECKPOINT_KEY] = (self._train_state if self._train_state is not None
                                           else capture_random_state())

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._loaded = True
        self._loaded_state = checkpoint.get(self.CHECKPOINT_KEY)

    def before_train_epoch(self, runner) -> None:
        if not self._loaded:
            return
        self._loaded = False
        state, self._loaded_state = self._loaded_state, None
        if runner.iter == 0 and runner.epoch == 0:
            return  # load_from, not a resume: the run starts its own random stream
        if state is None:
            print_log('mmnorm: the resumed checkpoint has no random state (written without '
                      'mmnorm.engine.resume.ResumeRandomStateHook): data augmentation and sampling '
                      'will differ from an uninterrupted run', logger='current',
                      level=logging.WARNING)
            return
        if get_world_size() > 1 and get_rank() != 0:
            return  # the checkpoint holds rank 0's states only
        loop = runner.train_loop
        if hasattr(loop, 'dataloader_iterator'):
            loop.dataloader_iterator = _RestoreBeforeBatch(loop.dataloader_iterator, runner.iter,
                                                           state)
            when = f'after the replay of {runner.iter} batches'
        else:
            restore_random_state(state)
            when = 'now'
        print_log(f'mmnorm: random state of the checkpoint restored {when}', logger='current')

    def before_val(self, runner) -> None:
        self._train_state = capture_random_state()

    def after_val(self, runner) -> None:
        if self._train_state is not None:
            restore_random_state(self._train_state)
            self._train_state = None
