"""Reading back what a training run logged, and writing result tables.

mmengine's ``LocalVisBackend`` writes one JSON record per line to
``WORK_DIR/TIMESTAMP/vis_data/scalars.json``: training records carry ``iter``
and the losses, evaluation records carry the metrics (e.g.
``coco/bbox_mAP``). The study and main-job scripts in ``tools/`` read them
with :func:`read_scalars` instead of parsing logs.
"""
import datetime
import glob
import json
import os.path as osp
import re
from typing import List, Optional, Sequence

__all__ = ['last_record_with', 'logged_minutes', 'markdown_table', 'newest_log', 'read_scalars']

#: The time stamp mmengine's logger puts at the start of every line.
_LOG_TIME = re.compile(r'^(\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}) ')


def read_scalars(work_dir: str, since: float = 0.0) -> Optional[List[dict]]:
    """The records of the newest ``scalars.json`` under ``work_dir`` modified
    at or after ``since`` (a ``time.time()`` value), or None if there is none."""
    files = [f for f in glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))
             if osp.getmtime(f) >= since]
    if not files:
        return None
    with open(max(files, key=osp.getmtime)) as f:
        return [json.loads(line) for line in f if line.strip()]


def newest_log(work_dir: str, since: float = 0.0) -> str:
    """The text of the newest ``WORK_DIR/TIMESTAMP/TIMESTAMP.log`` modified at
    or after ``since`` (a ``time.time()`` value); '' if there is none."""
    logs = [f for f in glob.glob(osp.join(work_dir, '*', '*.log')) if osp.getmtime(f) >= since]
    if not logs:
        return ''
    with open(max(logs, key=osp.getmtime)) as f:
        return f.read()


def logged_minutes(work_dir: str) -> Optional[float]:
    """Wall time in minutes from the first to the last time-stamped line of
    the newest ``WORK_DIR/TIMESTAMP/TIMESTAMP.log`` (the whole run: training
    and evaluation), or None if there is no such log."""
    stamps = [m.group(1) for m in map(_LOG_TIME.match, newest_log(work_dir).splitlines()) if m]
    if len(stamps) < 2:
        return None
    first, last = (datetime.datetime.strptime(stamp, '%Y/%m/%d %H:%M:%S')
                   for stamp in (stamps[0], stamps[-1]))
    return (last - first).total_seconds() / 60


def last_record_with(records: Optional[Sequence[dict]], keys: Sequence[str]) -> Optional[dict]:
    """The last record holding every one of ``keys``, or None."""
    found = None
    for record in records or ():
        if all(key in record for key in keys):
            found = record
    return found


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; cells are converted with ``str``."""
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
    return '\n'.join(lines) + '\n'
