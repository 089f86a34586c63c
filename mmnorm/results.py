"""Reading back what a training run logged, and writing result tables.

mmengine's ``LocalVisBackend`` writes one JSON record per line to
``WORK_DIR/TIMESTAMP/vis_data/scalars.json``: training records carry ``iter``
and the losses, evaluation records carry the metrics (e.g.
``coco/bbox_mAP``). The study and main-job scripts in ``tools/`` read them
with :func:`read_scalars` instead of parsing logs.
"""
import glob
import json
import os.path as osp
from typing import List, Optional, Sequence

__all__ = ['last_record_with', 'markdown_table', 'read_scalars']


def read_scalars(work_dir: str, since: float = 0.0) -> Optional[List[dict]]:
    """The records of the newest ``scalars.json`` under ``work_dir`` modified
    at or after ``since`` (a ``time.time()`` value), or None if there is none."""
    files = [f for f in glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))
             if osp.getmtime(f) >= since]
    if not files:
        return None
    with open(max(files, key=osp.getmtime)) as f:
        return [json.loads(line) for line in f if line.strip()]


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
