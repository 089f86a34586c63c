"""What the three benchmarks (layers.py, models.py, maskrcnn.py) share: their
``--help``, sizes at a scale, synthetic boxes, alternated timing, CBN's
warm-up, the one ratio and the cells, reading a table back, the machine, the
plot and the outputs."""
import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SIZE_DIVISOR = 32  # MMDetection pads images to a multiple of this
MAX_ROUNDS = 1000  # median_times takes at most this many rounds


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each option's default (where it is not None: the help says
    what happens then) and the description as written."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def say(text):
    """Print ``text`` to stderr at once: progress, kept out of the markdown."""
    print(text, file=sys.stderr, flush=True)


def padded_size(image, scale):
    """Returns (H, W) of ``image`` with its sides times ``scale``, each rounded
    up to a multiple of SIZE_DIVISOR."""
    return tuple(math.ceil(side * scale / SIZE_DIVISOR) * SIZE_DIVISOR for side in image)


def scaled_count(n, scale):
    """Returns the RoI count ``n`` shrunk with the image area (``n`` at scale 1, at least 1)."""
    return max(1, round(n * scale * scale))


def boxes_and_masks(count, size, generator):
    """Returns ``count`` random boxes (x0, y0, x1, y1) in whole pixels, sides 0.1 to
    0.5 of the image's ``size`` (H, W), and their masks (uint8, 1 inside the box)."""
    h, w = size
    extent = torch.tensor([w, h])
    sides = (0.1 + 0.4 * torch.rand(count, 2, generator=generator)) * extent
    corners = torch.rand(count, 2, generator=generator) * (extent - sides)
    boxes = torch.cat([corners, corners + sides], 1).floor()
    masks = torch.zeros(count, h, w, dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        mask[y0:y1, x0:x1] = 1
    return boxes, masks


def synchronizer(device):
    """Returns a function that waits for the kernels queued on ``device``
    (a no-op off CUDA)."""
    if device.type == 'cuda':
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def median_times(items, step, warmups, repeats, min_time=0.0):
    """Call ``step(item)`` ``warmups[i]`` times per item, then in rounds that
    call every item once, alternating them (the order reversed every other
    round, so that a change in the machine's load hits all), until there are
    ``repeats`` rounds and the rounds took ``min_time`` seconds per item (at
    most MAX_ROUNDS). Returns, per item, the median of each number ``step``
    returns (a tuple)."""
    for item, warmup in zip(items, warmups):
        for _ in range(warmup):
            step(item)
    samples = [[] for _ in items]
    order = list(range(len(items)))
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - start < min_time * len(items)
                               and rounds < MAX_ROUNDS):
        for j in (order if rounds % 2 == 0 else order[::-1]):
            samples[j].append(step(items[j]))
        rounds += 1
    return [[statistics.median(column) for column in zip(*rows)] for rows in samples]


def cbn_layers(module):
    """Returns the CBN layers in ``module`` (mmnorm's and layers.TwoGradCBN)."""
    return [m for m in module.modules() if hasattr(m, 'buffer_num') and hasattr(m, 'burnin_iters')]


def steps_to_fill(module):
    """Returns how many training steps put every CBN in ``module`` past its
    burn-in with a full history (0 without CBN)."""
    return max([m.burnin_iters() + m.buffer_num for m in cbn_layers(module)], default=0)


def check_history_full(module):
    """Raise unless every CBN in ``module`` holds a full history."""
    for m in cbn_layers(module):
        pushes, k = int(m.history_pushes), m.buffer_num
        if pushes < k:
            raise RuntimeError(f'CBN history holds {pushes} of {k} steps after warm-up')


def ratio(value, base):
    """Returns ``value / base``: nan where either is None or nan, or ``base`` is 0."""
    if value is None or base is None or not base:
        return math.nan
    return value / base


def fmt_ratio(value):
    """Returns a ratio as its cell: '1.23x', or '-' for nan."""
    return '-' if math.isnan(value) else f'{value:.2f}x'


def read_ratio(cell):
    """Returns the ratio in a cell written by ``fmt_ratio``; nan for any other cell."""
    return float(cell[:-1]) if re.fullmatch(r'\d+\.\d+x', cell) else math.nan


def fmt_ms(seconds):
    """Returns seconds as milliseconds, with 3 significant digits or more."""
    ms = seconds * 1e3
    return f'{ms:.1f}' if ms >= 10 else f'{ms:.2f}' if ms >= 1 else f'{ms:.3f}'


def fmt_mb(nbytes):
    """Returns bytes as MiB, with 2 significant digits or more."""
    mb = nbytes / 2**20
    return f'{mb:.1f}' if mb >= 10 else f'{mb:.2f}' if mb >= 0.1 else f'{mb:.3f}'


def describe_error(exc, limit=200):
    """Returns ``exc`` as one table cell: its type and the first line of its
    message (and the next one where the first ends with ':', as in torch's
    ``backend='inductor' raised:``), '|' made '/', at most ``limit`` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or ['']
    text = ' '.join(lines[:2]) if lines[0].endswith(':') else lines[0]
    return f'{type(exc).__name__}: {text}'.replace('|', '/')[:limit]


def not_measured(cells, error, width):
    """Returns the row of a failed measurement: ``cells``, 'not measured:
    ``error``', then empty cells up to ``width``."""
    return cells + [f'not measured: {error}'] + [''] * (width - len(cells) - 1)


def markdown_tables(markdown):
    """Returns every table in ``markdown`` as a list of rows, each a dict
    from the header's names to the cells."""
    tables, header, rows = [], None, None
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
        if not line.startswith('|'):
            header = rows = None
        elif header is None:
            header = cells
        elif rows is None:  # the line under the header, |---|---|
            rows = []
            tables.append(rows)
        else:
            rows.append(dict(zip(header, cells)))
    return tables


def find_table(markdown, columns):
    """Returns the rows of the first table in ``markdown`` with all of
    ``columns`` (``markdown_tables``); ValueError if there is none."""
    for table in markdown_tables(markdown):
        if table and set(columns) <= set(table[0]):
            return table
    raise ValueError(f'no table with the columns {", ".join(columns)}')


def load_average():
    """Returns the 1, 5 and 15 minute load averages as text ('?' where the OS has none)."""
    return ', '.join(f'{v:.1f}' for v in os.getloadavg()) if hasattr(os, 'getloadavg') else '?'


def driver_version():
    """Returns the NVIDIA driver's version from nvidia-smi, or 'unknown'."""
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return out.split('\n')[0].strip() or 'unknown'


def plot_bars(path, title, groups, panels):
    """Write to ``path`` a PNG of grouped bars: one subplot per (y label,
    {bar label: one ratio per group}) of ``panels``, a group per name in
    ``groups`` (nan: no bar), a black line at 1."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(max(8.0, 1.6 * len(groups)), 3.75 * len(panels)), layout='constrained')
    for axis, (label, bars) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        width = 0.8 / len(bars)
        for j, (name, values) in enumerate(bars.items()):
            axis.bar([i + (j - (len(bars) - 1) / 2) * width for i in range(len(groups))], values,
                     width, label=name)
        axis.axhline(1.0, color='black', linewidth=0.8)
        axis.set_xticks(range(len(groups)), groups, fontsize='small')
        axis.set_ylabel(label)
        axis.legend(fontsize='small')
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def publish(lines, out, draw=None):
    """Join ``lines`` into the markdown and print it; with ``out``, write it
    there and, given ``draw``, ``draw(markdown, png)`` the plot next to it
    (suffix .png). Returns the markdown."""
    markdown = '\n'.join(lines) + '\n'
    print(markdown)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown)
        if draw:
            draw(markdown, out.with_suffix('.png'))
    return markdown


def redraw(markdown_path, draw):
    """Draw the plot of the table at ``markdown_path`` next to it (suffix
    .png): what --plot-from does. Returns None."""
    source = Path(markdown_path)
    draw(source.read_text(), source.with_suffix('.png'))
    print(f'wrote {source.with_suffix(".png")}')
