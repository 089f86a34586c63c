"""Fold a trained detector for inference and save it for tools/test.py.

    python tools/deploy.py CONFIG CHECKPOINT OUT [--cfg-options k=v ...]
    python tools/test.py CONFIG OUT          # evaluates the folded model

Every norm that a conv feeds (MABN, BRN, CBN, BN, FrozenBN) is folded into that
conv, CenConv and WSConv become plain convs, and the few mmnorm norms no conv
feeds become BatchNorm2d (mmnorm.surgery.fuse.fuse); the log counts what was
folded, replaced, kept and skipped. OUT holds the pickled module, which loads
without mmnorm; it is trusted code, as any checkpoint.
"""
import argparse

from mmengine.config import DictAction

from mmnorm.engine import runtime
from mmnorm.surgery.fuse import deploy_checkpoint, format_report


def main():
    p = argparse.ArgumentParser(description='Fold a detector for inference (mmnorm)')
    p.add_argument('config', help='the config the checkpoint was trained with')
    p.add_argument('checkpoint', help='the checkpoint to fold')
    p.add_argument('out', help='the file to write (evaluate it with tools/test.py CONFIG OUT)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override config settings, key=value pairs')
    runtime.add_debug_arg(p)
    args = p.parse_args()
    report = deploy_checkpoint(args.config, args.checkpoint, args.out, args.cfg_options)
    for line in format_report(report):
        print(f'[mmnorm deploy] {line}')
    print(f'[mmnorm deploy] saved the folded model to {args.out}')


if __name__ == '__main__':
    runtime.run_tool(main)
