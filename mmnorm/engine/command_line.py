"""The command line that tools/train.py, tools/test.py and tools/deploy.py share.

* :func:`add_common_args` and :func:`parse_common` - the options the tools
  share with MMDetection's (``--cfg-options``, ``--launcher``,
  ``--local_rank``) and ``--debug`` (:func:`add_debug_arg`).
* :func:`run_tool` - runs a tool's ``main``: a mistake in the input
  (:data:`USER_ERRORS`) ends in one line, ``error: MESSAGE``, with exit status
  1; a tool that joined torch.distributed leaves it before exiting.
* :class:`UsageError` - arguments a tool cannot run with together.
"""
import os
import sys

from ..compat import TorchTooOldError
from .checkpoint_check import CheckpointFileError
from .config_check import ConfigError
from .data_check import DataNotFoundError
from .distributed import end_distributed

__all__ = ['USER_ERRORS', 'UsageError', 'add_common_args', 'add_debug_arg', 'parse_common',
           'run_tool']


class UsageError(RuntimeError):
    """Arguments a tool cannot run with together (known only once files are read)."""


#: The errors the tools report as ``error: MESSAGE`` (exit status 1) without a
#: traceback (unless ``--debug`` or ``MMNORM_DEBUG=1``): bad input the user can
#: fix, with a message that says how.
USER_ERRORS = (DataNotFoundError, CheckpointFileError, TorchTooOldError, UsageError,
               ConfigError)
DEBUG_ENV = 'MMNORM_DEBUG'


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


def parse_common(parser):
    """``parser.parse_args()``, exporting LOCAL_RANK as torch.distributed.launch expects."""
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def run_tool(main, errors=()):
    """Call ``main()``; on one of ``USER_ERRORS`` (or the tool's own
    ``errors``, library errors such as ``DeployError``) print ``error:
    MESSAGE`` as the last line and exit with status 1, with the traceback only
    when the command line has ``--debug`` or the environment ``MMNORM_DEBUG=1``;
    then leave torch.distributed
    (:func:`mmnorm.engine.distributed.end_distributed`)."""
    try:
        main()
    except USER_ERRORS + tuple(errors) as error:
        if '--debug' in sys.argv[1:] or os.environ.get(DEBUG_ENV) == '1':
            raise
        sys.exit(f'error: {error}')
    end_distributed()
