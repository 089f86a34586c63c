"""Write a config that puts a small-batch norm (and its conv) into any
MMDetection config, e.g.

    python tools/norm_config.py mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py \\
        --norm MABN --conv CenConv [--everywhere] [--out FILE]

The file inherits the base and holds only the delta (lists whole), with
``custom_imports`` for mmnorm, so MMDetection's own tools/train.py reads it
too. The table of what changed and what was left alone (and why) is printed
and written into the file's header. See mmnorm/engine/norm_config.py.
"""
import argparse
import os
import os.path as osp
import shlex
import sys

EPILOG = """\
Without --everywhere the norm goes into the backbone and wherever the base has
a batch or group norm; with it, also into the FPN and every head that takes a
norm_cfg (a 2-fc box head becomes the 4-conv + 1-fc one), the MABN paper's
setting. The RPN head and heads whose class takes no norm_cfg are left alone,
with the reason in the table.

A mistake ends with one line, "error: ...", and exit status 2 (--debug shows
the traceback)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='Write a config that uses a small-batch norm (mmnorm) in any '
        'MMDetection config, and print what it changes.', epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', metavar='BASE_CONFIG',
                   help="the config to start from: a file or 'mmdet::FOLDER/NAME.py'")
    p.add_argument('--norm', required=True,
                   help='the norm: a registered one (MABN, BRN, CBN, ...) or GN (with '
                   '--conv WSConv)')
    p.add_argument('--conv', help='the conv to put where the norm goes (CenConv, WSConv, ...)')
    p.add_argument('--everywhere', action='store_true',
                   help='also give a norm to the FPN and the heads that take one and have none')
    p.add_argument('--out', help='the file to write (default: <base name>_<norm lower>.py in '
                   'the current folder)')
    p.add_argument('--debug', action='store_true', help='show the traceback of errors too')
    return p.parse_args(argv)


def base_reference(config, out):
    """What ``_base_`` says in the file ``out``: ``mmdet::...`` as given, a
    file relative to ``out``'s folder when both share a folder above the
    root, else absolute."""
    if '::' in config:
        return config
    base = osp.abspath(config)
    folder = osp.dirname(osp.abspath(out))
    if osp.commonpath([base, folder]) != os.sep:
        return osp.relpath(base, folder)
    return base


def main(argv=None):
    args = parse_args(argv)
    # Imported here so that --help is quick.
    import mmnorm  # noqa: F401  (registers the layers)
    from mmnorm.engine.norm_config import (
        ConfigReadError,
        NormConfigError,
        check_names,
        check_written,
        config_text,
        format_table,
        norm_config,
        read_config,
    )
    try:
        check_names(args.norm, args.conv)
        cfg = read_config(args.config)
        overrides, rows = norm_config(cfg, args.norm, args.conv, args.everywhere)
        if 'model' not in overrides:
            print(format_table(rows))
            hint = '' if args.everywhere else \
                '; --everywhere also gives one to the FPN and the heads that take one'
            raise NormConfigError(f'{args.config}: no component gets {args.norm} (see the '
                                  f'table{hint}); nothing written')
        name = osp.splitext(osp.basename(args.config.split('::')[-1]))[0]
        out = args.out or f'{name}_{overrides["norm"]["type"].lower()}.py'
        if osp.exists(out) and osp.samefile(out, cfg.filename):
            raise NormConfigError(f'--out {out} is the base config itself; give another file')
        command = 'python tools/norm_config.py ' + ' '.join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
            if a != '--debug')
        text = config_text(base_reference(args.config, out), overrides, rows, command,
                           base_keys=set(cfg.keys()))
        os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
        with open(out, 'w', encoding='utf-8') as f:
            f.write(text)
        check_written(out, rows)
    except (ConfigReadError, NormConfigError) as error:
        if args.debug:
            raise
        print(f'error: {error}', file=sys.stderr)
        return 2
    print(format_table(rows))
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
