"""Stop early, with a useful message, when a config's data set is not on disk.

Without this, a COCO config started on a machine without COCO fails deep in
the data loader with a bare FileNotFoundError. :func:`check_data_present`
collects every file and folder the chosen phases read (annotation files, image
folders, the evaluator's annotation file), and raises one error that lists
what is missing, where it was looked for, and how to get the data.
"""
import os.path as osp

COCO_HINT = (
    'Get COCO 2017 (train2017, val2017 and annotations_trainval2017) from '
    'https://cocodataset.org/#download and unpack it so that data/coco/annotations, '
    'data/coco/train2017 and data/coco/val2017 exist (or link it: ln -s /path/to/coco '
    'data/coco), or point the config at your copy with --cfg-options, e.g. '
    'train_dataloader.dataset.data_root=/path/to/coco/')

HINTS = {'CocoDataset': COCO_HINT}

PHASES = {'train': ('train_dataloader', 'val_dataloader', 'val_evaluator'),
          'test': ('test_dataloader', 'test_evaluator')}


class DataNotFoundError(FileNotFoundError):
    """The data a config reads is not where the config says."""


def _join(root, path):
    return path if not root or osp.isabs(path) or '://' in path else osp.join(root, path)


def _dataset_paths(dataset):
    """(dataset type, [paths]) for one dataset config, unwrapping wrappers."""
    if 'dataset' in dataset:
        return _dataset_paths(dataset['dataset'])
    if 'datasets' in dataset:
        found = [_dataset_paths(d) for d in dataset['datasets']]
        return found[0][0], [p for _, paths in found for p in paths]
    root = dataset.get('data_root') or ''
    paths = []
    if dataset.get('ann_file'):
        paths.append(_join(root, dataset['ann_file']))
    for prefix in (dataset.get('data_prefix') or {}).values():
        if prefix:
            paths.append(_join(root, prefix))
    return dataset.get('type'), paths


def _evaluator_paths(evaluator):
    evaluators = evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]
    return [e['ann_file'] for e in evaluators if isinstance(e, dict) and e.get('ann_file')]


def check_data_present(cfg, phase):
    """Raise :class:`DataNotFoundError` if a file or folder that ``phase``
    ('train' or 'test') of ``cfg`` reads is missing. Remote paths (with ://)
    are not checked."""
    kinds, looked, missing = set(), [], []
    for key in PHASES[phase]:
        part = cfg.get(key)
        if not part:
            continue
        if key.endswith('dataloader'):
            kind, paths = _dataset_paths(part['dataset'])
            kinds.add(kind)
        else:
            paths = _evaluator_paths(part)
        for path in paths:
            if '://' in path or path in looked:
                continue
            looked.append(path)
            if not osp.exists(path):
                missing.append(path)
    if missing:
        hints = [HINTS.get(kind, f'Prepare the data set of type {kind} at the paths above, '
                                 'or point the config at it with --cfg-options.')
                 for kind in sorted(kinds, key=str)]
        lines = '\n'.join(f'  {"MISSING" if p in missing else "found  "} {osp.abspath(p)}'
                          for p in looked)
        raise DataNotFoundError(f'The data set this config reads is not on disk. Looked for:\n'
                                f'{lines}\n' + '\n'.join(hints))
