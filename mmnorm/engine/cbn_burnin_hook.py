"""CBN's burn-in hook, registered in mmengine's root ``HOOKS``.

:class:`CBNBurninHook` turns a CBN burn-in stated in epochs
(``norm_cfg=dict(type='CBN', burnin_epochs=8)``) into iterations with the real
number of iterations per epoch of the run, ``len(runner.train_dataloader)``
(per process: with a distributed sampler that is the per-rank count, which is
also the number of training steps each rank's layers make per epoch). Config::

    custom_hooks = [dict(type='CBNBurninHook')]

The conversion is logged. A CBN layer stating epochs that this hook (or
``CBN.set_iters_per_epoch``) did not convert raises at its first training
forward, so a missing hook cannot silently turn epochs into iterations.
"""
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

from ..layers.cbn import CBN


@HOOKS.register_module()
class CBNBurninHook(Hook):
    """Convert every CBN layer's ``burnin_epochs`` into iterations before
    training: burnin = round(burnin_epochs * len(train_dataloader)).

    Runs in ``before_train`` (after a resume has loaded the checkpoint and
    before the first training step), on every run, so a resumed run converts
    with its own data loader again. Layers that state ``burnin`` in iterations
    are left alone.
    """

    priority = 'VERY_HIGH'

    def __init__(self):
        self.conversions = {}  # layer name -> (epochs, iterations per epoch, iterations)

    def before_train(self, runner) -> None:
        iters_per_epoch = len(runner.train_dataloader)
        model = runner.model
        self.conversions = {}
        for name, module in model.named_modules():
            if isinstance(module, CBN) and module.burnin_epochs is not None:
                iters = module.set_iters_per_epoch(iters_per_epoch)
                self.conversions[name] = (module.burnin_epochs, iters_per_epoch, iters)
        if not self.conversions:
            print_log('CBNBurninHook: no CBN layer states its burn-in in epochs; nothing to '
                      'convert', logger='current')
            return
        groups = {}
        for name, (epochs, _, iters) in self.conversions.items():
            groups.setdefault((epochs, iters), []).append(name)
        for (epochs, iters), names in sorted(groups.items()):
            print_log(f'CBNBurninHook: burnin_epochs={epochs} x {iters_per_epoch} iterations per '
                      f'epoch (len(train_dataloader)) = burn-in of {iters} iterations for '
                      f'{len(names)} CBN layer(s): {", ".join(names[:4])}'
                      f'{", ..." if len(names) > 4 else ""}', logger='current')
