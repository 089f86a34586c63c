"""Which conv feeds which norm, read from what the model runs.

:func:`feeding_convs` traces the model with ``torch.fx`` (norms and convs kept
as leaves), so a pair is what the forward computes, whatever order the modules
were registered in. A conv feeds a norm when every call of the norm takes the
output of a call of that conv and nothing else reads that output (folding the
norm into the conv changes every reader of the conv's output). A module whose
forward does not trace (Python branches on tensor values, dict inputs: an
MMDetection detector) is traced child by child; a norm whose direct parent
does not trace gets no pair, and the reason says which module and why.
"""
import contextlib
import inspect
from collections import defaultdict

import torch.fx
from torch import nn


class _Tracer(torch.fx.Tracer):
    def __init__(self, leaf):
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, module, qualified_name):
        return self.leaf(module) or super().is_leaf_module(module, qualified_name)


def _join(prefix, name):
    return f'{prefix}.{name}' if prefix else name


def _producer(node, root, prefix):
    """Words for what computes ``node`` (a norm's input)."""
    if node.op == 'call_module':
        return f"{_join(prefix, node.target)} ({type(root.get_submodule(node.target)).__name__})"
    if node.op == 'call_function':
        name = getattr(node.target, '__name__', str(node.target))
        kind = ' (a concatenation)' if name in ('cat', 'concat', 'concatenate') else ''
        return f'{getattr(node.target, "__module__", None) or "torch"}.{name}{kind}'
    if node.op == 'call_method':
        return f'the tensor method .{node.target}()'
    if node.op == 'placeholder':
        return f"the input of {prefix or '<root>'}"
    return f'{node.op} {node.target}'


def _pairs_in_graph(graph, root, prefix, is_norm, is_conv, pairs, why):
    calls = defaultdict(list)  # norm name -> its input nodes, one per call
    for node in graph.nodes:
        if node.op == 'call_module' and is_norm(root.get_submodule(node.target)):
            calls[node.target].append(node.args[0] if node.args else None)
    for name, module in root.named_modules():
        if name and is_norm(module) and name not in calls:
            why.setdefault(_join(prefix, name), f'the forward of {prefix or "<root>"} does not '
                                                'call it')
    for target, sources in calls.items():
        path = _join(prefix, target)
        feeders = set()
        for source in sources:
            if not isinstance(source, torch.fx.Node):
                feeders.add(None)
                why[path] = 'its input is not a tensor computed in the forward'
                continue
            if source.op != 'call_module' or not is_conv(root.get_submodule(source.target),
                                                         root.get_submodule(target)):
                feeders.add(None)
                why[path] = f'its input comes from {_producer(source, root, prefix)}'
                continue
            others = [user for user in source.users if user.op != 'call_module'
                      or user.target != target]
            if others:
                feeders.add(None)
                why[path] = (f'the output of {_join(prefix, source.target)} is also used by '
                             f'{_producer(others[0], root, prefix)}')
                continue
            feeders.add(source.target)
        if len(feeders) == 1 and None not in feeders:
            pairs[path] = _join(prefix, feeders.pop())
            why.pop(path, None)
        elif None not in feeders:
            why[path] = f'its calls take the outputs of different convs: {sorted(feeders)}'


def _defaults(module):
    """The forward's arguments that have defaults, at those defaults (MMCV's
    ``ConvModule.forward(x, activate=True, norm=True)``): traced as
    constants, the way the model calls it, not as inputs."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return {p.name: p.default for p in parameters
            if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _trace(module, prefix, is_norm, is_conv, leaf, pairs, why):
    try:
        graph = _Tracer(leaf).trace(module, concrete_args=_defaults(module) or None)
    except Exception as error:  # noqa: BLE001 - any failure to trace means: look inside
        first = str(error).strip().splitlines()[0] if str(error).strip() else ''
        reason = (f'{prefix or "<root>"} ({type(module).__name__}) does not trace with '
                  f'torch.fx ({type(error).__name__}: {first[:120]}), so what feeds it is '
                  'unknown')
        for name, child in module.named_children():
            if leaf(child):
                if is_norm(child):
                    why.setdefault(_join(prefix, name), reason)
            else:
                _trace(child, _join(prefix, name), is_norm, is_conv, leaf, pairs, why)
        return
    _pairs_in_graph(graph, module, prefix, is_norm, is_conv, pairs, why)


def feeding_convs(model, is_norm, is_conv):
    """Which conv feeds each norm of ``model``, decided from its traced forward.

    Args:
        model (nn.Module): the model (a norm itself has no pair).
        is_norm (callable): module -> bool, the norms to pair.
        is_conv (callable): (conv module, norm module) -> bool, whether a
            module that feeds a norm counts as its conv.

    Returns:
        (pairs, why): ``pairs`` maps a norm's qualified name to the qualified
        name of the conv that feeds it; ``why`` maps every other norm's name
        to the reason it has none.
    """
    pairs, why = {}, {}

    def leaf(module):
        return is_norm(module) or isinstance(module, nn.modules.conv._ConvNd)

    if leaf(model):
        return pairs, why
    with _state_kept(model):
        _trace(model, '', is_norm, is_conv, leaf, pairs, why)
    return pairs, why


@contextlib.contextmanager
def _state_kept(model):
    """Tracing runs the forwards' Python code, and some cache what they compute
    on the module (torchvision's MultiScaleRoIAlign sets its scales at its
    first call): every module's attributes, parameters, buffers and children
    are put back as they were afterwards, so no traced value stays behind."""
    saved = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
             for m in model.modules()]
    try:
        yield
    finally:
        for module, attributes, parameters, buffers, children in saved:
            module.__dict__.clear()
            module.__dict__.update(attributes)
            for table, content in ((module._parameters, parameters),
                                   (module._buffers, buffers), (module._modules, children)):
                table.clear()
                table.update(content)
