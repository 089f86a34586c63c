"""``bash tools/bootstrap.sh test`` runs one pytest-xdist worker per core that
the process may use: ``bash tools/bootstrap.sh workers`` prints that count, as
the test command computes it (without setting anything up)."""
import os

from conftest import REPO, run, tool_env

BOOTSTRAP = REPO / 'tools' / 'bootstrap.sh'


def workers(cpus=None, **env):
    """What ``bootstrap.sh workers`` prints with ``env`` added (and
    MMNORM_TEST_WORKERS unset unless given), run on ``cpus`` only if given."""
    environment = tool_env(**env)
    if 'MMNORM_TEST_WORKERS' not in env:
        environment.pop('MMNORM_TEST_WORKERS', None)
    command = ['bash', BOOTSTRAP, 'workers']
    if cpus is not None:
        command = ['taskset', '-c', ','.join(map(str, cpus))] + command
    return run(command, env=environment).stdout.strip()


def test_workers_are_the_cores_this_process_may_use_not_omp_num_threads():
    """OMP_NUM_THREADS=1 (as the suite's own workers have on 2 cores) made
    ``nproc`` print 1; the count is the CPU affinity's size, whatever
    OMP_NUM_THREADS says, and follows a narrower affinity (taskset)."""
    cores = sorted(os.sched_getaffinity(0))
    assert workers(OMP_NUM_THREADS='1') == str(len(cores))
    assert workers(OMP_NUM_THREADS='1', OMP_THREAD_LIMIT='1') == str(len(cores))
    assert workers(cpus=cores[:1], OMP_NUM_THREADS=str(len(cores))) == '1'
    assert workers(MMNORM_TEST_WORKERS='3', OMP_NUM_THREADS='1') == '3'
