"""Convert a checkpoint into this project's MMDetection models and print a
report of every key (the conversions are described in mmnorm/checkpoints/conversion.py).

    python tools/convert_checkpoint.py SRC DST --from torchvision --norm MABN
    python tools/convert_checkpoint.py SRC DST --from torchvision --config configs/mask_rcnn_mabn.py
    python tools/convert_checkpoint.py R50-wc.pth checkpoints/resnet50_mabn_cenconv_imagenet.pth \
        --from mabn-imagenet
    python tools/convert_checkpoint.py model_final.pth checkpoints/mask_rcnn_mabn_authors.pth \
        --from mabn-detection
"""
import argparse
import sys

from mmnorm.checkpoints.conversion import LAYOUTS, ConversionError, convert_checkpoint
from mmnorm.layers import norm_types


def parse_args():
    p = argparse.ArgumentParser(description='Convert a checkpoint for mmnorm\'s models')
    p.add_argument('source', help='checkpoint file to convert')
    p.add_argument('destination', help='converted checkpoint file to write')
    p.add_argument('--from', dest='layout', required=True, choices=LAYOUTS,
                   help='layout of the source checkpoint')
    p.add_argument('--norm', choices=sorted(norm_types()),
                   help='target norm of a torchvision conversion without --config')
    p.add_argument('--config', help='config whose model (mabn-detection) or backbone (the '
                   'others) is the target; default: configs/mask_rcnn_mabn.py for '
                   'mabn-detection, configs/mask_rcnn_mabn_imagenet.py for mabn-imagenet')
    p.add_argument('--as-detector', action='store_true', help='write backbone keys under '
                   '"backbone." (a full-detector checkpoint for load_from) instead of a '
                   'backbone-only file for init_cfg=dict(type="Pretrained", ...)')
    p.add_argument('--trust', action='store_true', help='unpickle the source in full if '
                   'torch.load(weights_only=True) refuses it (only for files you trust)')
    return p.parse_args()


def main():
    args = parse_args()
    try:
        checkpoint, report = convert_checkpoint(
            args.source, args.layout, args.destination, norm=args.norm, config=args.config,
            as_detector=args.as_detector, trust=args.trust)
    except ConversionError as err:
        sys.exit(f'error: {err}')
    print(report.format())
    print(f'\nWrote {args.destination} ({len(checkpoint["state_dict"])} keys).')


if __name__ == '__main__':
    main()
