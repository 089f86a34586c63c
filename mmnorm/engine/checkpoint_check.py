"""Checkpoint files on disk: refuse a damaged one before mmengine loads it, and
write new ones so that a killed run cannot leave a damaged one behind.

Checking (:func:`verify_checkpoint`):

* PyTorch's default format (``torch.save`` since 1.6, what mmengine 0.10.7
  writes) is a zip archive: each member (``archive/data.pkl``, one per tensor
  storage) with its CRC-32, and at the *end* of the file the central directory
  that lists them. A file cut short has lost the central directory, which
  ``zipfile`` reports at once; a damaged byte elsewhere fails its member's
  CRC-32, which :func:`verify_checkpoint` recomputes for every member (one read
  of the file, about 0.1 s per 100 MB). The archive must hold a ``data.pkl``.
* Any other file (torch's legacy format of PyTorch < 1.6, which older model-zoo
  checkpoints use) has neither an index nor checksums; it is checked by loading
  it with ``torch.load`` on the CPU, so such a file is read twice.
* Paths with a scheme (``http://``, ``torchvision://``, ``s3://``, ...) are
  not local files and are left to mmengine (logged).

Resuming without a path (:func:`latest_checkpoint`): mmengine's
``find_latest_checkpoint`` returns whatever ``WORK_DIR/last_checkpoint`` names.
If that file is missing or damaged, the run stops with an error that lists the
intact checkpoints next to it (newest first) and the ``--resume PATH`` command
for the newest of them. It does not fall back by itself: a fallback repeats
iterations and, with ``max_keep_ckpts``, would let the hook delete further
checkpoints, and a damaged newest file means the storage or a copy went wrong,
which the user should see before anything is overwritten. (mmengine writes
``last_checkpoint`` only after the checkpoint itself, so a run killed while
saving does not point it at a partial file.)

Writing (:class:`AtomicLocalBackend`, :func:`make_checkpoint_saves_atomic`):
mmengine's ``save_checkpoint`` serialises the checkpoint into memory and hands
the bytes to the file backend's ``put``; ``LocalBackend.put`` opens the final
path and writes into it, so a run killed (or a disk filling up) during the
write leaves a truncated ``iter_N.pth``. The backend here writes
``iter_N.pth.partial``, flushes and fsyncs it, renames it onto ``iter_N.pth``
(``os.replace``: atomic within a POSIX file system) and fsyncs the directory:
a checkpoint path holds either nothing, the previous file, or the complete new
one.
"""
import os
import os.path as osp
import re
import zipfile
from typing import List, Optional

import mmengine
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log

__all__ = ['AtomicLocalBackend', 'CheckpointFileError', 'latest_checkpoint',
           'make_checkpoint_saves_atomic', 'verify_checkpoint']

#: The name under which :class:`AtomicLocalBackend` is registered with
#: mmengine's file backends (``backend_args=dict(backend=...)``).
ATOMIC_BACKEND = 'local_atomic'
PARTIAL_SUFFIX = '.partial'
_ZIP_MAGIC = b'PK\x03\x04'
_CHECKPOINT_NAME = re.compile(r'(?:iter|epoch)_(\d+)\.pth')


class CheckpointFileError(RuntimeError):
    """A checkpoint file given to a tool is missing, truncated or corrupt."""


def _is_remote(path: str) -> bool:
    return '://' in str(path)


def _zip_problem(path: str) -> Optional[str]:
    """Why the zip checkpoint at ``path`` is unusable, or None if it is intact."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(name.endswith('/data.pkl') or name == 'data.pkl' for name in names):
                return 'it is a zip file but holds no data.pkl, so it is not a PyTorch checkpoint'
            bad_member = archive.testzip()
    except zipfile.BadZipFile as error:
        return (f'truncated or corrupt: the zip directory at its end is missing or damaged '
                f'({error}); the file has {osp.getsize(path)} bytes')
    except (OSError, EOFError, zipfile.LargeZipFile) as error:
        return f'truncated or corrupt: reading it failed ({error})'
    if bad_member is not None:
        return f'corrupt: the member {bad_member} fails its CRC-32 check'
    return None


def _legacy_problem(path: str) -> Optional[str]:
    """Why the non-zip checkpoint at ``path`` cannot be loaded, or None."""
    import torch
    try:
        torch.load(path, map_location='cpu', weights_only=False)
    except Exception as error:  # any failure to unpickle means unusable
        return (f'truncated or corrupt: it is not a zip archive (PyTorch >= 1.6 format) and '
                f'loading it as a legacy checkpoint failed ({type(error).__name__}: {error})')
    return None


def checkpoint_problem(path: str, unpickle_legacy: bool = True) -> Optional[str]:
    """Why the local checkpoint ``path`` is unusable (missing, empty, truncated,
    corrupt), or None if it is intact. See the module docstring. A file in the
    legacy (non-zip) format is loaded in full to tell, only if
    ``unpickle_legacy`` (for trusted files); otherwise it passes."""
    if not osp.exists(path):
        return 'it does not exist'
    if not osp.isfile(path):
        return 'it is a directory or another non-file, not a checkpoint file'
    with open(path, 'rb') as f:
        head = f.read(len(_ZIP_MAGIC))
    if not head:
        return 'truncated: the file is empty (0 bytes)'
    if head == _ZIP_MAGIC:
        return _zip_problem(path)
    return _legacy_problem(path) if unpickle_legacy else None


def verify_checkpoint(path: str, what: str = 'checkpoint', unpickle_legacy: bool = True) -> None:
    """Raise :class:`CheckpointFileError` naming ``path`` (and ``what`` it was
    given as, e.g. ``'--resume'``) unless it is an intact checkpoint
    (:func:`checkpoint_problem`). Remote paths are not checked (logged)."""
    path = str(path)
    if _is_remote(path):
        print_log(f'mmnorm: {what} {path} is not a local file; not checked before loading',
                  logger='current')
        return
    problem = checkpoint_problem(path, unpickle_legacy)
    if problem is not None:
        raise CheckpointFileError(f'{what} {path} cannot be used: {problem}')


def intact_checkpoints(directory: str, exclude: str) -> List[str]:
    """The intact ``iter_N.pth`` / ``epoch_N.pth`` files of ``directory``
    other than ``exclude``, highest N first."""
    if not osp.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _CHECKPOINT_NAME.fullmatch(name)
        path = osp.join(directory, name)
        if match and osp.abspath(path) != osp.abspath(exclude):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True) if checkpoint_problem(path) is None]


def latest_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint ``--resume`` without a path resumes from: the one
    ``work_dir/last_checkpoint`` names, verified. None if there is no
    ``last_checkpoint`` (mmengine then starts from scratch, and says so).

    Raises:
        CheckpointFileError: ``last_checkpoint`` is empty or names a missing or
            damaged file. The message lists the intact checkpoints in that
            file's folder, newest first, and how to resume from one; there is
            no automatic fallback (see the module docstring).
    """
    pointer = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(pointer):
        return None
    with open(pointer) as f:
        path = f.read().strip()
    if not path:
        problem, folder = 'it is empty (a run was killed while writing it?)', work_dir
        subject = f'--resume (auto): {pointer}'
    elif _is_remote(path):
        verify_checkpoint(path, '--resume (auto)')
        return path
    else:
        problem, folder = checkpoint_problem(path), osp.dirname(path)
        subject = f'--resume (auto): {pointer} names {path}, which'
    if problem is None:
        return path
    others = intact_checkpoints(folder, exclude=path or pointer)
    if others:
        advice = (f'Intact checkpoints in {folder}, newest first: '
                  f'{", ".join(osp.basename(p) for p in others)}. Not falling back by itself '
                  f'(the iterations since then would be repeated); to resume from the newest '
                  f'one: --resume {others[0]}')
    else:
        advice = (f'There is no intact iter_N.pth / epoch_N.pth in {folder} to resume from; '
                  'start again without --resume, or pass --resume PATH')
    raise CheckpointFileError(f'{subject} cannot be used: {problem}. {advice}')


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@register_backend(ATOMIC_BACKEND)
class AtomicLocalBackend(LocalBackend):
    """``LocalBackend`` whose ``put`` writes ``PATH.partial``, fsyncs it and
    renames it onto ``PATH``, then fsyncs the folder. A leftover
    ``PATH.partial`` is what a killed write leaves; the next save to ``PATH``
    overwrites it.

    ``remove`` of a file is deferred until the next ``put`` into the same
    folder has completed: mmengine's ``CheckpointHook`` with
    ``max_keep_ckpts`` removes the oldest checkpoint *before* it writes the
    new one, so a run killed while saving would otherwise keep no usable
    checkpoint (with ``max_keep_ckpts=1``, none at all). The hook and
    ``Runner.save_checkpoint`` build separate backend instances, so the
    pending removals are kept per process, per folder, on the class.
    """

    #: folder -> files whose removal waits for the next completed put there
    _pending_removals = {}

    def put(self, obj: bytes, filepath) -> None:
        filepath = str(filepath)
        directory = osp.dirname(osp.abspath(filepath))
        mmengine.mkdir_or_exist(directory)
        partial = filepath + PARTIAL_SUFFIX
        with open(partial, 'wb') as f:
            f.write(obj)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, filepath)
        _fsync_directory(directory)
        for old in self._pending_removals.pop(directory, []):
            if osp.abspath(old) != osp.abspath(filepath) and osp.isfile(old):
                os.remove(old)

    def remove(self, filepath) -> None:
        """Remove ``filepath`` once the next put into its folder completes."""
        filepath = str(filepath)
        directory = osp.dirname(osp.abspath(filepath))
        self._pending_removals.setdefault(directory, []).append(filepath)


def make_checkpoint_saves_atomic(runner) -> None:
    """Let every ``CheckpointHook`` of ``runner`` that writes to local disk
    with mmengine's default backend save through :class:`AtomicLocalBackend`.

    Set on the built hooks (their ``backend_args``, which the hook passes to
    ``Runner.save_checkpoint`` and uses for its own file operations from
    ``before_train`` on), not in the config, so the config that mmengine dumps
    into the work dir stays loadable without mmnorm. Hooks with their own
    ``backend_args`` / ``file_client_args`` or a remote ``out_dir`` are left as
    they are (logged).
    """
    for hook in runner.hooks:
        if not isinstance(hook, CheckpointHook):
            continue
        out_dir = hook.out_dir or runner.work_dir
        if hook.backend_args is None and hook.file_client_args is None and not _is_remote(out_dir):
            hook.backend_args = dict(backend=ATOMIC_BACKEND)
            print_log('mmnorm: checkpoints are written atomically (PATH.partial, fsync, rename)',
                      logger='current')
        else:
            print_log(f'mmnorm: {type(hook).__name__} has its own file backend or a remote '
                      f'out_dir ({out_dir}); its checkpoints are written as mmengine does',
                      logger='current')
