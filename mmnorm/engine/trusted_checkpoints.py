"""Let mmengine 0.10.7 load its own checkpoints with PyTorch >= 2.6.

Why: since PyTorch 2.6, ``torch.load`` defaults to ``weights_only=True``,
which refuses any pickled object that is not a tensor or a plain container.
mmengine 0.10.7 saves full checkpoints (``meta`` with the message hub's
``HistoryBuffer`` objects, numpy scalars, the optimizer and scheduler states,
...) and loads them with ``torch.load(filename, map_location=...)`` without
passing ``weights_only`` (``mmengine/runner/checkpoint.py``), so ``--resume``
and ``tools/test.py CONFIG CHECKPOINT`` fail with an ``UnpicklingError``.

How: :func:`trust_checkpoints` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``, which
torch 2.13's ``torch.load`` reads on every call (``torch/serialization.py``).
"""
import os
import warnings

from mmengine.logging import print_log

__all__ = ['trust_checkpoints']

_NO_WEIGHTS_ONLY_ENV = 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'


def trust_checkpoints() -> None:
    """Let ``torch.load`` unpickle the checkpoints given to the tools.

    When ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is true and the caller did not
    pass ``weights_only``, ``torch.load`` loads with ``weights_only=False``.
    That is exactly the set of calls mmengine makes, and any call site that
    asks for ``weights_only=True`` explicitly keeps it. The variable is set
    with ``os.environ.setdefault`` so a user's own choice wins (and it is
    inherited by data-loader workers and child processes).

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
