"""DataLoader workers that end with the process that started them.

Why: after a SIGKILL of a tool its DataLoader workers stayed alive, orphans
holding their memory, until killed by hand. PyTorch's watchdog in each worker
(``ManagerWatchdog``) does notice within 5 s that the parent is gone, and the
worker leaves its loop; but it then exits through multiprocessing's
finalisers, which join its data queue's feeder thread. That thread is blocked
writing a batch into the queue's pipe: the message (a Mask R-CNN batch carries
its masks in it) is often larger than the pipe's 64 KiB buffer, only the dead
process read the pipe, and the sibling workers keep its read end open, so the
write neither completes nor fails. A sibling's feeder waits, as long, for the
queue's write lock.

How: on Linux each worker asks the kernel to SIGKILL it when its parent dies
(``prctl(PR_SET_PDEATHSIG)``), from the loader's ``worker_init_fn``, before
calling the one the loader had (mmengine's seeding or the config's own), so the
workers are seeded as before. On other systems nothing changes.
"""
import ctypes
import functools
import multiprocessing
import os
import signal
import sys

__all__ = ['die_with_parent', 'end_with_this_process', 'end_workers_with_runner']

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(worker_id, parent_pid, then=None):
    """A ``worker_init_fn``: have this worker SIGKILLed when its parent,
    ``parent_pid``, ends; exit at once if it already has (this worker was given
    to another parent before the request, which then never fires); then call
    ``then(worker_id)``, the loader's own ``worker_init_fn``, if any."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f'prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}')
    if os.getppid() != parent_pid:
        os._exit(1)
    if then is not None:
        then(worker_id)


def end_with_this_process(loader):
    """Make the workers of ``loader`` (a DataLoader this process iterates)
    end with this process; returns ``loader``. Linux only, and not for workers
    started by a fork server, whose parent is the server.

    The kernel signals a worker when the thread that started it ends: iterate
    the loader in a thread that lives as long as its workers should (the main
    thread, as mmengine's loops do)."""
    context = loader.multiprocessing_context or multiprocessing
    if not sys.platform.startswith('linux') or context.get_start_method() == 'forkserver':
        return loader
    loader.worker_init_fn = functools.partial(die_with_parent, parent_pid=os.getpid(),
                                              then=loader.worker_init_fn)
    return loader


def end_workers_with_runner(runner):
    """Apply :func:`end_with_this_process` to every loader ``runner`` builds
    (mmengine's training, validation and test loops build theirs with
    ``runner.build_dataloader``)."""
    build = runner.build_dataloader

    @functools.wraps(build)
    def build_dataloader(*args, **kwargs):
        return end_with_this_process(build(*args, **kwargs))

    runner.build_dataloader = build_dataloader
