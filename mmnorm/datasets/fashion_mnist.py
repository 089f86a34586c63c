"""Fashion-MNIST (Xiao et al., 2017) from its original idx ``.gz`` files.

Two layers:

* :func:`read_idx` and :func:`load_fashion_mnist` are plain numpy functions:
  ``load_fashion_mnist('train')`` returns the images
  as uint8 (N, 28, 28) and the labels as int64 (N,). Other code (e.g. the
  composition of small detection scenes) reuses them directly.
* :class:`FashionMNIST` is a map-style dataset registered in mmengine's root
  ``DATASETS``. Item ``i`` is ``dict(inputs=float32 tensor (1, 28, 28) with
  pixel values 0..255, data_samples=int label)``; mmengine's default
  ``pseudo_collate`` turns a batch into ``dict(inputs=[tensor, ...],
  data_samples=[int, ...])``, which ``ImgDataPreprocessor`` stacks and
  normalises (``default_collate`` gives stacked tensors, also accepted by
  :class:`mmnorm.studies.classifier.NormStudyClassifier`).

The files are Debian's ``dataset-fashion-mnist`` package layout:
``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` in one directory.
"""
import gzip
import os.path as osp

import numpy as np
import torch
from mmengine.registry import DATASETS

__all__ = ['CLASSES', 'DEFAULT_DATA_ROOT', 'FashionMNIST', 'load_fashion_mnist', 'read_idx']

#: Where ``apt-get install dataset-fashion-mnist`` puts the files.
DEFAULT_DATA_ROOT = '/usr/share/datasets/fashion-mnist'

#: Label i is ``CLASSES[i]``.
CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
           'Sneaker', 'Bag', 'Ankle boot')

IMAGE_SIZE = 28
#: idx magic numbers: 0x00 0x00, type 0x08 (unsigned byte), number of dims.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
#: split -> (file prefix, number of samples of the official release).
SPLITS = {'train': ('train', 60000), 'test': ('t10k', 10000)}

_INSTALL_HINT = ('install the data set with `apt-get install dataset-fashion-mnist` (as root), '
                 'or pass data_root= the directory that holds the idx .gz files')


def read_idx(path, expected_magic):
    """Read one gzip-compressed idx file of unsigned bytes into a numpy array.

    The header is the 32-bit big-endian magic number (0x0000, type code 0x08,
    number of dims) followed by one 32-bit big-endian size per dim; the
    payload must hold exactly the product of the sizes in bytes.

    Args:
        path (str): The ``.gz`` file.
        expected_magic (int): :data:`IMAGES_MAGIC` or :data:`LABELS_MAGIC`
            (or any idx magic with type code 0x08).

    Returns:
        np.ndarray: uint8 array with the header's shape.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message says how to
            install the data set).
        ValueError: the file is not gzip, has another magic number, or its
            payload does not match the header; the message names ``path``.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'Fashion-MNIST file {path} not found: {_INSTALL_HINT}')
    try:
        with gzip.open(path, 'rb') as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f'{path}: not a readable gzip file ({exc})') from exc
    if len(raw) < 4:
        raise ValueError(f'{path}: {len(raw)} bytes, too short for an idx header')
    magic = int.from_bytes(raw[:4], 'big')
    if magic != expected_magic:
        raise ValueError(f'{path}: idx magic number 0x{magic:08x}, expected '
                         f'0x{expected_magic:08x}; the file is corrupted or not this kind of file')
    ndim = magic & 0xff
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f'{path}: truncated idx header ({len(raw)} bytes, {ndim} dims)')
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    payload = len(raw) - header_len
    if payload != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f'{path}: header shape {shape} needs {int(np.prod(shape))} bytes of '
                         f'data, the file has {payload}')
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def load_fashion_mnist(split='train', data_root=DEFAULT_DATA_ROOT):
    """The images and labels of one split, checked.

    Args:
        split (str): ``'train'`` (60,000 samples) or ``'test'`` (10,000).
        data_root (str): Directory of the idx ``.gz`` files.

    Returns:
        tuple[np.ndarray, np.ndarray]: images uint8 (N, 28, 28) (0 = background,
        255 = ink) and labels int64 (N,) in ``[0, 10)``.
    """
    if split not in SPLITS:
        raise ValueError(f'Fashion-MNIST split must be one of {sorted(SPLITS)}, got {split!r}')
    prefix, count = SPLITS[split]
    images_path = osp.join(data_root, f'{prefix}-images-idx3-ubyte.gz')
    labels_path = osp.join(data_root, f'{prefix}-labels-idx1-ubyte.gz')
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape != (count, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f'{images_path}: shape {images.shape}, expected '
                         f'{(count, IMAGE_SIZE, IMAGE_SIZE)} for the {split} split')
    if labels.shape != (count, ):
        raise ValueError(f'{labels_path}: shape {labels.shape}, expected ({count},) for the '
                         f'{split} split')
    if labels.max() >= len(CLASSES):
        raise ValueError(f'{labels_path}: label {int(labels.max())} out of range '
                         f'[0, {len(CLASSES)})')
    return images, labels.astype(np.int64)


# Loading a split decompresses ~30 MB; the Runner builds a dataset per loader,
# and tests build many: keep the arrays of each (split, root) once.
_CACHE = {}


def _cached_split(split, data_root):
    key = (split, osp.abspath(data_root))
    if key not in _CACHE:
        images, labels = load_fashion_mnist(split, data_root)
        images.flags.writeable = False
        labels.flags.writeable = False
        _CACHE[key] = (images, labels)
    return _CACHE[key]


@DATASETS.register_module()
class FashionMNIST:
    """Fashion-MNIST as an mmengine dataset (root ``DATASETS``).

    Args:
        split (str): ``'train'`` or ``'test'``.
        data_root (str): Directory of the idx ``.gz`` files.
        num_samples (int, optional): Use only the first ``num_samples``
            samples of the split (both splits are in random class order, so a
            prefix is class-balanced up to sampling noise). ``None``: all.
    """

    METAINFO = dict(classes=CLASSES)

    def __init__(self, split='train', data_root=DEFAULT_DATA_ROOT, num_samples=None):
        images, labels = _cached_split(split, data_root)
        if num_samples is not None:
            if not isinstance(num_samples, int) or isinstance(num_samples, bool) \
                    or not 0 < num_samples <= len(labels):
                raise ValueError(f'FashionMNIST: num_samples must be an int in [1, {len(labels)}] '
                                 f'for the {split} split, got {num_samples!r}')
            images, labels = images[:num_samples], labels[:num_samples]
        self.split = split
        self.data_root = data_root
        self.images = images
        self.labels = labels

    @property
    def metainfo(self):
        """``dict(classes=CLASSES)``; mmengine passes it to the evaluator and
        the visualizer."""
        return dict(self.METAINFO)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = torch.from_numpy(self.images[index].astype(np.float32))
        return dict(inputs=image.unsqueeze(0), data_samples=int(self.labels[index]))

    def __repr__(self):
        return (f'{type(self).__name__}(split={self.split!r}, data_root={self.data_root!r}, '
                f'num_samples={len(self)})')
