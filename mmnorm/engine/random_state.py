"""Save and restore the global random states of this process.

Two parts of the engine need the random streams to be left as they were:
PreciseBN (:mod:`mmnorm.engine.precise_bn`) runs extra batches that must not
move training's streams, and the exact ``--resume`` (:mod:`mmnorm.engine.resume`)
stores the states in each checkpoint and brings them back. Both use
:func:`capture_random_state` and :func:`restore_random_state`.

The state is a dict with the keys ``python`` (``random``), ``numpy`` (NumPy's
legacy global generator), ``torch`` (torch's CPU generator) and, if CUDA is in
use, ``cuda`` (every CUDA device's generator). Checkpoints store it under
these keys, so they must not change.
"""
import random

import numpy as np
import torch

__all__ = ['capture_random_state', 'restore_random_state']


def capture_random_state() -> dict:
    """The global random states of this process (see the module docstring)."""
    state = dict(python=random.getstate(), numpy=np.random.get_state(),
                 torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: dict) -> None:
    """Set the global random states to ``state`` (from :func:`capture_random_state`,
    possibly loaded from a checkpoint mapped to a GPU)."""
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])
