"""Distributed runs of the tools, on GPUs and on CPU processes alike.

``--launcher pytorch|slurm|mpi`` works on machines without CUDA:
:func:`setup_distributed` initialises torch.distributed with the gloo backend
from the launcher's environment and wraps the model in
:class:`CPUDistributedDataParallel` (DDP without ``device_ids``); with CUDA,
mmengine's usual NCCL path is left untouched. :func:`end_distributed` leaves
the process group before interpreter shutdown, and
:func:`report_rank_finished` says on every rank that a run finished.
"""
import datetime
import gc
import os
import subprocess
from typing import Optional

import torch
import torch.distributed as torch_dist
from mmengine.logging import print_log
from mmengine.model.wrappers import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS
from torch.nn.parallel import DistributedDataParallel

__all__ = ['CPUDistributedDataParallel', 'end_distributed', 'report_rank_finished',
           'setup_distributed']

#: Port used for the rendezvous when neither the config nor the environment
#: names one (the same default as torch.distributed and mmengine).
DEFAULT_MASTER_PORT = '29500'


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` that also accepts a CPU module.

    mmengine's Runner always passes ``device_ids=[LOCAL_RANK]`` to a
    DistributedDataParallel wrapper, which PyTorch rejects for a module whose
    parameters live on the CPU. This wrapper drops ``device_ids`` and
    ``output_device`` in that case and is otherwise identical.
    """

    def __init__(self, module, **kwargs):
        params = list(module.parameters())
        if params and all(p.device.type == 'cpu' for p in params):
            kwargs.pop('device_ids', None)
            kwargs.pop('output_device', None)
        super().__init__(module=module, **kwargs)


def _rank_prefix() -> str:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return (f'[mmnorm rank {torch_dist.get_rank()}/'
                f'{torch_dist.get_world_size()}]')
    return '[mmnorm]'


def _say(msg: str) -> None:
    """Print on every rank (mmengine's logger mutes ranks > 0)."""
    print(f'{_rank_prefix()} {msg}', flush=True)


def _env_from_slurm(port: Optional[int]) -> None:
    proc_id = int(os.environ['SLURM_PROCID'])
    ntasks = int(os.environ['SLURM_NTASKS'])
    local_id = os.environ.get('SLURM_LOCALID')
    if local_id is not None:
        local_rank = int(local_id)
    else:
        per_node = int(os.environ.get('SLURM_NTASKS_PER_NODE', '1').split('(')[0])
        local_rank = proc_id % max(per_node, 1)
    if 'MASTER_ADDR' not in os.environ:
        node_list = os.environ['SLURM_NODELIST']
        hosts = subprocess.run(['scontrol', 'show', 'hostnames', node_list],
                               check=True, capture_output=True,
                               text=True).stdout.split()
        if not hosts:
            raise RuntimeError(
                f'`scontrol show hostnames {node_list}` returned no host')
        os.environ['MASTER_ADDR'] = hosts[0]
    if port is not None:
        os.environ['MASTER_PORT'] = str(port)
    elif 'MASTER_PORT' not in os.environ:
        os.environ['MASTER_PORT'] = os.environ.get('PORT', DEFAULT_MASTER_PORT)
    os.environ['WORLD_SIZE'] = str(ntasks)
    os.environ['RANK'] = str(proc_id)
    os.environ['LOCAL_RANK'] = str(local_rank)


def _env_from_mpi(port: Optional[int]) -> None:
    if 'MASTER_ADDR' not in os.environ:
        raise KeyError('The environment variable MASTER_ADDR is not set')
    if port is not None:
        os.environ['MASTER_PORT'] = str(port)
    os.environ.setdefault('MASTER_PORT', DEFAULT_MASTER_PORT)
    os.environ['WORLD_SIZE'] = os.environ['OMPI_COMM_WORLD_SIZE']
    os.environ['RANK'] = os.environ['OMPI_COMM_WORLD_RANK']
    os.environ['LOCAL_RANK'] = os.environ['OMPI_COMM_WORLD_LOCAL_RANK']


def _env_from_pytorch(port: Optional[int]) -> None:
    missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
               if k not in os.environ]
    if missing:
        raise KeyError(
            f'--launcher pytorch needs the environment variables {missing}; '
            'start the tool with torchrun / python -m torch.distributed.run '
            '(tools/dist_train.sh, tools/dist_test.sh)')
    os.environ.setdefault('LOCAL_RANK', '0')


def _limit_cpu_threads(launcher: str) -> None:
    """Give each CPU process its share of cores, as mmengine means to.

    mmengine sets ``OMP_NUM_THREADS=1`` for distributed runs only after torch
    has started its thread pool, which then no longer applies; several
    processes per node each using every core run many times slower. torchrun
    sets the variable before the process starts (then this does nothing).
    """
    if 'OMP_NUM_THREADS' in os.environ:
        return
    threads = 1
    if launcher == 'slurm':
        threads = int(os.environ.get('SLURM_CPUS_PER_TASK', '1'))
    os.environ['OMP_NUM_THREADS'] = str(threads)
    torch.set_num_threads(threads)
    _say(f'OMP_NUM_THREADS was not set: using {threads} thread(s) per process')


_ENV_FROM_LAUNCHER = {
    'pytorch': _env_from_pytorch,
    'slurm': _env_from_slurm,
    'mpi': _env_from_mpi,
}


def setup_distributed(cfg, launcher: str) -> None:
    """Prepare distributed training for ``launcher`` before the Runner is built.

    * ``launcher == 'none'`` or CUDA is available: nothing is changed; the
      Runner calls mmengine's ``init_dist`` with ``cfg.env_cfg.dist_cfg``
      (NCCL by default) as usual.
    * Otherwise (CPU processes): mmengine's ``init_dist`` would call
      ``torch.cuda.set_device`` and its default wrapper would pass
      ``device_ids=[LOCAL_RANK]`` to DDP; both fail without CUDA. So the
      process group is initialised here with the gloo backend (or ``mpi`` if
      the config asks for it) from the launcher's environment - torchrun's
      ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``; Slurm's
      ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``/``SLURM_NODELIST``
      (``scontrol show hostnames``) with ``MASTER_PORT`` from the config's
      ``dist_cfg.port``, ``MASTER_PORT``, ``PORT`` or 29500; Open MPI's
      ``OMPI_COMM_WORLD_*`` - so the Runner finds ``is_distributed()`` true
      and skips its own initialisation. If ``OMP_NUM_THREADS`` is unset
      (torchrun sets it), each process gets 1 thread (Slurm:
      ``SLURM_CPUS_PER_TASK``) instead of every core. Unless the config sets
      ``model_wrapper_cfg`` itself, it is set to
      :class:`CPUDistributedDataParallel`. Each step is printed on every rank.

    Args:
        cfg (mmengine.Config): The config; ``model_wrapper_cfg`` may be set.
        launcher (str): ``'none'``, ``'pytorch'``, ``'slurm'`` or ``'mpi'``.
    """
    if launcher == 'none':
        return
    if launcher not in _ENV_FROM_LAUNCHER:
        raise ValueError(f'Invalid launcher type: {launcher}')
    if torch.cuda.is_available():
        print_log(
            f'mmnorm: CUDA is available; mmengine initialises the '
            f'{launcher} launcher as usual', logger='current')
        return

    env_cfg = cfg.get('env_cfg') or {}
    dist_cfg = dict(env_cfg.get('dist_cfg') or {})
    requested = dist_cfg.pop('backend', 'nccl')
    backend = requested if requested in ('gloo', 'mpi') else 'gloo'
    port = dist_cfg.pop('port', None)
    dist_cfg.pop('init_backend', None)
    timeout = dist_cfg.pop('timeout', None)
    if timeout is not None:
        dist_cfg['timeout'] = datetime.timedelta(seconds=timeout)

    if not torch_dist.is_initialized():
        _ENV_FROM_LAUNCHER[launcher](port)
        torch_dist.init_process_group(
            backend=backend,
            init_method='env://',
            rank=int(os.environ['RANK']),
            world_size=int(os.environ['WORLD_SIZE']),
            **dist_cfg)
        _say(f'no CUDA: initialised torch.distributed for the {launcher} '
             f'launcher with the {backend} backend (config asked for '
             f'{requested}), local rank {os.environ["LOCAL_RANK"]}, master '
             f'{os.environ["MASTER_ADDR"]}:{os.environ["MASTER_PORT"]}')
        _limit_cpu_threads(launcher)
    else:
        _say('torch.distributed was already initialised; keeping it')

    if cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(
            type='CPUDistributedDataParallel',
            broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
        _say('model_wrapper_cfg set to CPUDistributedDataParallel '
             '(DDP without device_ids)')
    else:
        wrapper = cfg.model_wrapper_cfg.get('type', 'MMDistributedDataParallel')
        wrapper_cls = (MODEL_WRAPPERS.get(wrapper)
                       if isinstance(wrapper, str) else wrapper)
        note = ''
        if (isinstance(wrapper_cls, type)
                and issubclass(wrapper_cls, DistributedDataParallel)
                and not issubclass(wrapper_cls, CPUDistributedDataParallel)):
            note = (' (the Runner passes device_ids to it, which DDP refuses '
                    'for a CPU model: use CPUDistributedDataParallel)')
        _say(f'keeping the config\'s model_wrapper_cfg type {wrapper}{note}')


def report_rank_finished(what: str, runner=None) -> None:
    """Print on every rank that ``what`` finished (with the runner's iter)."""
    msg = f'{what} finished'
    if runner is not None:
        msg += f' at epoch {runner.epoch}, iter {runner.iter}'
    _say(msg)


def end_distributed():
    """Tear down torch.distributed, if this process joined it, while the
    interpreter is still whole: wait for every rank, free what holds the
    process group (the runner's DDP wrapper sits in reference cycles), then
    destroy it. Left to interpreter shutdown, gloo's threads and rank 0's store
    server can end the process with ``terminate called without an active
    exception`` (SIGABRT) after a finished run (seen with torch 2.1)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return
    torch_dist.barrier()
    gc.collect()
    torch_dist.destroy_process_group()
    gc.collect()
