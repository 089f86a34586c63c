"""Deploy a trained detector for inference, in one of two forms.

    python tools/deploy.py CONFIG CHECKPOINT OUT --to mmdet [--cfg-options k=v ...]
    python tools/deploy.py CONFIG CHECKPOINT OUT [--to module] [--cfg-options k=v ...]

``--to mmdet``: OUT is a new folder with ``config.py`` and ``model.pth``, a
plain MMDetection config and a weights-only checkpoint that need no mmnorm:
MABN, BRN and CBN become BN, CenConv and WSConv plain convs with their
transformed weights (mmnorm.checkpoints.plain_mmdet). Use it with MMDetection's
``init_detector(OUT/config.py, OUT/model.pth)``, its tools/test.py, MMDeploy.

``--to module`` (the default): every norm that a conv feeds (MABN, BRN, CBN,
BN, FrozenBN) is folded into that conv, CenConv and WSConv become plain convs,
and the few mmnorm norms no conv feeds become BatchNorm2d
(mmnorm.surgery.fuse.fuse); the log counts what was folded, replaced, kept and
skipped. OUT is a file holding the pickled module (mmnorm.checkpoints.deployed),
which loads without mmnorm; it is trusted code, as any checkpoint. Evaluate
it with ``python tools/test.py CONFIG OUT``.
"""
import argparse

from mmengine.config import DictAction

from mmnorm.checkpoints.plain_mmdet import DeployError
from mmnorm.engine.command_line import UsageError, add_debug_arg, run_tool

TARGETS = ('module', 'mmdet')
#: The library's errors this tool reports in one line (besides the command line's own).
ERRORS = (DeployError,)


def main():
    p = argparse.ArgumentParser(description='Deploy a detector for inference (mmnorm)')
    p.add_argument('config', help='the config the checkpoint was trained with')
    p.add_argument('checkpoint', help='the checkpoint to deploy')
    p.add_argument('out', help='--to module: the file to write (evaluate it with tools/test.py '
                   'CONFIG OUT); --to mmdet: the folder to create')
    p.add_argument('--to', default='module', metavar='{module,mmdet}',
                   help='module (default): the pickled folded module; mmdet: a plain '
                   'MMDetection config and weights-only checkpoint, OUT/config.py and '
                   'OUT/model.pth')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override config settings, key=value pairs')
    add_debug_arg(p)
    args = p.parse_args()
    if args.to not in TARGETS:
        raise UsageError(f"--to must be 'module' (the pickled folded module, the "
                         f"default) or 'mmdet' (a plain MMDetection config and "
                         f"checkpoint), got {args.to!r}")
    if args.to == 'mmdet':
        from mmnorm.checkpoints.plain_mmdet import CONFIG_NAME, WEIGHTS_NAME, write_plain_mmdet
        result = write_plain_mmdet(args.config, args.checkpoint, args.out, args.cfg_options)
        replaced = ', '.join(f'{what}: {n}' for what, n in sorted(result['replaced'].items()))
        print(f'[mmnorm deploy] replaced: {replaced or "none"}')
        for change in result['changes']:
            print(f'[mmnorm deploy] config: {change}')
        print(f'[mmnorm deploy] wrote {args.out}/{CONFIG_NAME} and {args.out}/{WEIGHTS_NAME} '
              f'(plain MMDetection, no mmnorm needed)')
        return
    from mmnorm.checkpoints.deployed import deploy_checkpoint
    from mmnorm.surgery.fuse import format_report
    report = deploy_checkpoint(args.config, args.checkpoint, args.out, args.cfg_options)
    for line in format_report(report):
        print(f'[mmnorm deploy] {line}')
    print(f'[mmnorm deploy] saved the folded model to {args.out}')


if __name__ == '__main__':
    run_tool(main, ERRORS)
