"""The layers' own operators, seen whole by torch.compile.

Two pieces of a training step cannot be traced into a graph: MABN's backward,
which writes the layer's ``buffer_gz`` while autograd runs, and the non-finite
warning, which reads a flag on the host now and then. :class:`Operator` runs
such a function as it is in eager mode and, while torch.compile traces
(torch >= 2.4), as a ``torch.library.custom_op`` named ``mmnorm::<name>``:
one opaque node with the mutations it declares, so the graph neither breaks
nor silently drops the write. :func:`with_backward` gives a forward operator
its backward the same way (an ``autograd.Function`` in eager mode,
``register_autograd`` for the traced operator).

On torch 2.0-2.3 (no ``custom_op``) the functions are always called as they
are; compiled models then break the graph at them.
"""
import torch

from .._torch import CUSTOM_OPS, compile_disabled, compiling


class Operator:
    """``impl`` (annotated for ``custom_op``) callable in eager mode as itself
    and, while compiling, as the operator ``mmnorm::<name>`` whose output
    shapes ``fake`` gives. ``mutates`` names the arguments it writes."""

    def __init__(self, name, impl, fake, mutates=()):
        self.impl = impl
        self.op = None
        if CUSTOM_OPS:
            self.op = torch.library.custom_op(f'mmnorm::{name}', impl, mutates_args=mutates)
            self.op.register_fake(fake)

    def __call__(self, *args):
        if self.op is not None and compiling():
            return self.op(*args)
        return self.impl(*args)


def with_backward(forward, setup_context, backward, backward_args):
    """A differentiable call of the :class:`Operator` ``forward`` (arguments
    positional, the first three x, weight, bias). ``setup_context(ctx, inputs,
    output)`` keeps what the backward needs; the :class:`Operator`
    ``backward`` takes ``backward_args(ctx, grad_output, need_dx)`` and
    returns (dx, dweight, dbias), dx empty unless ``need_dx``. Gradients that
    are not needed, and those of the other inputs, are None."""

    def gradients(ctx, grad_output, call):
        need = ctx.needs_input_grad
        grads = call(*backward_args(ctx, grad_output, need[0]))
        return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * (len(need) - 3)

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = forward.impl(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_output):
            return gradients(ctx, grad_output, backward.impl)

    if forward.op is not None:
        forward.op.register_autograd(
            lambda ctx, grad_output: gradients(ctx, grad_output, backward.op),
            setup_context=setup_context)

    def call(*inputs):
        if forward.op is not None and compiling():
            return forward.op(*inputs)
        return Function.apply(*inputs)

    return call


def fused_operator(name, impl, fake, mutates):
    """``impl`` as the operator ``mmnorm::<name>``, called as such in eager mode
    too (one dispatched operator per call, like ``native_batch_norm``). For
    the fused kernels, which exist only where ``custom_op`` does (torch >=
    2.4); None on older torch."""
    if not CUSTOM_OPS:
        return None
    op = torch.library.custom_op(f'mmnorm::{name}', impl, mutates_args=mutates)
    op.register_fake(fake)
    return op


def fused_step(forward, keep, gradients, replay):
    """A differentiable call of ``forward(*inputs) -> (output, saved)``, a
    :func:`fused_operator` that updates buffers (which ``custom_op`` cannot
    give an autograd formula): ``keep(ctx, inputs, saved)`` stores what
    ``gradients(ctx, grad_output)`` needs, which returns one gradient (or
    None) per input. Traced whole by torch.compile.

    ``call(*inputs, former=None)`` returns (output, saved); with ``former``,
    the ``saved`` of an earlier call, it is that call replayed (a forward
    recomputed by activation checkpointing): ``replay(inputs, former)`` makes
    the output from the saved statistics, nothing is updated, and the backward
    is the earlier call's."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            inputs, former = args[:-1], args[-1]
            if former is None:
                output, saved = forward(*inputs)
            else:
                output, saved = replay(inputs, former), former.clone()
            keep(ctx, inputs, saved)
            ctx.mark_non_differentiable(saved)
            ctx.set_materialize_grads(False)  # no zeros made for the saved statistics' gradient
            return output, saved

        @staticmethod
        def backward(ctx, grad_output, _grad_saved):
            return gradients(ctx, grad_output)

    def call(*inputs, former=None):
        return Function.apply(*inputs, former)

    return call


class Eager:
    """``function`` run outside torch.compile's graphs (a graph break there).

    Disabling imports torch._dynamo, which a process that compiles nothing
    need not pay for: the disabled wrapper is made by :meth:`prepare`, which
    the users call eagerly before anything is compiled (CBN's constructor,
    :class:`EagerForward`); until then a call goes to ``function`` itself."""

    def __init__(self, function):
        self.function = function
        self.disabled = None

    def prepare(self):
        if self.disabled is None:
            self.disabled = compile_disabled(self.function)

    def __call__(self, *args, **kwargs):
        return (self.disabled or self.function)(*args, **kwargs)


_MODULE_FORWARD = Eager(lambda module, *args, **kwargs: type(module).forward(module, *args,
                                                                             **kwargs))


class EagerForward:
    """A module's own ``forward``, run outside torch.compile's graphs: set as
    ``module.forward = EagerForward(module)``. Copies and pickles with the
    module (a bound method set on the instance would not follow a deepcopy)."""

    def __init__(self, module):
        self.module = module
        _MODULE_FORWARD.prepare()

    def __setstate__(self, state):
        self.__dict__.update(state)
        _MODULE_FORWARD.prepare()

    def __call__(self, *args, **kwargs):
        return _MODULE_FORWARD(self.module, *args, **kwargs)
