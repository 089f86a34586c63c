"""What the project's normalization layers share.

Every norm layer of mmnorm (MABN, CBN, BRN) subclasses :class:`SmallBatchNorm`,
itself a ``torch.nn.modules.batchnorm._BatchNorm``, so MMDetection and
MMEngine treat them as batch norms (``norm_eval``, ``norm_decay_mult``, mmcv's
``bn`` naming) without any change on their side.

Shared here, written once:

* configuration checks that name the layer and the offending key;
* input: channels on dim 1, rank 2 (N, C) to 5 (N, C, D, H, W); statistics
  reduce over every dim but 1;
* dtypes: float32 statistics for half inputs, float64 stays float64; the
  ``STATISTIC_BUFFERS`` stay at least float32 under ``.half()``/bfloat16;
* empty input: an empty output, zero gradients, no state change;
* non-finite guard: a channel whose statistic is inf/NaN keeps its old buffer
  value; a device flag records it, and the layer warns once when the flag is
  read: at ``train()``/``eval()``, when a state dict is saved, or at
  :meth:`SmallBatchNorm.report_nonfinite` (never during a training step);
* ``sync_stats`` (default False): per-process statistics, as in the papers,
  or those of the union of all processes' inputs;
* state dicts written by another layout (BatchNorm, the original authors'
  code) are converted and every conversion is logged.

See docs/layer_state.md for why the base class matters to MMDetection, what
``sync_stats`` requires of every process, and what mmengine's SyncBuffersHook
does to the buffers.
"""
import copy
import gc
import inspect
import warnings
from numbers import Integral, Real
from typing import NamedTuple, Tuple

import torch
from mmengine.registry import MODELS
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._torch import autocast_output_dtype, compiling, version
from .distributed import sync_world
from .first_use import takes_fused
from .paths import announce


class StateChange(NamedTuple):
    """One conversion that ``convert_state`` made to a state dict, with the
    keys it touched (without the layer's prefix), in the order made."""
    note: str                                   # the log line
    renamed: Tuple[Tuple[str, str], ...] = ()   # (old, new): the value moved to a new key
    changed: Tuple[str, ...] = ()               # key kept, value rewritten
    added: Tuple[str, ...] = ()                 # key created with no source value
    dropped: Tuple[str, ...] = ()               # key removed, value unused


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

    The contract (docs/architecture.md, "Adding a method"): a subclass is
    registered in ``MODELS``, takes ``num_features`` and then keyword options
    (its hyperparameters, :meth:`hyperparameters`), and implements
    ``_train_forward(x, sync)``, ``sync`` telling whether this step's
    statistics are those of all processes (``sync_stats`` and a multi-process
    run). :meth:`forward` handles the input checks, inference, empty input
    without ``sync`` and the step counter ``num_batches_tracked`` (t): it is
    incremented by one before each training step (the first has t = 1), so
    ``_train_forward`` reads the current step's t. What the rest of mmnorm
    reads of a layer is stated by the class attributes below, not re-detected.
    """

    _abbr_ = 'bn'  # mmcv's build_norm_layer names the module 'bn', 'bn1', ... as for BatchNorm
    # The buffers that hold statistics: kept at least float32 by _apply.
    STATISTIC_BUFFERS = ('running_mean', 'running_var')
    # False for a layer without running_mean, whose inference output is
    # weight * x / sqrt(running_var + eps) + bias (convert, fuse, PreciseBN
    # and the plain MMDetection pair read it).
    SUBTRACTS_MEAN = True
    # The buffers an averaged model (mmengine's EMA) averages; the others
    # (counters, windows, rings) it copies (mmnorm.engine.averaged_models).
    AVERAGED_BUFFERS = ('running_mean', 'running_var')
    # Whether the layer has a fused training step (read through _fused_now,
    # which _check_step sets), and whether it runs with sync_stats too.
    FUSED_STEP = False
    FUSED_SYNC = False

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
        # step_flags[0]: 1 once a statistic was inf/NaN (until reported). A buffer,
        # so that torch.compile takes it as an input of a shared graph, not as a
        # per-layer constant; not saved with the state dict.
        self.register_buffer('step_flags', torch.zeros(1, dtype=torch.int32), persistent=False)
        self._warned_nonfinite = False
        self._fused_now = False  # this step takes the fused kernels (set by _check_step)
        self._replays = []  # (input key, record) of recent steps, for their recomputed forwards
        announce()  # which implementation the training steps take (logged once)

    def __getstate__(self):
        state = super().__getstate__()
        state['_replays'] = []  # a copy replays nothing of this layer's steps
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._warned_nonfinite = False  # a copy warns for itself
        self.__dict__.setdefault('_replays', [])

    def _apply(self, fn, recurse=True):
        # Statistics buffers stay at least float32: ``.half()`` or
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

    @classmethod
    def needs_feeding_conv(cls, cfg):
        """Whether a layer built with the options ``cfg`` (a dict) must follow a
        2-D conv, whose output it reads (CBN compensating with rho != 0): model
        surgery converts only BatchNorms that a conv feeds to such a layer. A
        layer that does not takes (N, C) to (N, C, D, H, W) input."""
        return False

    @classmethod
    def hyperparameters(cls):
        """The layer's options: the keyword arguments of its constructor after
        ``num_features``, in order (an attribute of the same name holds each)."""
        params = list(inspect.signature(cls.__init__).parameters.values())[2:]
        return tuple(p.name for p in params
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))

    def extra_repr(self):
        options = ', '.join(f'{name}={getattr(self, name)!r}' for name in self.hyperparameters())
        return f'{self.num_features}, {options}'

    # --------------------------------------------------------------- forward
    def forward(self, x):
        self._check_input_dim(x)
        sync = self.training and self.sync_stats and sync_world()
        if x.numel() == 0 and not sync:
            # No statistic exists; keep the graph so parameters get zero gradients.
            shape = self.channel_shape(x)
            return x * self.weight.view(shape) + self.bias.view(shape)
        if self.training:
            record = self._replay_record(x) if recomputing() else None
            if record is not None:
                return self._replay(x, record)
            self._check_step(x, sync)
            self._advance_step()
            return self._train_forward(x, sync)
        return self._eval_forward(x)

    # -------------------------------------------------- recomputed forwards
    # Activation checkpointing (torch.utils.checkpoint, MMDetection's
    # with_cp) runs a forward again during the backward. That forward is a
    # replay of a step already taken: it must compute what the step computed
    # and change no state. Every training step keeps what it computed
    # (_keep_for_replay); a training forward during a backward pass takes the
    # newest record of its input's shape (docs/layer_state.md, "Activation
    # checkpointing").
    REPLAYS_KEPT = 16  # the newest steps' records, whatever their input shapes

    @staticmethod
    def _replay_key(x):
        return tuple(x.shape), x.dtype, x.device

    def _keep_for_replay(self, x, record):
        """Keep ``record`` (what :meth:`_replay` needs) of this step on ``x``;
        the oldest records go, so inputs of ever new sizes (multi-scale
        training) keep no more than REPLAYS_KEPT."""
        if compiling():  # a compiled graph recomputes inside itself
            return
        self._replays.append((self._replay_key(x), record))
        del self._replays[:-self.REPLAYS_KEPT]

    def _replay_record(self, x):
        """Take the newest record kept for an input like ``x``, or None."""
        key = self._replay_key(x)
        for i in range(len(self._replays) - 1, -1, -1):
            if self._replays[i][0] == key:
                return self._replays.pop(i)[1]
        return None

    def _replay(self, x, record):
        """The output of the step that kept ``record``, recomputed from ``x``
        with the statistics it used; no state changes."""
        raise NotImplementedError

    def _check_step(self, x, sync):
        """Raise, before any state changes, if the training step on ``x``
        cannot run (here: the fused path was asked for and cannot run), and
        choose its path (``_fused_now``), trying a variant's first fused step
        on a copy (:mod:`mmnorm.layers.first_use`)."""
        self._fused_now = takes_fused(self, x, sync)

    def fused_variant(self, x):
        """What makes the fused step on ``x`` compile or branch differently:
        the class, device, dtypes (autocast's too) and layout."""
        return (type(self).__name__, str(x.device), x.dtype, self.weight.dtype,
                autocast_output_dtype(x), x.dim() > 2 and x.stride(1) == 1,
                self.sync_stats and sync_world())

    def copy_for_trial(self):
        """A copy of the layer whose training step changes nothing of this one
        (the first-use trial of :mod:`mmnorm.layers.first_use`)."""
        return copy.deepcopy(self)

    def _advance_step(self):
        """t <- t + 1, on the device."""
        self.num_batches_tracked.add_(1)

    def _eval_forward(self, x):
        return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                                False, 0.0, self.eps, torch.backends.cudnn.enabled)

    def _train_forward(self, x, sync):
        raise NotImplementedError

    # ------------------------------------------------------ non-finite guard
    @staticmethod
    def update_where_finite(buffer, new_value, finite):
        """``buffer[c] <- new_value[c]`` for channels where ``finite[c]``, on the
        device, without a host synchronisation. ``finite`` has shape (C,) and
        broadcasts over leading dims of ``buffer``. One ``where`` writing into
        the buffer."""
        torch.where(finite, new_value.to(buffer.dtype), buffer, out=buffer)

    def warn_if_nonfinite(self, finite):
        """Record on the device whether a statistic was not finite (``finite``:
        (C,) bool) and return ``finite``; nothing is read on the host here."""
        return note_nonfinite(self.step_flags, finite)

    def report_nonfinite(self):
        """Warn once if a statistic was inf or NaN since the flag was last read.
        Reads the device flag on the host (one synchronisation): called by
        ``train()``/``eval()`` and when a state dict is saved, never per step."""
        flags = self.step_flags
        if self._warned_nonfinite or flags.device.type == 'meta' or not bool(flags[0]):
            return
        self._warned_nonfinite = True
        warnings.warn(f'{type(self).__name__}({self.num_features}): a batch statistic was '
                      'inf or NaN; the affected channels kept their previous buffers',
                      RuntimeWarning, stacklevel=3)

    def describe(self):
        """The layer in messages: its class and dotted name in the outermost
        module holding it, like "CBN 'neck.lateral_convs.0.bn'" (a
        DataParallel/DDP wrapper left out), or "CBN(256)" for a layer that is
        not a submodule. Found when a message needs it, from the modules that
        hold this one (:func:`holder`); nothing is recorded beforehand."""
        names, node = [], self
        while len(names) < 1000:
            found = holder(node)
            if found is None:
                break
            parent, name = found
            if name == 'module' and isinstance(parent, (nn.DataParallel,
                                                        nn.parallel.DistributedDataParallel)):
                break
            names.append(name)
            node = parent
        if not names:
            return f'{type(self).__name__}({self.num_features})'
        return f"{type(self).__name__} '{'.'.join(reversed(names))}'"

    def __prepare_scriptable__(self):
        raise RuntimeError(script_refusal(self))

    def train(self, mode=True):
        self.report_nonfinite()
        return super().train(mode)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.report_nonfinite()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    # ------------------------------------------------------ averaged models
    def take_buffer_shapes(self, source):
        """Give every buffer the shape of ``source``'s (the same layer in the
        model an averaged copy follows), as zeros: a buffer allocated at the
        first step (CBN's ring) exists in the copy too."""
        theirs = dict(source.named_buffers(recurse=False))
        for name, buffer in list(self.named_buffers(recurse=False)):
            other = theirs.get(name)
            if other is not None and other.shape != buffer.shape:
                self._buffers[name] = torch.zeros_like(other, device=buffer.device)

    def copy_unaveraged_buffers(self, source):
        """Copy ``source``'s buffers but AVERAGED_BUFFERS into this layer's."""
        theirs = dict(source.named_buffers(recurse=False))
        with torch.no_grad():
            for name, buffer in self.named_buffers(recurse=False):
                if name not in self.AVERAGED_BUFFERS and name in theirs:
                    buffer.copy_(theirs[name].to(buffer.device))

    # ------------------------------------------------------ state-dict loads
    def convert_state(self, state_dict, prefix):
        """Rewrite foreign keys of ``state_dict`` (under ``prefix``) into this
        layer's layout in place; return one :class:`StateChange` per
        conversion, in the order made. The default knows nothing to convert."""
        return []

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for change in self.convert_state(state_dict, prefix):
            _log_conversion(self, prefix, change, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class TransformedWeightConv(nn.Conv2d):
    """nn.Conv2d that convolves with ``transform_weight(self.weight)``: the
    contract of mmnorm's convs (CenConv, WSConv). A subclass registered in
    ``MODELS`` implements ``transform_weight`` and takes nn.Conv2d's
    arguments plus the keyword options it names in ``OPTIONS``. That is all
    the rest of mmnorm reads: ``mmnorm.fuse`` and the plain MMDetection pair
    turn it into an ``nn.Conv2d`` holding :meth:`transformed_weight`, with
    ``OPTIONS`` dropped from its config; ``mmnorm.convert`` builds it from a
    plain conv's hyper-parameters. (The evaluation cache is described in
    :mod:`mmnorm.layers.conv`.)
    """

    # keyword options beyond nn.Conv2d's (stored under the same names), which a
    # plain conv does not take
    OPTIONS = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._eval_weight_cache = None

    def transform_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Map the raw weight (C_out, C_in / groups, kh, kw) to the used one."""
        raise NotImplementedError

    def transformed_weight(self) -> torch.Tensor:
        """The weight the convolution uses (cached in eval mode, see
        :mod:`mmnorm.layers.conv`)."""
        weight = self.weight
        if self.training or (torch.is_grad_enabled() and weight.requires_grad):
            return self.transform_weight(weight)
        key = (weight.data_ptr(), version(weight), weight.device, weight.dtype,
               torch.is_inference_mode_enabled())
        cache = self._eval_weight_cache
        if cache is None or cache[0] != key:
            with torch.no_grad():
                # The detached raw weight keeps its storage alive, so a new
                # weight cannot reuse the address that the key holds.
                cache = (key, weight.detach(), self.transform_weight(weight))
            self._eval_weight_cache = cache
        return cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) or (C_in, H, W) -> the convolution with the
        transformed weight. torch's error for a bad input (wrong channel
        count or rank) is re-raised with this layer's name in front."""
        try:
            return self._conv_forward(x, self.transformed_weight(), self.bias)
        except RuntimeError as error:
            raise RuntimeError(f'{type(self).__name__}: {error}') from error

    def __prepare_scriptable__(self):
        raise RuntimeError(script_refusal(self))

    def train(self, mode: bool = True):
        self._eval_weight_cache = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._eval_weight_cache = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        state['_eval_weight_cache'] = None
        return state


def holder(member, slot='_modules'):
    """(parent, name) of a module that holds ``member`` in its ``slot`` dict
    (``_modules``: as its submodule ``name``; ``_parameters``: as its
    parameter ``name``), or None: looked up among the objects that refer to
    it (Python's garbage collector knows them), so it costs a scan of the
    process's objects and runs once per question, never per step."""
    for members in gc.get_referrers(member):
        if not isinstance(members, dict):
            continue
        for owner in gc.get_referrers(members):
            candidates = [owner] if isinstance(owner, nn.Module) else (
                [o for o in gc.get_referrers(owner) if isinstance(o, nn.Module)]
                if isinstance(owner, dict) else [])
            for parent in candidates:
                if parent.__dict__.get(slot) is members:
                    name = next((key for key, value in members.items() if value is member), None)
                    if name is not None:
                        return parent, name
    return None


# The load being logged (its error list, shared by every module of one
# load_state_dict call) and the layer classes it has announced.
_LOAD = [None, set()]


def _log_conversion(layer, prefix, change, load):
    """Log a state-dict conversion: the first of each layer class in a load at
    INFO level, the others at DEBUG, so a checkpoint converts in a few lines."""
    import logging

    from mmengine.logging import print_log
    if _LOAD[0] is not load:
        _LOAD[:] = [load, set()]
    name = type(layer).__name__
    first = name not in _LOAD[1]
    _LOAD[1].add(name)
    where = prefix.rstrip('.') or '<root>'
    note = f'{name} {where}: {change.note}'
    if first:
        note += f' (the other {name} layers of this checkpoint likewise, logged at DEBUG level)'
    print_log(note, logger='current', level=logging.INFO if first else logging.DEBUG)


def recomputing():
    """True inside a backward pass, where a training forward is activation
    checkpointing's recompute of a step already taken (torch >= 2.1 tells;
    on torch 2.0 every forward is a step)."""
    graph_task = getattr(torch._C, '_current_graph_task_id', None)
    return graph_task is not None and not compiling() and graph_task() != -1


def registered(base):
    """name -> class of every subclass of ``base`` registered in mmengine's
    root ``MODELS`` (mmnorm's layers and any a user registers later)."""
    return {name: cls for name, cls in MODELS.module_dict.items()
            if isinstance(cls, type) and issubclass(cls, base)}


def note_nonfinite(flags, finite):
    """``flags[0] |= not all(finite)`` on the device (``flags``: a layer's
    ``step_flags``); returns ``finite``."""
    flags[:1].bitwise_or_(finite.logical_not().any())
    return finite


def script_refusal(module):
    """Why ``torch.jit.script`` cannot compile ``module`` (an mmnorm layer)
    and what to do instead."""
    return (f'{type(module).__name__}: torch.jit.script cannot compile mmnorm\'s layers (their '
            'training steps are autograd Functions and custom operators); fold the model '
            'first with mmnorm.fuse(model), whose result scripts, or use torch.compile')

