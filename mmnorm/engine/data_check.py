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
    'data/coco), or point the config at your copy for training, validation and testing '
    'alike with\n  --cfg-options {options}')
SCENES_HINT = ('Write the Fashion-MNIST scenes first: python tools/prepare_scenes.py '
               '(or point the config at a copy with\n  --cfg-options {options})')
NEW_ROOT = '/path/to/coco/'

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


def moving_options(cfg, new_root):
    """The ``--cfg-options`` that move every data set of ``cfg`` (the train,
    val and test loaders, through dataset wrappers) and the evaluators'
    annotation files from their ``data_root`` to ``new_root``: a config's
    ``data_root`` variable is used when the file is parsed, so each derived
    key needs its own override."""
    options, roots = [], []
    for split in ('train', 'val', 'test'):
        key, dataset = f'{split}_dataloader.dataset', (cfg.get(f'{split}_dataloader') or {})
        dataset = dataset.get('dataset') or {}
        while 'dataset' in dataset:
            key, dataset = key + '.dataset', dataset['dataset']
        if dataset.get('data_root'):
            roots.append(dataset['data_root'])
            options.append(f'{key}.data_root={new_root}')
    for split in ('val', 'test'):
        evaluator = cfg.get(f'{split}_evaluator')
        ann_file = evaluator.get('ann_file') if isinstance(evaluator, dict) else None
        old = next((root for root in roots if ann_file and ann_file.startswith(root)), None)
        if old is not None:
            options.append(f'{split}_evaluator.ann_file={new_root}{ann_file[len(old):]}')
    return options


def _hint(cfg, kind, missing):
    options = ' '.join(moving_options(cfg, NEW_ROOT))
    if any(scenes_dir() in osp.abspath(path) for path in missing):
        return SCENES_HINT.format(options=options.replace(NEW_ROOT, '/path/to/scenes/'))
    if kind == 'CocoDataset':
        return COCO_HINT.format(options=options)
    return (f'Prepare the data set of type {kind} at the paths above, or point the config at it '
            f'with --cfg-options {options}')


def scenes_dir():
    from ..datasets.scenes import DEFAULT_OUT_DIR
    return osp.normpath(DEFAULT_OUT_DIR)


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
        hints = [_hint(cfg, kind, missing) for kind in sorted(kinds, key=str)]
        lines = '\n'.join(f'  {"MISSING" if p in missing else "found  "} {osp.abspath(p)}'
                          for p in looked)
        raise DataNotFoundError(f'The data set this config reads is not on disk. Looked for:\n'
                                f'{lines}\n' + '\n'.join(hints))
