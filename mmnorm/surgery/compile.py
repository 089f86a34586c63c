"""Compiling a model that has CBN layers with torch.compile.

CBN reads the conv that feeds it (its input, and the weight it convolved with)
from its input's autograd node, which exists only where the conv ran outside a
compiled graph; CBN's own training step always runs outside (one graph break
per CBN). :func:`keep_cbn_convs_eager` makes the convs that feed CBNs run
outside the graphs too, so that ``torch.compile(model)`` compiles everything
else: modules that feed no CBN compile as they would without mmnorm.
"""
from ..layers import CBN
from ..layers.operators import EagerForward
from .fuse import conv_norm_pairs

__all__ = ['keep_cbn_convs_eager']


def keep_cbn_convs_eager(model):
    """Run every conv of ``model`` that feeds a CBN (read from the traced
    forward, :func:`mmnorm.surgery.fuse.conv_norm_pairs`) outside
    torch.compile's graphs; call it before ``torch.compile``. Returns the
    qualified names of those convs. Idempotent; the convs keep their class,
    parameters and state-dict keys. A CBN whose conv cannot be told from the
    forward raises at its first training step, naming what to do."""
    pairs, _ = conv_norm_pairs(model, lambda module: isinstance(module, CBN))
    modules = dict(model.named_modules())
    for name in pairs.values():
        conv = modules[name]
        if not isinstance(vars(conv).get('forward'), EagerForward):
            conv.forward = EagerForward(conv)
    return sorted(set(pairs.values()))
