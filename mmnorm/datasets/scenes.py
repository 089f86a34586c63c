"""Fashion-MNIST scenes: a small COCO-format instance-segmentation data set.

The embedded default of this project trains a real Mask R-CNN on this machine
(2 CPU cores, no GPU, no download). This module composes its data from the
Fashion-MNIST files (Debian's ``dataset-fashion-mnist``) and writes it as PNG
images plus COCO JSON that MMDetection's ``CocoDataset`` and ``CocoMetric``
read unchanged.

Recipe of one scene, in short: a ``canvas_size`` x ``canvas_size`` grayscale
canvas (default 128) with a dark, noisy background; 2 to 5 garments, each a
Fashion-MNIST image resized to 28 to 84 px and pasted over the earlier ones;
each annotation is the garment's VISIBLE silhouette (holes filled, occluded
parts removed), given as exact polygons with ``bbox``, ``area``, category ids
1..10 (:data:`CATEGORIES`) and its provenance (``fmnist_split``,
``fmnist_index``, ``scale``). Placements that would hide too much of an
earlier garment are rejected, so every garment drawn is annotated.

Train scenes come from Fashion-MNIST's training split, val scenes from its
test split. Scene ``i`` of a split uses ``numpy.random.default_rng([seed,
split code, i])`` (:func:`scene_rng`): the data set is deterministic for a
seed, and a smaller set is a prefix of a larger one.

Layout (``prepare('data/fmnist_scenes')``)::

    data/fmnist_scenes/train/000000.png ...            (uint8, 1 channel)
    data/fmnist_scenes/val/000000.png ...
    data/fmnist_scenes/annotations/instances_train.json
    data/fmnist_scenes/annotations/instances_val.json

:func:`prepare` skips a split whose JSON (written last, atomically) holds the
same ``info.params`` and whose images all exist.

See docs/scenes.md for the full recipe with its thresholds and for why the
sizes (``NUM_TRAIN`` = 2,000, ``NUM_VAL`` = 300, 128 px) were chosen, with
the measured costs.
"""
import json
import os
import os.path as osp
import re
import time

import cv2
import numpy as np

from .fashion_mnist import CLASSES, DEFAULT_DATA_ROOT, load_fashion_mnist

__all__ = [
    'CATEGORIES', 'DEFAULT_OUT_DIR', 'NUM_TRAIN', 'NUM_VAL', 'SPLITS', 'fill_holes',
    'garment_silhouette', 'make_scene', 'mask_to_polygons', 'prepare', 'scene_params',
    'scene_rng', 'split_is_current', 'write_split'
]

#: Bump when the recipe changes: a data set written by another version is redone.
RECIPE_VERSION = 1

DEFAULT_OUT_DIR = 'data/fmnist_scenes'
NUM_TRAIN = 2000
NUM_VAL = 300

CANVAS_SIZE = 128
MIN_OBJECTS, MAX_OBJECTS = 2, 5
MIN_SCALE, MAX_SCALE = 1.0, 3.0
#: A resized garment pixel above this (0..255) is ink.
INK_THRESHOLD = 12
MIN_VISIBLE_FRACTION = 0.4
MIN_VISIBLE_AREA = 64
MIN_FRAGMENT_AREA = 16
PLACEMENT_TRIES = 20

#: COCO categories: id i + 1 is Fashion-MNIST label i.
CATEGORIES = tuple(dict(id=i + 1, name=name) for i, name in enumerate(CLASSES))

#: Scene split -> (Fashion-MNIST split it draws from, code in the seed sequence).
SPLITS = {'train': ('train', 0), 'val': ('test', 1)}

_IMAGE_NAME = re.compile(r'^\d{6}\.png$')


# ------------------------------------------------------------------- masks
def fill_holes(mask):
    """``mask`` (bool, H x W) with every background region that is not
    4-connected to the border turned into foreground."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), np.uint8)
    padded[1:-1, 1:-1] = mask
    flood_mask = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(padded, flood_mask, (0, 0), 2)  # 4-connected
    return padded[1:-1, 1:-1] != 2


def _remove_specks(mask, min_area):
    """``mask`` without its 8-connected components smaller than ``min_area``."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8),
                                                               connectivity=8)
    keep = np.zeros(count, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    return keep[labels]


def _smallest_component(mask):
    """Area of the smallest 8-connected component of ``mask`` (0 if empty)."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return int(stats[1:, cv2.CC_STAT_AREA].min()) if count > 1 else 0


def garment_silhouette(garment, threshold=INK_THRESHOLD, min_area=MIN_FRAGMENT_AREA):
    """The solid shape of a (resized) garment image: ink above ``threshold``,
    holes filled, specks below ``min_area`` pixels removed. bool, same shape."""
    return _remove_specks(fill_holes(garment > threshold), min_area)


def mask_to_polygons(mask):
    """COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` of a bool mask.

    ``cv2.findContours`` traces pixel centres; a polygon through the centres
    of the boundary pixels loses half a pixel all around under pycocotools'
    rasterisation (which takes coordinates as pixel corners), i.e. whole
    1-2 px wide parts of a garment. So the contours are traced on the mask
    upsampled 2x (nearest) and mapped back with (u + 0.5) / 2: the polygons
    then run a quarter pixel inside the pixel edges and rasterise back to
    exactly the mask (checked in tests/datasets/test_scenes.py). Holes are not
    represented (:func:`make_scene` never produces them); degenerate contours
    (fewer than 3 points or no area) are skipped.
    """
    if not mask.any():
        return []
    x0, y0, w, h = _bbox(mask)  # trace only the mask's box (1 px margin)
    crop = np.zeros((h + 2, w + 2), np.uint8)
    crop[1:-1, 1:-1] = mask[y0:y0 + h, x0:x0 + w]
    up = crop.repeat(2, axis=0).repeat(2, axis=1)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        if len(contour) < 3 or cv2.contourArea(contour) <= 0:
            continue
        points = (contour.reshape(-1, 2).astype(np.float64) + 0.5) / 2 + (x0 - 1, y0 - 1)
        polygons.append([float(v) for v in points.reshape(-1)])
    return polygons


def _bbox(mask):
    """[x, y, w, h] of the pixels of a non-empty mask (pixel-corner coordinates)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    x0, y0 = int(cols[0]), int(rows[0])
    return [x0, y0, int(cols[-1]) - x0 + 1, int(rows[-1]) - y0 + 1]


# ------------------------------------------------------------------ scenes
def scene_rng(seed, split, index):
    """The generator of scene ``index`` of ``split`` ('train' or 'val')."""
    return np.random.default_rng([int(seed), SPLITS[split][1], int(index)])


def _background(rng, size):
    level = rng.uniform(10, 50)
    amplitude = rng.uniform(0, 15)
    angle = rng.uniform(0, 2 * np.pi)
    coords = (np.arange(size) - (size - 1) / 2) / (size / 2)  # -1 .. 1
    ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
    return level + amplitude * ramp


def _placement_ok(instances, new_sil):
    """Whether every earlier garment stays sensibly visible under ``new_sil``."""
    for inst in instances:
        visible = inst['mask'] & ~new_sil
        area = int(visible.sum())
        if area < MIN_VISIBLE_AREA or area < MIN_VISIBLE_FRACTION * inst['full_area']:
            return False
        if area != int(inst['mask'].sum()):  # changed: check its shape again
            if _smallest_component(visible) < MIN_FRAGMENT_AREA:
                return False
            if fill_holes(visible).sum() != area:
                return False
    return True


def make_scene(rng, images, labels, canvas_size=CANVAS_SIZE, min_objects=MIN_OBJECTS,
               max_objects=MAX_OBJECTS, min_scale=MIN_SCALE, max_scale=MAX_SCALE):
    """Compose one scene (the recipe: the module docstring and docs/scenes.md).

    Args:
        rng (np.random.Generator): The scene's generator (:func:`scene_rng`).
        images (np.ndarray): uint8 (N, 28, 28) garments, ink bright.
        labels (np.ndarray): int (N,) Fashion-MNIST labels in [0, 10).
        canvas_size (int): Side of the square canvas in pixels.
        min_objects, max_objects (int): Garments attempted, uniform in between.
        min_scale, max_scale (float): Resize factor range of the 28 px images.

    Returns:
        tuple: ``image`` uint8 (canvas_size, canvas_size), and the list of the
        garments kept, bottom to top, each a dict with ``label`` (0..9),
        ``index`` (into ``images``), ``scale``, ``x``, ``y``, ``size`` (the
        pasted frame), ``silhouette`` (bool canvas mask of the whole garment),
        ``mask`` (bool canvas mask of its visible part), ``full_area`` and
        ``visible_fraction``; plus the number of garments dropped, as
        ``(image, instances, dropped)``.
    """
    src = images.shape[1]
    if canvas_size < src:
        raise ValueError(f'canvas_size must be at least the garment size {src}, got {canvas_size}')
    max_scale = min(max_scale, canvas_size / src)
    canvas = _background(rng, canvas_size)
    instances, dropped = [], 0
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        index = int(rng.integers(len(images)))
        scale = float(rng.uniform(min_scale, max_scale))
        size = int(round(src * scale))
        garment = images[index]
        if size != src:
            garment = cv2.resize(garment, (size, size), interpolation=cv2.INTER_LINEAR)
        garment = garment.astype(np.float64) * rng.uniform(0.6, 1.0)
        sil = garment_silhouette(garment)
        full_area = int(sil.sum())
        placed = None
        if full_area >= MIN_VISIBLE_AREA:
            for _ in range(PLACEMENT_TRIES):
                x = int(rng.integers(canvas_size - size + 1))
                y = int(rng.integers(canvas_size - size + 1))
                new_sil = np.zeros((canvas_size, canvas_size), bool)
                new_sil[y:y + size, x:x + size] = sil
                if _placement_ok(instances, new_sil):
                    placed = x, y, new_sil
                    break
        if placed is None:
            dropped += 1
            continue
        x, y, new_sil = placed
        for inst in instances:
            inst['mask'] = inst['mask'] & ~new_sil
        window = canvas[y:y + size, x:x + size]
        window[sil] = garment[sil]
        instances.append(dict(label=int(labels[index]), index=index, scale=scale, x=x, y=y,
                              size=size, silhouette=new_sil, mask=new_sil.copy(),
                              full_area=full_area))
    canvas += rng.normal(0, rng.uniform(2, 6), canvas.shape)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    for inst in instances:
        inst['visible_fraction'] = float(inst['mask'].sum()) / inst['full_area']
    return image, instances, dropped


# ------------------------------------------------------------------ writing
def scene_params(split, num_images, seed, data_root=DEFAULT_DATA_ROOT, canvas_size=CANVAS_SIZE):
    """Everything that determines the content of one split; stored in the
    JSON's ``info.params`` and compared by :func:`split_is_current`."""
    if split not in SPLITS:
        raise ValueError(f'scene split must be one of {sorted(SPLITS)}, got {split!r}')
    return dict(recipe_version=RECIPE_VERSION, split=split, fmnist_split=SPLITS[split][0],
                data_root=osp.abspath(data_root), num_images=int(num_images), seed=int(seed),
                canvas_size=int(canvas_size), objects=[MIN_OBJECTS, MAX_OBJECTS],
                scale=[MIN_SCALE, MAX_SCALE], ink_threshold=INK_THRESHOLD,
                min_visible_fraction=MIN_VISIBLE_FRACTION, min_visible_area=MIN_VISIBLE_AREA,
                min_fragment_area=MIN_FRAGMENT_AREA, placement_tries=PLACEMENT_TRIES)


def _paths(out_dir, split):
    return (osp.join(out_dir, 'annotations', f'instances_{split}.json'), osp.join(out_dir, split))


def split_is_current(out_dir, params):
    """True if ``out_dir`` holds the split written with exactly ``params``
    (its JSON's ``info.params``) and all of its images."""
    ann_file, image_dir = _paths(out_dir, params['split'])
    try:
        with open(ann_file) as f:
            coco = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(coco, dict) or coco.get('info', {}).get('params') != params:
        return False
    return all(osp.isfile(osp.join(image_dir, img['file_name'])) for img in coco['images'])


def write_split(out_dir, split, num_images, seed, images, labels, data_root=DEFAULT_DATA_ROOT,
                canvas_size=CANVAS_SIZE):
    """Compose and write ``num_images`` scenes of ``split`` from ``images`` /
    ``labels`` (which must be the Fashion-MNIST split ``SPLITS[split][0]``
    read from ``data_root``; ``data_root`` is only recorded).

    Writes ``out_dir/split/NNNNNN.png`` (image id = NNNNNN + 1), removes older
    numbered PNGs left in that directory, and then, atomically,
    ``out_dir/annotations/instances_<split>.json``.

    Returns:
        dict: ``split``, ``ann_file``, ``image_dir``, ``num_images``,
        ``num_annotations``, ``num_dropped`` (garments not placed),
        ``seconds``, ``written=True``.
    """
    start = time.time()
    params = scene_params(split, num_images, seed, data_root, canvas_size)
    ann_file, image_dir = _paths(out_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(osp.dirname(ann_file), exist_ok=True)
    if osp.exists(ann_file):  # an interrupted rewrite must not look complete
        os.remove(ann_file)
    coco_images, annotations, dropped_total = [], [], 0
    for i in range(num_images):
        image, instances, dropped = make_scene(scene_rng(seed, split, i), images, labels,
                                               canvas_size=canvas_size)
        dropped_total += dropped
        file_name = f'{i:06d}.png'
        if not cv2.imwrite(osp.join(image_dir, file_name), image):
            raise OSError(f'could not write {osp.join(image_dir, file_name)}')
        image_id = i + 1
        coco_images.append(dict(id=image_id, file_name=file_name, width=canvas_size,
                                height=canvas_size, fmnist_split=params['fmnist_split']))
        for inst in instances:
            polygons = mask_to_polygons(inst['mask'])
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image_id, category_id=inst['label'] + 1,
                segmentation=polygons, area=float(inst['mask'].sum()), bbox=_bbox(inst['mask']),
                iscrowd=0, fmnist_split=params['fmnist_split'], fmnist_index=inst['index'],
                scale=round(inst['scale'], 4)))
    keep = {img['file_name'] for img in coco_images}
    for name in os.listdir(image_dir):
        if _IMAGE_NAME.match(name) and name not in keep:
            os.remove(osp.join(image_dir, name))
    info = dict(description='Fashion-MNIST scenes (mmnorm.datasets.scenes): garments composed on '
                f'{canvas_size}x{canvas_size} canvases, visible-silhouette masks',
                version=str(RECIPE_VERSION), params=params,
                stats=dict(num_images=num_images, num_annotations=len(annotations),
                           num_dropped=dropped_total))
    coco = dict(info=info, images=coco_images, annotations=annotations,
                categories=[dict(c, supercategory='garment') for c in CATEGORIES])
    tmp = f'{ann_file}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        f.write(json.dumps(coco, separators=(',', ':')))  # the C encoder: 5x json.dump
    os.replace(tmp, ann_file)
    return dict(split=split, ann_file=ann_file, image_dir=image_dir, num_images=num_images,
                num_annotations=len(annotations), num_dropped=dropped_total,
                seconds=time.time() - start, written=True)


def prepare(out_dir=DEFAULT_OUT_DIR, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0,
            data_root=DEFAULT_DATA_ROOT, canvas_size=CANVAS_SIZE, loader=load_fashion_mnist):
    """Write the train and val scenes under ``out_dir`` unless already there.

    Args:
        out_dir (str): Root of the data set (the configs' ``data_root``).
        num_train, num_val (int): Scenes per split (>= 1).
        seed (int): Seed of the whole data set.
        data_root (str): Directory of the Fashion-MNIST idx files.
        canvas_size (int): Side of the square images.
        loader (callable): ``loader(fmnist_split, data_root) -> (images,
            labels)``; :func:`mmnorm.datasets.fashion_mnist.load_fashion_mnist` by default.

    Returns:
        dict: ``'train'`` and ``'val'`` -> the :func:`write_split` record, or,
        for a split that was already current, the same keys with
        ``written=False`` (counts read back from its JSON).
    """
    for name, n in (('num_train', num_train), ('num_val', num_val)):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f'{name} must be a positive int, got {n!r}')
    results = {}
    for split, num in (('train', num_train), ('val', num_val)):
        params = scene_params(split, num, seed, data_root, canvas_size)
        ann_file, image_dir = _paths(out_dir, split)
        if split_is_current(out_dir, params):
            with open(ann_file) as f:
                stats = json.load(f)['info']['stats']
            results[split] = dict(split=split, ann_file=ann_file, image_dir=image_dir,
                                  num_images=stats['num_images'],
                                  num_annotations=stats['num_annotations'],
                                  num_dropped=stats['num_dropped'], seconds=0.0, written=False)
            continue
        images, labels = loader(params['fmnist_split'], data_root)
        results[split] = write_split(out_dir, split, num, seed, images, labels,
                                     data_root=data_root, canvas_size=canvas_size)
    return results
