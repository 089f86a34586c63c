"""The DataLoader workers of a killed tool end with it
(mmnorm.engine.workers), and the workers are seeded as before.

End to end, tools/train.py and tools/test.py run the tiny Mask R-CNN
(tests/configs/tiny_mask_rcnn.py) with 2 workers per loader in a subprocess,
are SIGKILLed while their workers run, and every worker must be gone within
WORKERS_GONE_WITHIN seconds. Without mmnorm.engine.workers, workers with a
batch left to send stayed: PyTorch's watchdog ends each worker's loop, but the
worker's exit then waits forever for its data queue's feeder thread, blocked
writing the batch into the pipe nobody reads any more (see that module's
docstring).
"""
import ctypes
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from conftest import REPO, TOOL_TIMEOUT, tool_env, write_tiny_coco

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'),
                                reason='workers are tied to their parent on Linux only')

CONFIG = REPO / 'tests' / 'configs' / 'tiny_mask_rcnn.py'
WORKERS_GONE_WITHIN = 10  # seconds
PR_GET_PDEATHSIG = 2  # <linux/prctl.h>


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """The tiny COCO set with 16 validation images, so that a validation or a
    test lasts long enough to be caught with its workers running, of 256 px:
    the masks of one image then make a batch's message larger than a pipe's
    buffer (64 KiB), as 5 garments' masks do in one scene of the demo (the
    test pipeline loads the masks after resizing the image)."""
    return write_tiny_coco(tmp_path_factory.mktemp('data') / 'tiny_coco', num_val=16, size=256)


def with_workers(data, *options):
    """--cfg-options for the tiny set with 2 workers in each loader."""
    return ['--cfg-options', *data.cfg_options(), *options,
            *[f'{loader}_dataloader.{key}' for loader in ('train', 'val', 'test')
              for key in ('num_workers=2', 'persistent_workers=False')]]


def command_line(pid):
    try:
        return Path(f'/proc/{pid}/cmdline').read_bytes()
    except OSError:
        return b''


def worker_pids(pid):
    """The DataLoader workers of process ``pid``: its children that run its
    command (forked from it)."""
    children = []
    for listing in Path(f'/proc/{pid}/task').glob('*/children'):
        try:
            children += [int(child) for child in listing.read_text().split()]
        except OSError:  # the thread ended
            pass
    command = command_line(pid)
    return [child for child in children if command_line(child) == command]


def running(pid):
    """Whether ``pid`` exists and is not a zombie (ended, not yet reaped)."""
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def kill_once_workers_run(command, count, progress, log_path):
    """Start ``command``; once its process has ``count`` workers and has
    logged ``progress`` (its workers have delivered batches and load more),
    SIGKILL it (the process alone); return the workers' pids."""
    with open(log_path, 'w') as log:
        proc = subprocess.Popen([str(c) for c in command], cwd=REPO,
                                env=tool_env(OMP_NUM_THREADS='1'), stdout=log,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TOOL_TIMEOUT
    try:
        while (len(workers := worker_pids(proc.pid)) < count
               or progress not in log_path.read_text()):
            assert proc.poll() is None, (f'the run ended before {count} workers ran after '
                                         f'{progress!r}:\n{log_path.read_text()[-4000:]}')
            assert time.monotonic() < deadline, f'timed out waiting for {progress!r}'
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return workers


def assert_gone(pids, seconds=WORKERS_GONE_WITHIN):
    """Every process of ``pids`` ends within ``seconds``; those that do not
    are killed after the check, so that a failure leaves none behind."""
    deadline = time.monotonic() + seconds
    while (alive := [pid for pid in pids if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not alive, (f'workers {alive} of {pids} still ran {seconds} s after their '
                           'parent was killed')
    finally:
        for pid in alive:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.end_to_end
def test_killed_training_ends_its_training_and_validation_workers(data, tmp_path):
    """Killed while validating after iteration 1: the 2 workers of the
    training loader (they stay while validating) and the 2 of the validation
    loader end with the run."""
    workers = kill_once_workers_run(
        [sys.executable, REPO / 'tools' / 'train.py', CONFIG, '--work-dir', tmp_path / 'work',
         *with_workers(data, 'train_cfg.max_iters=50', 'train_cfg.val_interval=1')],
        count=4, progress='Iter(val) [ 1/16]', log_path=tmp_path / 'train.log')
    assert_gone(workers)


@pytest.mark.end_to_end
def test_killed_test_ends_its_test_workers(data, tmp_path):
    """Killed while testing: the 2 workers of the test loader end with the run."""
    checkpoint = tmp_path / 'untrained.pth'  # the model keeps its initial weights
    torch.save({'state_dict': {}}, checkpoint)
    workers = kill_once_workers_run(
        [sys.executable, REPO / 'tools' / 'test.py', CONFIG, checkpoint,
         '--work-dir', tmp_path / 'work', *with_workers(data)],
        count=2, progress='Iter(test) [ 1/16]', log_path=tmp_path / 'test.log')
    assert_gone(workers)


# ------------------------------------------------------------- in process
def parent_death_signal():
    """The signal this process gets when its parent ends (0: none)."""
    value = ctypes.c_int()
    ctypes.CDLL(None).prctl(PR_GET_PDEATHSIG, ctypes.byref(value))
    return value.value


class RandomDraws(Dataset):
    """Item i: a torch, a numpy and a Python random number drawn in the worker
    that loads it, and that worker's parent-death signal."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return dict(draws=(torch.rand(1).item(), np.random.rand(), random.random()),
                    signal=parent_death_signal())


def seed_with(worker_id, base):
    """A config's own worker_init_fn: every generator seeded with base + worker_id."""
    seed_everything(base + worker_id)


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def only_item(batch):
    """Collate a batch of one item to that item."""
    return batch[0]


def expected_draws(first_seed):
    """The draws of items 0..3 when worker w (of 2; item i is loaded by worker
    i % 2, as its draw number i // 2) is seeded with first_seed + w."""
    draws = {}
    for worker in (0, 1):
        seed_everything(first_seed + worker)
        for index in (worker, worker + 2):
            draws[index] = (torch.rand(1).item(), np.random.rand(), random.random())
    return [draws[index] for index in range(4)]


@pytest.mark.parametrize('worker_init_fn, first_seed', [
    (None, 0),  # mmengine's seeding: num_workers * rank + worker_id + seed
    (dict(type=seed_with, base=100), 100),
], ids=['mmengine seeding', "the config's worker_init_fn"])
def test_tied_workers_are_seeded_as_before(worker_init_fn, first_seed):
    """The worker_init_fn the loader had still runs in each worker, after the
    parent-death signal (SIGKILL) is set: the workers draw the same numbers as
    without it."""
    from mmengine.runner import Runner

    from mmnorm.engine.workers import end_with_this_process

    cfg = dict(dataset=RandomDraws(), sampler=dict(type='DefaultSampler', shuffle=False),
               batch_size=1, num_workers=2, persistent_workers=False,
               collate_fn=dict(type=only_item))
    if worker_init_fn is not None:
        cfg['worker_init_fn'] = worker_init_fn
    plain = list(Runner.build_dataloader(cfg, seed=0))
    tied = list(end_with_this_process(Runner.build_dataloader(cfg, seed=0)))
    assert [item['draws'] for item in tied] == expected_draws(first_seed)
    assert [item['draws'] for item in tied] == [item['draws'] for item in plain]
    assert [item['signal'] for item in plain] == [0] * 4
    assert [item['signal'] for item in tied] == [signal.SIGKILL] * 4


@pytest.mark.parametrize('parent, exitcode', [('its parent', 0), ('another process', 1)])
def test_worker_whose_parent_already_ended_exits(parent, exitcode):
    """A worker re-parented before it asked for the signal (it is told a pid
    that is not its parent's here) exits at once instead of running on."""
    from mmnorm.engine.workers import die_with_parent

    parent_pid = os.getpid() if parent == 'its parent' else 1
    worker = multiprocessing.get_context('fork').Process(
        target=die_with_parent, args=(0,), kwargs=dict(parent_pid=parent_pid))
    worker.start()
    worker.join(TOOL_TIMEOUT)
    assert worker.exitcode == exitcode


def test_fork_server_workers_are_left_alone():
    """A fork server's workers are its children, not this process's: their
    worker_init_fn is left as it is."""
    from mmnorm.engine.workers import end_with_this_process

    loader = torch.utils.data.DataLoader(range(4), num_workers=2,
                                         multiprocessing_context='forkserver')
    assert end_with_this_process(loader).worker_init_fn is None
