"""Runtime glue shared by ``tools/train.py`` and ``tools/test.py``.

The tools stay thin: everything that adapts mmengine 0.10.7 / MMDetection 3.3
to the environments this project runs in lives here.

* :func:`trust_checkpoints` - let mmengine load its own (trusted) checkpoints
  with PyTorch >= 2.6, whose ``torch.load`` defaults to ``weights_only=True``.
* :func:`require_pkg_resources` - fail early, with an actionable message, when
  the ``pkg_resources`` module that mmengine needs for ``mmdet::`` configs is
  missing.
* :func:`setup_distributed` - make ``--launcher pytorch|slurm|mpi`` work on
  machines without CUDA (gloo backend, DDP without ``device_ids``), leaving
  the usual NCCL path untouched when CUDA is available.
* ``--amp`` on machines without an accelerator (:mod:`mmnorm.engine.amp`) and an
  exact ``--resume`` (:mod:`mmnorm.engine.resume`), both switched on by
  :func:`build_runner`.
* :func:`load_config` and :func:`build_runner` - the steps both tools take,
  in order: the checkpoint and ``pkg_resources`` fixes, the config with its
  overrides and work dir, a check that the data and the checkpoint to load
  are usable (:mod:`mmnorm.engine.checkpoint_check`), distributed set-up, mixed
  precision on the CPU, the runner, atomic checkpoint writes and the
  random-state hook.

This module deliberately does not import mmnorm's layers.
"""
import datetime
import gc
import os
import os.path as osp
import subprocess
import sys
import warnings
from typing import Optional

import torch
import torch.distributed as torch_dist
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.model.wrappers import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS, RUNNERS
from mmengine.runner import Runner
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint_check
from .amp import use_cpu_amp
from .collect_dir import CollectInWorkDirHook
from .configcheck import ConfigError, check_config_path, check_layer_cfgs
from ..compat import TorchTooOldError
from .data_check import DataNotFoundError, check_data_present
from .resume import ResumeRandomStateHook
from .workers import end_workers_with_runner

__all__ = [
    'CPUDistributedDataParallel', 'USER_ERRORS', 'UsageError',
    'add_common_args', 'add_debug_arg', 'build_runner', 'parse_common', 'load_config',
    'require_pkg_resources', 'run_tool', 'end_distributed',
    'setup_distributed', 'trust_checkpoints', 'report_rank_finished'
]


class UsageError(RuntimeError):
    """Arguments a tool cannot run with together (known only once files are read)."""


#: The errors the tools report as ``error: MESSAGE`` (exit status 1) without a
#: traceback (unless ``--debug`` or ``MMNORM_DEBUG=1``): bad input the user can
#: fix, with a message that says how.
USER_ERRORS = (DataNotFoundError, checkpoint_check.CheckpointFileError, TorchTooOldError,
               UsageError, ConfigError)
DEBUG_ENV = 'MMNORM_DEBUG'

#: Port used for the rendezvous when neither the config nor the environment
#: names one (the same default as torch.distributed and mmengine).
DEFAULT_MASTER_PORT = '29500'

_NO_WEIGHTS_ONLY_ENV = 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'


def trust_checkpoints() -> None:
    """Let ``torch.load`` unpickle the checkpoints given to the tools.

    Why: since PyTorch 2.6, ``torch.load`` defaults to ``weights_only=True``,
    which refuses any pickled object that is not a tensor or a plain
    container. mmengine 0.10.7 saves full checkpoints (``meta`` with the
    message hub's ``HistoryBuffer`` objects, numpy scalars, the optimizer and
    scheduler states, ...) and loads them with
    ``torch.load(filename, map_location=...)`` without passing
    ``weights_only`` (``mmengine/runner/checkpoint.py``), so ``--resume`` and
    ``tools/test.py CONFIG CHECKPOINT`` fail with an ``UnpicklingError``.

    How: torch 2.13's ``torch.load`` reads the environment variable
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` on every call and, when it is true
    and the caller did not pass ``weights_only`` explicitly, loads with
    ``weights_only=False`` (``torch/serialization.py``). That is exactly the
    set of calls mmengine makes, and any call site that asks for
    ``weights_only=True`` explicitly keeps it. The variable is set with
    ``os.environ.setdefault`` so a user's own choice wins (and it is inherited
    by data-loader workers and child processes).

    Only call this in processes that load files the user handed to them
    (the project's tools): unpickling an untrusted checkpoint can run
    arbitrary code.
    """
    os.environ.setdefault(_NO_WEIGHTS_ONLY_ENV, '1')
    # torch warns on every load that the variable forced weights_only=False;
    # once is enough, and we say it ourselves below.
    warnings.filterwarnings(
        'ignore',
        message=f'Environment variable {_NO_WEIGHTS_ONLY_ENV} detected',
        category=UserWarning)
    if (os.environ[_NO_WEIGHTS_ONLY_ENV].lower() in ('1', 'y', 'yes', 'true')
            and _launcher_rank() == 0):
        print_log(
            'mmnorm: checkpoints given to this tool are trusted and loaded '
            f'with weights_only=False ({_NO_WEIGHTS_ONLY_ENV}=1)',
            logger='current')


def _launcher_rank() -> int:
    """This process's global rank as the launcher tells it (0 if none)."""
    for key in ('RANK', 'SLURM_PROCID', 'OMPI_COMM_WORLD_RANK'):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def require_pkg_resources() -> None:
    """Raise a clear error if ``pkg_resources`` cannot be imported.

    mmengine resolves ``_base_ = 'mmdet::...'`` (``Config._get_cfg_path``;
    also lazy-import ``read_base`` configs) through
    ``mmengine.utils.package_utils.is_installed`` / ``get_installed_path``,
    which import ``pkg_resources`` at run time. ``pkg_resources`` ships with
    setuptools < 81 (this project pins setuptools < 70); without it the
    config fails to load with a bare ``ModuleNotFoundError`` deep inside
    mmengine.
    """
    try:
        with warnings.catch_warnings():
            # setuptools >= 67.5 warns that pkg_resources is deprecated.
            warnings.simplefilter('ignore')
            import pkg_resources  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            'mmengine needs the `pkg_resources` module to resolve `mmdet::` '
            'base configs, and it cannot be imported here. Install a '
            'setuptools that still provides it, e.g.\n'
            '    python -m pip install "setuptools<70"\n'
            '(see requirements/build.txt).') from exc


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


def add_debug_arg(parser):
    parser.add_argument('--debug', action='store_true',
                        help=f'show the traceback of errors in the input (config, data, '
                        f'checkpoint) too (or set {DEBUG_ENV}=1)')


def add_common_args(parser):
    """The options train.py and test.py share with MMDetection's tools:
    --cfg-options, --launcher, --local_rank (also exported as LOCAL_RANK),
    and --debug (:func:`run_tool`)."""
    from mmengine.config import DictAction
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value pairs')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    add_debug_arg(parser)


def run_tool(main):
    """Call ``main()``; on one of ``USER_ERRORS`` print ``error: MESSAGE`` as
    the last line and exit with status 1, with the traceback only when the
    command line has ``--debug`` or the environment ``MMNORM_DEBUG=1``."""
    try:
        main()
    except USER_ERRORS as error:
        if '--debug' in sys.argv[1:] or os.environ.get(DEBUG_ENV) == '1':
            raise
        sys.exit(f'error: {error}')
    end_distributed()


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


def parse_common(parser):
    """``parser.parse_args()``, exporting LOCAL_RANK as torch.distributed.launch expects."""
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def load_config(path, cfg_options=None, work_dir=None, launcher='none'):
    """The config at ``path`` with ``--cfg-options`` merged and ``work_dir`` set
    (default ``./work_dirs/<config name>``), after the checkpoint and
    ``pkg_resources`` fixes that loading it and its checkpoints need; its
    mmnorm layers checked (:mod:`mmnorm.engine.configcheck`)."""
    trust_checkpoints()
    require_pkg_resources()
    check_config_path(path)
    cfg = Config.fromfile(path)
    cfg.launcher = launcher
    if cfg_options is not None:
        cfg.merge_from_dict(cfg_options)
    check_layer_cfgs(cfg)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(path))[0])
    return cfg


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
    ``USER_ERRORS``), set up distributed training for ``cfg.launcher`` and AMP
    on the CPU, and build the runner the config asks for. Its data-loader
    workers end with the process (:mod:`mmnorm.engine.workers`) and its
    evaluations collect the processes' results in the work dir
    (:mod:`mmnorm.engine.collect_dir`). For training, its checkpoints are then
    written atomically and carry the random state (:class:`ResumeRandomStateHook`)."""
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
