"""Compiling a model that has CBN layers with torch.compile.

CBN reads the conv that feeds it (its input, and the weight it convolved with)
from its input's autograd node, which exists only where the conv ran outside a
compiled graph; CBN's own training step always runs outside (one graph break
per CBN). :func:`keep_cbn_convs_eager` makes the convs that feed CBNs run
outside the graphs too, so that ``torch.compile(model)`` compiles everything
else: modules that feed no CBN compile as they would without mmnorm.
"""
from ..layers import CBN
from ..layers._ops import EagerForward
from .fuse import conv_norm_pairs

__all__ = ['keep_cbn_convs_eager']


def keep_cbn_convs_eager(model):
    """Run every conv of ``model`` that feeds a CBN (the pairing rule of
    :func:`mmnorm.surgery.fuse.conv_norm_pairs`: the conv registered just
    before the CBN) outside torch.compile's graphs; call it before
    ``torch.compile``. Returns the qualified names of those convs. Idempotent;
    the convs keep their class, parameters and state-dict keys."""
    names = []
    for parent_name, parent in model.named_modules():
        for conv_name, _ in conv_norm_pairs(parent, lambda module: isinstance(module, CBN)):
            conv = parent._modules[conv_name]
            if not isinstance(vars(conv).get('forward'), EagerForward):
                conv.forward = EagerForward(conv)
            names.append(f'{parent_name}.{conv_name}' if parent_name else conv_name)
    return names
