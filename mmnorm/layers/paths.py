"""Which implementation runs a layer's training step: ATen ops or fused Triton kernels.

MABN and BRN have two implementations of the training step with the same
results (to float rounding, see docs/kernels.md):

* ``aten``: PyTorch operators, dozens of small ones on (C,) statistics per
  step. The reference; runs everywhere.
* ``triton``: one Triton kernel per direction (forward: statistics, all the
  (C,) bookkeeping and the output; backward: the sums, the bookkeeping and the
  input gradient), each behind one ``mmnorm::`` operator. Needs Triton >= 3.0
  and torch >= 2.4 (``torch.library.custom_op``); Triton compiles the kernels
  on the user's GPU at first use, no nvcc involved.

``MMNORM_KERNELS`` (read when mmnorm is imported, or again by :func:`select`):

* unset or ``auto``: the fused kernels for CUDA tensors where Triton can run
  them, ATen otherwise;
* ``aten``: ATen everywhere;
* ``triton``: the fused kernels for CUDA tensors, and for CPU tensors under
  Triton's interpreter (``TRITON_INTERPRET=1``, how the kernels are tested
  without a GPU); a layer raises if Triton cannot run them.

The choice and its reason are logged once, when the first layer is built
(:func:`announce`). The first fused step of each variant on a device is tried
first on a copy of the layer (:mod:`mmnorm.layers.first_use`): in ``auto`` a
failure or a result that differs from the ATen step's sends that device (or
variant) to the ATen path, with one warning; in ``triton`` it raises.
"""
import contextlib
import importlib.metadata
import logging
import os
import re

import torch

from .._torch import CUSTOM_OPS

KERNELS_ENV = 'MMNORM_KERNELS'
MODES = ('auto', 'aten', 'triton')
MINIMUM_TRITON = (3, 0)

# device type -> True (fused), False (ATen), or a str: why the requested fused path cannot run.
_PATHS = {}
_REASON = ['']
_ANNOUNCED = [False]
_MODE = ['auto']
# str(device) -> why the fused kernels failed there (auto: the device takes ATen from then on)
FAILED_DEVICES = {}
_FORCED = [None]  # 'aten' while a first-use check runs its reference step


def triton_problem():
    """Why Triton cannot run the fused kernels here (every reason, '; '-joined),
    or None."""
    problems = []
    try:
        version = importlib.metadata.version('triton')
    except importlib.metadata.PackageNotFoundError:
        problems.append('Triton is not installed (CPU-only torch builds do not ship it)')
    else:
        found = re.match(r'(\d+)\.(\d+)', version)
        if found is None or tuple(map(int, found.groups())) < MINIMUM_TRITON:
            need = '.'.join(map(str, MINIMUM_TRITON))
            problems.append(f'Triton {version} is older than {need}')
    if not CUSTOM_OPS:
        problems.append(f'torch {torch.__version__} has no torch.library.custom_op '
                        '(torch >= 2.4)')
    return '; '.join(problems) or None


def select(mode=None):
    """Choose the implementation per device type from ``mode`` (default: the
    ``MMNORM_KERNELS`` environment variable, ``auto`` if unset); returns the
    sentence that says which and why. Layers built afterwards log it again."""
    mode = (os.environ.get(KERNELS_ENV) or 'auto') if mode is None else mode
    if mode not in MODES:
        raise ValueError(f'{KERNELS_ENV}={mode!r}: expected one of {", ".join(MODES)}')
    problem = triton_problem()
    interpret = os.environ.get('TRITON_INTERPRET') == '1'
    _PATHS.clear()
    FAILED_DEVICES.clear()
    _MODE[0] = mode
    if mode == 'aten':
        reason = f'{KERNELS_ENV}=aten: every layer takes the ATen path'
    elif problem is not None:
        reason = f'every layer takes the ATen path: {problem}'
        if mode == 'triton':
            _PATHS['cuda'] = _PATHS['cpu'] = f'{KERNELS_ENV}=triton, but {problem}'
    else:
        _PATHS['cuda'] = True
        reason = 'CUDA tensors take the fused Triton kernels'
        if mode == 'triton' and interpret:
            _PATHS['cpu'] = True
            reason += ', CPU tensors too (TRITON_INTERPRET=1: Triton\'s interpreter)'
        elif mode == 'triton':
            _PATHS['cpu'] = (f'{KERNELS_ENV}=triton runs CPU tensors only under Triton\'s '
                             'interpreter: set TRITON_INTERPRET=1 before mmnorm is imported')
        else:
            reason += ', other devices the ATen path'
    _REASON[0] = f'mmnorm layers: {reason}'
    _ANNOUNCED[0] = False
    return _REASON[0]


def announce():
    """Log the choice once (called when a layer is built): to mmengine's
    current logger where one exists (a Runner's, built before its model),
    else to Python's ``logging.getLogger('mmnorm')``, which a script that
    configures no logging keeps quiet."""
    if _ANNOUNCED[0]:
        return
    _ANNOUNCED[0] = True
    from mmengine.logging import MMLogger, print_log
    if MMLogger._instance_dict:
        print_log(_REASON[0], logger='current')
    else:
        logging.getLogger('mmnorm').info(_REASON[0])


def mode():
    """The mode chosen by :func:`select`: 'auto', 'aten' or 'triton'."""
    return _MODE[0]


def fused(x):
    """True when the training step on ``x`` runs the fused kernels; raises
    where ``MMNORM_KERNELS=triton`` asked for them and they cannot run."""
    path = _PATHS.get(x.device.type, False)
    if isinstance(path, str):
        raise RuntimeError(path)
    if _FORCED[0] == 'aten' or str(x.device) in FAILED_DEVICES:
        return False
    return path


@contextlib.contextmanager
def aten_only():
    """Every training step in this context takes the ATen path."""
    before, _FORCED[0] = _FORCED[0], 'aten'
    try:
        yield
    finally:
        _FORCED[0] = before


select()
