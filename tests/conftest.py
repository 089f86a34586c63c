"""Shared pytest fixtures and helpers, and the markers of docs/testing.md."""
import importlib.util
import json
import os
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


def _share_the_cores():
    """Under pytest-xdist, give each worker its share of the cores before torch
    is imported: N workers with N threads each (and the tools they start, which
    inherit the variable) would oversubscribe the machine."""
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        os.environ.setdefault('OMP_NUM_THREADS', str(max(1, (cores or 1) // workers)))


_share_the_cores()

import numpy as np  # noqa: E402  (after the thread count is set)
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_CLASSES = ('rectangle', 'ellipse')
TOOL_TIMEOUT = 600


def _cpu_refusal(operation):
    """The first line of torch's error for ``operation()``, or None if it runs."""
    import torch
    try:
        operation()
    except RuntimeError as error:
        return f'torch {torch.__version__} on the CPU: {str(error).splitlines()[0]}'
    return None


def _float16_autocast():
    import torch
    with torch.autocast('cpu', dtype=torch.float16):
        pass


def _float16_conv():
    import torch
    torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3).half(), torch.ones(1, 1, 1, 1).half())


#: Why float16 autocast / a float16 conv cannot run on this torch's CPU (torch
#: 2.1 supports bfloat16 only there), or None where they can.
NO_CPU_FLOAT16_AUTOCAST = _cpu_refusal(_float16_autocast)
NO_CPU_FLOAT16_CONV = _cpu_refusal(_float16_conv)


def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: needs an NVIDIA GPU (tests/cuda; '
                            'MMNORM_CUDA_TESTS_ON_CPU=1 runs their code on the CPU)')
    config.addinivalue_line('markers', 'end_to_end: runs a tool, a training or several '
                            'processes; the torch 2.1 stack deselects these (docs/testing.md)')
    config.addinivalue_line('markers', 'every_stack: an end_to_end test that runs on every '
                            'stack all the same (docs/testing.md)')


def pytest_collection_finish(session):
    """Under ``--dist loadgroup`` every test marked ``xdist_group`` must carry
    its group in its node id: that is how pytest-xdist keeps a group on one
    worker (a pytest that forbids it would run shared trainings twice, and
    README blocks that build on each other apart)."""
    if 'PYTEST_XDIST_WORKER' not in os.environ or session.config.getoption('dist') != 'loadgroup':
        return
    lost = [item.nodeid for item in session.items
            if item.get_closest_marker('xdist_group') and '@' not in item.nodeid]
    if lost:
        raise pytest.UsageError(f'pytest-xdist could not group {len(lost)} tests (first: '
                                f'{lost[0]}): use the pytest of requirements/tests.txt')


def tool_env(**extra):
    """The environment the tools run in: without the weights-only override, so
    the tools' own trusted-loading fix (mmnorm.engine.trusted_checkpoints) is what is tested."""
    env = dict(os.environ)
    env.pop('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', None)
    env.pop('TORCH_FORCE_WEIGHTS_ONLY_LOAD', None)
    env['PYTHONUNBUFFERED'] = '1'
    env.update(extra)
    return env


def write_exe(path, text):
    """Write ``text`` to ``path`` and make it executable (a stand-in command)."""
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def exit_without_teardown():
    """End a worker process of ``torch.multiprocessing.spawn`` once every rank
    is done, skipping destructors: torch 2.13's gloo process group, freed with
    DDP's reducer, can deadlock at exit (its destructor joins the gloo thread
    while holding the GIL that thread waits for; a CI run hung on it once)."""
    import torch.distributed as dist
    dist.barrier()
    os._exit(0)


def free_port():
    """A TCP port on 127.0.0.1 that is free now (for a torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def load_tool(name):
    """The script ``tools/NAME.py`` imported as a module, with tools/ on
    sys.path as when it runs as a script (one tool may import another)."""
    tools = str(REPO / 'tools')
    if tools not in sys.path:
        sys.path.insert(0, tools)
    spec = importlib.util.spec_from_file_location(name, REPO / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keep_threads():
    """Restore torch's intra-op thread count after a test that sets it."""
    import torch
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on a 2-core machine shared with other
    processes, PyTorch's OpenMP threads spin-wait for each other and small
    models ran 3-8x slower on two threads than on one."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(cmd, env=None, check=True, cwd=REPO):
    """Run ``cmd`` (output captured, stderr into stdout); with ``check``, fail
    the test with the output's tail unless it exits 0."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or tool_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=TOOL_TIMEOUT)
    if check:
        assert proc.returncode == 0, f'{cmd} exited {proc.returncode}:\n{proc.stdout[-6000:]}'
    return proc


@dataclass
class TinyCoco:
    """A tiny COCO-format instance-segmentation data set on disk."""
    root: Path
    train_ann: Path
    val_ann: Path
    classes: tuple = TINY_CLASSES

    def cfg_options(self):
        """``--cfg-options`` pointing tests/configs/tiny_*.py at this data."""
        root = f'{self.root}/'
        return [
            f'data_root={root}',
            f'train_dataloader.dataset.data_root={root}',
            f'val_dataloader.dataset.data_root={root}',
            f'test_dataloader.dataset.data_root={root}',
            f'val_evaluator.ann_file={self.val_ann}',
            f'test_evaluator.ann_file={self.val_ann}',
        ]


def _shape_polygon(rng, kind, size):
    """A polygon (N x 2 int32 array) of a rectangle or an ellipse."""
    import cv2
    w, h = rng.integers(12, 28, size=2)
    x0 = int(rng.integers(1, size - w - 1))
    y0 = int(rng.integers(1, size - h - 1))
    if kind == 'rectangle':
        return np.array([[x0, y0], [x0 + w, y0], [x0 + w, y0 + h],
                         [x0, y0 + h]], dtype=np.int32)
    center = (int(x0 + w // 2), int(y0 + h // 2))
    return cv2.ellipse2Poly(center, (int(w // 2), int(h // 2)), 0, 0, 360,
                            15).astype(np.int32)


def write_tiny_coco(root, num_train=4, num_val=2, size=64, seed=0, classes=TINY_CLASSES,
                    coco_layout=False):
    """Write ``num_train`` + ``num_val`` PNGs with 2-3 filled shapes each on
    noise, and COCO instance annotations (bbox, area, iscrowd=0, polygon
    segmentation) to ``root/annotations/{train,val}.json`` (images under
    ``root/images``). ``classes`` names the categories; the two shape kinds
    are the first two.
    With ``coco_layout`` the files are where COCO 2017 keeps them
    (``annotations/instances_{train,val}2017.json``, ``{train,val}2017/``), so
    a COCO config needs only its data root changed."""
    import cv2
    root = Path(root)
    image_dir = {split: root / (f'{split}2017' if coco_layout else 'images')
                 for split in ('train', 'val')}
    ann_file = {split: root / 'annotations' / (f'instances_{split}2017.json' if coco_layout
                                               else f'{split}.json') for split in ('train', 'val')}
    for path in list(image_dir.values()) + [root / 'annotations']:
        path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = {'rectangle': (40, 200, 40), 'ellipse': (200, 60, 220)}
    categories = [dict(id=i + 1, name=n) for i, n in enumerate(classes)]
    ann_id = 1
    for split, count, first_id in (('train', num_train, 1),
                                   ('val', num_val, num_train + 1)):
        images, annotations = [], []
        for img_id in range(first_id, first_id + count):
            img = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
            name = f'{split}_{img_id:03d}.png'
            kinds = [TINY_CLASSES[img_id % 2], TINY_CLASSES[(img_id + 1) % 2]]
            kinds += [TINY_CLASSES[int(rng.integers(0, 2))]] * int(
                rng.integers(0, 2))
            for kind in kinds:
                poly = _shape_polygon(rng, kind, size)
                mask = np.zeros((size, size), dtype=np.uint8)
                cv2.fillPoly(mask, [poly], 1)
                cv2.fillPoly(img, [poly], colors[kind])
                x, y = poly.min(axis=0)
                x1, y1 = poly.max(axis=0)
                annotations.append(dict(
                    id=ann_id, image_id=img_id,
                    category_id=TINY_CLASSES.index(kind) + 1,
                    bbox=[int(x), int(y), int(x1 - x), int(y1 - y)],
                    area=float(mask.sum()), iscrowd=0,
                    segmentation=[poly.reshape(-1).astype(float).tolist()]))
                ann_id += 1
            assert cv2.imwrite(str(image_dir[split] / name), img)
            images.append(dict(id=img_id, file_name=name, width=size,
                               height=size))
        with open(ann_file[split], 'w') as f:
            json.dump(dict(images=images, annotations=annotations,
                           categories=categories), f)
    return TinyCoco(root=root, train_ann=ann_file['train'], val_ann=ann_file['val'],
                    classes=tuple(classes))


@pytest.fixture
def tiny_coco(tmp_path):
    """A fresh tiny COCO data set in this test's tmp_path."""
    return write_tiny_coco(tmp_path / 'tiny_coco')


@pytest.fixture(scope='session')
def tiny_coco_session(tmp_path_factory):
    """The tiny COCO data set, written once and shared by a session."""
    return write_tiny_coco(tmp_path_factory.mktemp('data') / 'tiny_coco')


@pytest.fixture(scope='session')
def default_scenes():
    """The main job's scenes (``data/fmnist_scenes`` in the repository),
    prepared once under a file lock: the tests that run the main job or the
    README's commands may start on two pytest-xdist workers at once, and each
    of those writes the scenes when they are missing."""
    import fcntl

    from mmnorm.datasets import scenes
    out_dir = REPO / scenes.DEFAULT_OUT_DIR
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / '.fmnist_scenes.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        scenes.prepare(str(out_dir))
    return out_dir
