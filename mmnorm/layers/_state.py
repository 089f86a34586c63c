"""What the project's normalization layers share.

Every norm layer of mmnorm (MABN, CBN, BRN) subclasses :class:`SmallBatchNorm`,
itself a ``torch.nn.modules.batchnorm._BatchNorm``. That inheritance is what
makes MMDetection and MMEngine treat them as batch norms without any change on
their side: ResNet's ``norm_eval`` and ``init_weights``, the optimizer
constructor's ``norm_decay_mult`` and mmcv's layer naming (``bn1``,
``downsample.1``, ``ConvModule.bn``) all test ``isinstance(m, _BatchNorm)`` or
read ``_abbr_``.

Shared here, written once:

* configuration checks that name the layer and the offending key;
* the input contract: channels on dim 1, any rank from 2 (N, C) to 5
  (N, C, D, H, W); statistics reduce over every dim but 1;
* the statistics dtype: float32 for half inputs (AMP), float64 stays float64;
  the statistics buffers (``STATISTIC_BUFFERS``) stay at least float32 when
  the module is cast to float16 or bfloat16;
* empty input (e.g. zero RoIs): an empty output, zero gradients, no state change
  (with ``sync_stats`` in a multi-process run the layer still takes part in the
  step's collectives, see below);
* the non-finite guard: a channel whose statistic is inf/NaN keeps its old
  buffer value, and the layer warns once;
* ``sync_stats`` (config key, default False): whether a training step uses
  statistics of this process's input only, as in the papers (each process of a
  DDP run then keeps its own buffers, and a checkpoint, written by rank 0,
  holds rank 0's), or of the union of all processes' inputs. With True, when
  torch.distributed is initialised with more than one process, each layer
  averages its per-step statistics over the default process group (weighted
  by the per-process element counts; :mod:`mmnorm.layers._dist`), so every
  process holds the same buffers and a moving window covers world_size times
  more samples. Otherwise (one process, or torch.distributed not initialised)
  the key changes nothing. Every process must then call each such layer the
  same number of times per step and backpropagate through every call, as
  SyncBatchNorm requires; an empty input on one process takes part with an
  element count of 0, and if the union is empty the step stores nothing (the
  step counter still advances on every process, which keeps them equal);
* averaging by mmengine's SyncBuffersHook (every buffer's mean over the
  processes, integers through a float32 division that is then truncated):
  with ``sync_stats`` the buffers are the same everywhere and stay as they
  are; without it, equal step counters stay equal (exactly while world_size * t
  < 2**24, the float32 integer range), ring rows written at the same steps
  average into the statistics of the union of those steps' inputs (equal
  batch sizes), and counters that differ (a process skipped empty inputs)
  become their truncated mean on every process (see CBN for its ring);
* loading a state dict that was written by another layout (BatchNorm, the
  original authors' code): each layer converts what it knows, and every
  conversion is logged, so no key is dropped silently.
"""
import warnings
from numbers import Integral, Real

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ._dist import sync_world


def check_number(layer, key, value, *, integer=False, minimum=None, exclusive=True):
    """Raise a ``TypeError``/``ValueError`` naming ``layer`` and ``key`` unless
    ``value`` is a number (an int when ``integer``) above ``minimum``
    (strictly when ``exclusive``). Returns the value."""
    kind = Integral if integer else Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f'{layer}: {key} must be {"an int" if integer else "a number"}, '
                        f'got {value!r} ({type(value).__name__})')
    if minimum is not None:
        if not (value > minimum if exclusive else value >= minimum):  # NaN fails too
            relation = '>' if exclusive else '>='
            raise ValueError(f'{layer}: {key} must be {relation} {minimum}, got {value!r}')
    return value


class SmallBatchNorm(_BatchNorm):
    """Base class: BatchNorm's parameters, buffers and names, plus the shared
    input, dtype and state handling described in the module docstring.

    Subclasses implement ``_train_forward(x, sync)``, ``sync`` telling whether
    this step's statistics are those of all processes (``sync_stats`` and a
    multi-process run); inference and empty input without ``sync`` are
    handled here. ``num_batches_tracked`` is the layer's step counter t: it is
    incremented by one before each training forward (the first has t = 1).
    """

    _abbr_ = 'bn'  # mmcv's build_norm_layer names the module 'bn', 'bn1', ... as for BatchNorm
    NONFINITE_CHECK_EVERY = 100
    # The buffers that hold statistics: kept at least float32 by _apply.
    STATISTIC_BUFFERS = ('running_mean', 'running_var')

    def __init__(self, num_features, eps, momentum, sync_stats=False):
        name = type(self).__name__
        check_number(name, 'num_features', num_features, integer=True, minimum=0)
        if not isinstance(sync_stats, bool):
            raise TypeError(f'{name}: sync_stats must be a bool, got {sync_stats!r} '
                            f'({type(sync_stats).__name__})')
        check_number(name, 'eps', eps, minimum=0)
        check_number(name, 'momentum', momentum, minimum=0, exclusive=False)
        if momentum > 1:
            raise ValueError(f'{name}: momentum must be <= 1, got {momentum!r}')
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True,
                         track_running_stats=True)
        self.sync_stats = sync_stats
        self._warned_nonfinite = False
        self._nonfinite_seen = None  # device flag, see warn_if_nonfinite
        self._calls_since_check = 0

    def _apply(self, fn, recurse=True):
        # Statistics buffers stay at least float32 (spec): ``.half()`` or
        # ``.to(torch.bfloat16)`` would round them and turn a second moment
        # or a variance above 65504 into inf. They follow the module's device
        # and float64.
        before = {name: self._buffers.get(name) for name in self.STATISTIC_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers.get(name)
            if new is not None and new.dtype in (torch.float16, torch.bfloat16):
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self

    # ----------------------------------------------------------------- input
    def _check_input_dim(self, x):
        if x.dim() < 2 or x.dim() > 5:
            raise ValueError(f'{type(self).__name__}: expected a 2-D to 5-D input with channels '
                             f'on dim 1, got shape {tuple(x.shape)}')
        if x.size(1) != self.num_features:
            raise ValueError(f'{type(self).__name__}: expected {self.num_features} channels '
                             f'(num_features) on dim 1, got shape {tuple(x.shape)}')

    @staticmethod
    def reduce_dims(x):
        """The dims a per-channel statistic reduces over: all but dim 1."""
        return [0] + list(range(2, x.dim()))

    @staticmethod
    def channel_shape(x):
        """(1, C, 1, ...): the shape that broadcasts a (C,) vector over ``x``."""
        return (1, -1) + (1,) * (x.dim() - 2)

    @staticmethod
    def stats_dtype(x):
        """float64 for float64 input, float32 for everything else."""
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    # --------------------------------------------------------------- forward
    def forward(self, x):
        self._check_input_dim(x)
        sync = self.training and self.sync_stats and sync_world()
        if x.numel() == 0 and not sync:
            # No statistic exists; keep the graph so parameters get zero gradients.
            shape = self.channel_shape(x)
            return x * self.weight.view(shape) + self.bias.view(shape)
        if self.training:
            return self._train_forward(x, sync)
        return self._eval_forward(x)

    def _eval_forward(self, x):
        return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                                False, 0.0, self.eps, torch.backends.cudnn.enabled)

    def _train_forward(self, x, sync):
        raise NotImplementedError

    # ------------------------------------------------------ non-finite guard
    def update_where_finite(self, buffer, new_value, finite):
        """``buffer[c] <- new_value[c]`` for channels where ``finite[c]``, on the
        device, without a host synchronisation. ``finite`` has shape (C,) and
        broadcasts over leading dims of ``buffer``."""
        buffer.copy_(torch.where(finite, new_value.to(buffer.dtype), buffer))

    def warn_if_nonfinite(self, finite):
        """Warn once if a statistic was not finite (``finite``: (C,) bool).

        Reading the flag forces a device-to-host copy, which is free on the CPU
        and checked at once there. On accelerators the flag is or-ed into a
        device tensor and read only every ``NONFINITE_CHECK_EVERY`` training
        calls, so the hot path never waits for the device; the guard in
        :meth:`update_where_finite` protects the buffers either way.
        """
        if self._warned_nonfinite:
            return
        seen = ~finite.all()
        if finite.device.type != 'cpu':
            if self._nonfinite_seen is None or self._nonfinite_seen.device != seen.device:
                self._nonfinite_seen = torch.zeros_like(seen)
            self._nonfinite_seen |= seen
            self._calls_since_check += 1
            if self._calls_since_check < self.NONFINITE_CHECK_EVERY:
                return
            self._calls_since_check = 0
            seen = self._nonfinite_seen
        if bool(seen):
            self._warned_nonfinite = True
            warnings.warn(f'{type(self).__name__}({self.num_features}): a batch statistic was '
                          'inf or NaN; the affected channels kept their previous buffers',
                          RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------ state-dict loads
    def convert_state(self, state_dict, prefix):
        """Rewrite foreign keys of ``state_dict`` (under ``prefix``) into this
        layer's layout in place; return a list of human-readable notes, one per
        conversion. The default knows nothing to convert."""
        return []

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for note in self.convert_state(state_dict, prefix):
            from mmengine.logging import print_log
            print_log(f'{type(self).__name__} {prefix.rstrip(".") or "<root>"}: {note}',
                      logger='current')
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
