"""Which torch this is, and a clear error where a feature needs a newer one.

mmnorm supports torch 2.0 and newer (tested on 2.1.2 and 2.13.0); the few
features that need more call :func:`require_torch`, which names the feature,
the version it needs and the one installed.
"""
import re

import torch

__all__ = ['TorchTooOldError', 'require_torch', 'torch_version']

MINIMUM_TORCH = (2, 0)


class TorchTooOldError(RuntimeError):
    """A feature needs a newer torch than the installed one."""


def torch_version():
    """The installed torch's (major, minor), e.g. (2, 1) for '2.1.2+cu121'."""
    major, minor = re.match(r'(\d+)\.(\d+)', torch.__version__).groups()
    return int(major), int(minor)


def require_torch(minimum, feature):
    """Raise :class:`TorchTooOldError` unless torch >= ``minimum`` (a
    (major, minor) tuple); ``feature`` says what needs it."""
    if torch_version() < tuple(minimum):
        needed = '.'.join(map(str, minimum))
        raise TorchTooOldError(f'{feature} needs torch >= {needed}; this environment has torch '
                               f'{torch.__version__}')
