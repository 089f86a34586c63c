"""The main job's pictures (``tools/main_job.py``): its predictions next to the
ground truth on a few validation scenes, and its training-loss curve.

:func:`load_drawn_scenes` reads the predictions ``tools/test.py --out`` dumped
and the COCO annotations of the same scenes; :func:`draw_grid` draws them into
one PNG, a row per scene: the ground truth left, the prediction right, each
scene scaled up :data:`SCALE` times, with translucent masks, boxes and one
label per instance (class name, and the score for predictions), placed inside
its panel without overlapping another label (:func:`place_labels`).
:func:`plot_loss` draws the loss records of mmengine's ``scalars.json``.

An instance set is a dict: ``bboxes`` float (N, 4) x0, y0, x1, y1 in pixel-corner
coordinates of the scene, ``labels`` int (N,) class indices, ``masks`` bool
(N, H, W), and ``scores`` float (N,) for predictions.
"""
import contextlib
import io
import os.path as osp
import pickle

import cv2
import numpy as np

__all__ = ['PANEL_TITLES', 'SCALE', 'draw_grid', 'load_drawn_scenes', 'place_labels',
           'plot_loss']

SCALE = 4  # a 128 px scene becomes a 512 px panel
PANEL_TITLES = ('ground truth', 'MABN prediction')
MASK_ALPHA = 0.45  # weight of the instance colour over the scene under a mask
MARGIN = 16  # pixels around and between the panels
TITLE_HEIGHT = 30  # the strip above each panel
HEADER_HEIGHT = 40  # the strip above the whole grid
LABEL_PAD = 3  # pixels between a label's text and the edge of its box
FONT_SIZES = dict(label=15, title=18, header=18)


def _fonts():
    """PIL fonts of the sizes in FONT_SIZES: matplotlib's DejaVu Sans, the
    same on every machine."""
    import matplotlib
    from PIL import ImageFont
    fonts = osp.join(matplotlib.get_data_path(), 'fonts', 'ttf')
    return dict(label=ImageFont.truetype(osp.join(fonts, 'DejaVuSans.ttf'), FONT_SIZES['label']),
                title=ImageFont.truetype(osp.join(fonts, 'DejaVuSans-Bold.ttf'),
                                         FONT_SIZES['title']),
                header=ImageFont.truetype(osp.join(fonts, 'DejaVuSans.ttf'),
                                          FONT_SIZES['header']))


def _class_colours(num_classes):
    """An RGB uint8 colour per class (matplotlib's tab10, repeated)."""
    from matplotlib import colormaps
    colours = colormaps['tab10'].colors
    return [tuple(int(255 * c) for c in colours[i % len(colours)]) for i in range(num_classes)]


# ------------------------------------------------------------------ reading
def _instances(bboxes, labels, masks, scores=None):
    found = dict(bboxes=np.asarray(bboxes, np.float64).reshape(-1, 4),
                 labels=np.asarray(labels, np.int64), masks=np.asarray(masks, bool))
    if scores is not None:
        found['scores'] = np.asarray(scores, np.float64)
    return found


def load_drawn_scenes(predictions_file, ann_file, root):
    """The scenes of a ``tools/test.py --out`` dump with their ground truth.

    Args:
        predictions_file (str): The ``.pkl`` MMDetection's ``DumpDetResults``
            wrote: per image ``img_id``, ``img_path``, ``ori_shape`` and
            ``pred_instances`` (``masks`` RLE-encoded).
        ann_file (str): COCO JSON of the same images; its categories sorted by
            id are the classes (as in MMDetection's ``CocoDataset``).
        root (str): Folder that relative ``img_path`` values start from.

    Returns:
        tuple: the class names, and per image a dict with ``name`` (file
        name), ``image`` (uint8 H x W grayscale), ``truth`` and ``prediction``
        (instance sets, see the module docstring).
    """
    from pycocotools import mask as rle
    from pycocotools.coco import COCO
    with contextlib.redirect_stdout(io.StringIO()):  # COCO's progress lines
        coco = COCO(ann_file)
    cat_ids = sorted(coco.getCatIds())
    classes = [coco.loadCats(i)[0]['name'] for i in cat_ids]
    with open(predictions_file, 'rb') as f:
        dumped = pickle.load(f)
    drawn = []
    for result in dumped:
        pred = result['pred_instances']
        height, width = result['ori_shape']
        masks = (rle.decode(pred['masks']).transpose(2, 0, 1) if len(pred['masks'])
                 else np.zeros((0, height, width), bool))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[result['img_id']]))
        truth = _instances([[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in anns)],
                           [cat_ids.index(a['category_id']) for a in anns],
                           np.array([coco.annToMask(a) for a in anns]).reshape(-1, height, width))
        image = cv2.imread(osp.join(root, result['img_path']), cv2.IMREAD_GRAYSCALE)
        drawn.append(dict(name=osp.basename(result['img_path']), image=image, truth=truth,
                          prediction=_instances(pred['bboxes'].numpy(), pred['labels'].numpy(),
                                                masks, pred['scores'].numpy())))
    return classes, drawn


# ------------------------------------------------------------------ drawing
def place_labels(sizes, preferred, width, height):
    """Top-left corners for labels, each inside ``width`` x ``height`` and
    clear of the labels placed before it.

    Args:
        sizes (list): (w, h) of each label, in pixels.
        preferred (list): (x, y) where each label would go, e.g. just above
            its box; may lie outside the area.
        width, height (int): The area.

    Returns:
        list: (x, y) per label: the free position nearest (|dx| + |dy|) to the
        preferred one, clamped inside the area. Only where no free position is
        left does a label overlap (at its clamped preferred position).
    """
    placed, rects = [], []
    for (w, h), (px, py) in zip(sizes, preferred):
        xs, ys = np.arange(max(width - w, 0) + 1), np.arange(max(height - h, 0) + 1)
        blocked = np.zeros((len(ys), len(xs)), bool)
        for x0, y0, x1, y1 in rects:
            blocked |= ((ys < y1) & (ys + h > y0))[:, None] & ((xs < x1) & (xs + w > x0))[None, :]
        cost = np.abs(ys - py)[:, None] + np.abs(xs - px)[None, :]
        cost = np.where(blocked, np.inf, cost)
        if np.isinf(cost).all():
            x, y = int(np.clip(px, 0, xs[-1])), int(np.clip(py, 0, ys[-1]))
        else:
            row, col = np.unravel_index(np.argmin(cost), cost.shape)
            x, y = int(xs[col]), int(ys[row])
        placed.append((x, y))
        rects.append((x, y, x + w, y + h))
    return placed


def _draw_panel(picture, draw, origin, image, instances, classes, colours, fonts, score_thr):
    """Draw one scene with its ``instances`` scoring at least ``score_thr``
    into ``picture`` (a PIL image; ``draw`` draws on it) at ``origin`` (x, y);
    return the label boxes (x0, y0, x1, y1) in pixels of ``picture``."""
    from PIL import Image
    ox, oy = origin
    height, width = image.shape[0] * SCALE, image.shape[1] * SCALE
    panel = np.repeat(np.repeat(image, SCALE, axis=0), SCALE, axis=1)
    panel = np.repeat(panel[..., None], 3, axis=2).astype(np.float64)
    scores = instances.get('scores', np.ones(len(instances['labels'])))
    keep = np.flatnonzero(scores >= score_thr)
    for i in keep:
        mask = np.repeat(np.repeat(instances['masks'][i], SCALE, axis=0), SCALE, axis=1)
        colour = np.array(colours[instances['labels'][i]], np.float64)
        panel[mask] = (1 - MASK_ALPHA) * panel[mask] + MASK_ALPHA * colour
    picture.paste(Image.fromarray(np.rint(panel).astype(np.uint8)), origin)

    texts, sizes, preferred = [], [], []
    for i in keep:
        x0, y0, x1, y1 = np.clip(instances['bboxes'][i] * SCALE, 0, [width, height] * 2)
        colour = colours[instances['labels'][i]]
        draw.rectangle([ox + x0, oy + y0, ox + max(x1 - 1, x0), oy + max(y1 - 1, y0)],
                       outline=colour, width=2)
        text = classes[instances['labels'][i]]
        if 'scores' in instances:
            text += f' {scores[i]:.2f}'
        left, _, right, _ = draw.textbbox((0, 0), text, font=fonts['label'])
        w, h = right - left + 2 * LABEL_PAD, sum(fonts['label'].getmetrics()) + 2 * LABEL_PAD
        texts.append((text, colour, left))
        sizes.append((w, h))
        preferred.append((int(x0), int(y0) - h))  # just above the box
    boxes = []
    for (text, colour, left), (w, h), (x, y) in zip(
            texts, sizes, place_labels(sizes, preferred, width, height)):
        box = (ox + x, oy + y, ox + x + w, oy + y + h)
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=colour)
        ink = (0, 0, 0) if sum(colour) > 3 * 140 else (255, 255, 255)
        draw.text((box[0] + LABEL_PAD - left, box[1] + LABEL_PAD), text, fill=ink,
                  font=fonts['label'])  # anchor 'la': the ascender line at the pad
        boxes.append(box)
    if not len(keep) and 'scores' in instances:
        draw.text((ox + width // 2, oy + height // 2), f'nothing scored {score_thr:.2f} or more',
                  fill=(255, 255, 255), font=fonts['label'], anchor='mm')
    return boxes


def draw_grid(scenes, classes, path, score_thr, title):
    """Draw ``scenes`` as one PNG at ``path``: a row per scene, its ground
    truth left and its prediction right (instances scoring below
    ``score_thr`` left out), under ``title`` and a line stating ``score_thr``.

    Args:
        scenes (list): dicts with ``name``, ``image`` (uint8 H x W),
            ``truth`` and ``prediction`` (instance sets, module docstring).
        classes (list): Class names, indexed by the instances' labels.
        path (str): The PNG to write.
        score_thr (float): Lowest score of a prediction drawn.
        title (str): The first line of the header.

    Returns:
        list: per scene, per panel (truth, prediction), a dict with ``panel``
        and ``labels``: its box and its labels' boxes, (x0, y0, x1, y1) in
        pixels of the PNG, as the renderer measured them.
    """
    from PIL import Image, ImageDraw
    fonts, colours = _fonts(), _class_colours(len(classes))
    height, width = (SCALE * n for n in scenes[0]['image'].shape)
    row_height = TITLE_HEIGHT + height + MARGIN
    size = 3 * MARGIN + 2 * width, 2 * HEADER_HEIGHT + len(scenes) * row_height
    picture = Image.new('RGB', size, (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    draw.text((MARGIN, MARGIN // 2), title, fill=(0, 0, 0), font=fonts['header'])
    draw.text((MARGIN, MARGIN // 2 + HEADER_HEIGHT),
              f'predictions scoring {score_thr:.2f} or more are drawn; labels: class and score',
              fill=(0, 0, 0), font=fonts['header'])
    layout = []
    for row, scene in enumerate(scenes):
        top = HEADER_HEIGHT * 2 + row * row_height
        panels = []
        for column, (key, panel_title) in enumerate(zip(('truth', 'prediction'), PANEL_TITLES)):
            left = MARGIN + column * (width + MARGIN)
            if key == 'truth':
                panel_title += f', scene {scene["name"]}'
            draw.text((left, top + TITLE_HEIGHT // 2), panel_title, fill=(0, 0, 0),
                      font=fonts['title'], anchor='lm')
            origin = (left, top + TITLE_HEIGHT)
            labels = _draw_panel(picture, draw, origin, scene['image'], scene[key], classes,
                                 colours, fonts, score_thr)
            panels.append(dict(panel=(*origin, origin[0] + width, origin[1] + height),
                               labels=labels))
        layout.append(panels)
    picture.save(path)
    return layout


def plot_loss(records, path, title):
    """Plot ``loss`` against ``iter`` of the training ``records`` (mmengine's
    ``scalars.json`` lines that have both) into the PNG ``path``."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r['iter'] for r in records], [r['loss'] for r in records], linewidth=1.2)
    ax.set_xlabel('iteration')
    ax.set_ylabel('training loss (all heads, as logged)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
