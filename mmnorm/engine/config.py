"""Load a config as the tools do: :func:`load_config`.

Before the file is read, the checkpoints the run loads are trusted
(:mod:`mmnorm.engine.trusted_checkpoints`) and ``pkg_resources``, which
mmengine needs for ``_base_ = 'mmdet::...'``, is checked
(:func:`require_pkg_resources`); after it, its mmnorm layers are checked
(:mod:`mmnorm.engine.config_check`).
"""
import os.path as osp
import warnings

from mmengine.config import Config

from .config_check import check_config_path, check_layer_cfgs
from .trusted_checkpoints import trust_checkpoints

__all__ = ['load_config', 'require_pkg_resources']


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


def load_config(path, cfg_options=None, work_dir=None, launcher='none'):
    """The config at ``path`` with ``--cfg-options`` merged and ``work_dir`` set
    (default ``./work_dirs/<config name>``), after the checkpoint and
    ``pkg_resources`` fixes that loading it and its checkpoints need; its
    mmnorm layers checked (:mod:`mmnorm.engine.config_check`)."""
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
