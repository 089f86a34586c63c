"""The benchmarks that tools/benchmark_layers.py (each layer next to its
baseline), tools/benchmark_models.py (whole Mask R-CNN models, one per
method) and tools/benchmark_maskrcnn.py (torchvision's Mask R-CNN, one per
method) run; :class:`HelpFormatter` is their ``--help``."""
import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each option's default (where it is not None: the help says
    what happens then) and the description as written."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)
