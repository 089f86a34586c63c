"""Faults: a SIGKILLed run resumes exactly; damaged checkpoints are
refused with a clear message; checkpoints are written atomically.

The end-to-end tests run tools/train.py and tools/test.py in subprocesses on
the demo configs (configs/demo/mask_rcnn_r18_{mabn,cbn,brn}.py), shrunk with
--cfg-options (:func:`demo_options`): a tiny COCO set with the scenes' 10
class names, 64 px images, ResNet-18 with 16 base channels, no validation,
12 iterations with a checkpoint every 4, and each layer's schedule shortened so
that its warm-up / window / burn-in is crossed within the run. Deterministic
CPU settings: one thread (OMP_NUM_THREADS=1), num_workers=0, seed 0,
randomness.deterministic=True.
"""
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from mmnorm.datasets.scenes import CLASSES
from mmnorm.engine import checkpoint_check

from conftest import REPO, TOOL_TIMEOUT, run, tool_env, write_tiny_coco

DEMO = REPO / 'configs' / 'demo'
MAX_ITERS = 12
CHECKPOINT_INTERVAL = 4

#: Each method's layer schedule, shortened so that a 12-iteration run crosses
#: it: MABN's SMA window (2 steps) is full from step 3, its warm-up ends at
#: step 2 and renormalisation starts after step 4; CBN averages its window
#: after a burn-in of 3 steps; BRN's bounds open after step 2 and reach rmax
#: and dmax at step 6. GN + WS has no schedule.
SCHEDULES = {
    'mabn': dict(buffer_size=2, warmup_iters=2, renorm_start_iter=4),
    'cbn': dict(burnin=3),
    'brn': dict(warmup_iters=2, rmax_iters=6, dmax_iters=6),
    'gnws': {},
}
#: Where the demo configs put their norm_cfg.
NORM_OWNERS = ('model.backbone', 'model.neck', 'model.roi_head.bbox_head',
               'model.roi_head.mask_head')


def demo_options(data, method, max_iters=MAX_ITERS, checkpoint_interval=CHECKPOINT_INTERVAL):
    """--cfg-options that shrink configs/demo/mask_rcnn_r18_METHOD.py to a
    seconds-long deterministic CPU run on the tiny data set ``data``."""
    root = f'{data.root}/'
    options = [
        f'data_root={root}',
        f'train_dataloader.dataset.data_root={root}',
        'train_dataloader.dataset.ann_file=annotations/train.json',
        'train_dataloader.dataset.data_prefix.img=images/',
        'train_dataloader.num_workers=0',
        # pipeline[2] is the Resize of configs/demo/_base_.py (128 px there)
        'train_dataloader.dataset.pipeline.2.scale=(64,64)',
        f'test_dataloader.dataset.data_root={root}',
        'test_dataloader.dataset.ann_file=annotations/val.json',
        'test_dataloader.dataset.data_prefix.img=images/',
        'test_dataloader.num_workers=0',
        f'test_evaluator.ann_file={data.val_ann}',
        'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None',
        'randomness.deterministic=True',
        f'train_cfg.max_iters={max_iters}', f'train_cfg.val_interval={max_iters}',
        f'default_hooks.checkpoint.interval={checkpoint_interval}',
        'default_hooks.checkpoint.max_keep_ckpts=-1',
        'default_hooks.logger.interval=1', 'log_processor.window_size=1',
        'model.backbone.base_channels=16', 'model.neck.in_channels=[16,32,64,128]',
    ]
    for owner in NORM_OWNERS:
        options += [f'{owner}.norm_cfg.{key}={value}'
                    for key, value in SCHEDULES[method].items()]
    return options


def demo_env():
    return tool_env(OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE')


def train_command(method, work_dir, data, *args, config=None, **options):
    config = config or DEMO / f'mask_rcnn_r18_{method}.py'
    return [sys.executable, REPO / 'tools' / 'train.py', config, '--work-dir', work_dir, *args,
            '--cfg-options', *demo_options(data, method, **options)]


def train_demo(method, work_dir, data, *args, check=True, config=None, **options):
    return run(train_command(method, work_dir, data, *args, config=config, **options),
               env=demo_env(), check=check)


def load_ckpt(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def truncate(src, dst, keep=0.7):
    """Copy ``src`` to ``dst`` without its last 1 - ``keep`` of bytes."""
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * keep)])


def differences(expected, actual):
    """{key: max |difference| (or a note)} over two dicts of tensors."""
    found = {}
    for key in sorted(set(expected) | set(actual)):
        if key not in expected or key not in actual:
            found[key] = 'missing on one side'
        elif expected[key].dtype != actual[key].dtype or expected[key].shape != actual[key].shape:
            found[key] = f'{expected[key].dtype} {tuple(expected[key].shape)} vs ' \
                         f'{actual[key].dtype} {tuple(actual[key].shape)}'
        elif not torch.equal(expected[key], actual[key]):
            found[key] = (expected[key].double() - actual[key].double()).abs().max().item()
    return found


def momentum_buffers(ckpt):
    state = ckpt['optimizer']['state']
    return {str(i): s['momentum_buffer'] for i, s in state.items()}


@pytest.fixture(scope='module')
def scene_data(tmp_path_factory):
    """6 train and 2 val 64 px images; the shapes are labelled with the first
    two of the demo's 10 class names."""
    return write_tiny_coco(tmp_path_factory.mktemp('data') / 'tiny_scenes', num_train=6,
                           num_val=2, classes=CLASSES)


@pytest.fixture(scope='module')
def uninterrupted(scene_data, tmp_path_factory):
    """uninterrupted(method) -> the work dir of an uninterrupted 12-iteration
    run (iter_4/8/12.pth), trained on first use."""
    runs = {}

    def get(method, config=None):
        if (method, config) not in runs:
            work_dir = tmp_path_factory.mktemp(f'{method}_uninterrupted')
            train_demo(method, work_dir, scene_data, config=config)
            runs[method, config] = work_dir
        return runs[method, config]

    return get


def start_and_kill_after_checkpoint(method, work_dir, data, log_path, config=None):
    """Start a run and SIGKILL it mid-run: once the checkpoint of iteration 8
    is recorded in last_checkpoint and iteration 9 has been logged (so the
    process is inside iteration 10, before the end at 12)."""
    with open(log_path, 'w') as log:
        proc = subprocess.Popen([str(c) for c in train_command(method, work_dir, data,
                                                               config=config)],
                                cwd=REPO, env=demo_env(), stdout=log, stderr=subprocess.STDOUT)
    pointer = work_dir / 'last_checkpoint'
    deadline = time.monotonic() + TOOL_TIMEOUT
    try:
        while True:
            recorded = pointer.is_file() and pointer.read_text().strip().endswith('iter_8.pth')
            if recorded and f'Iter(train) [ 9/{MAX_ITERS}]' in log_path.read_text():
                break
            assert proc.poll() is None, (f'the run ended before it could be killed:\n'
                                         f'{log_path.read_text()[-4000:]}')
            assert time.monotonic() < deadline, 'timed out waiting for iteration 9'
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode


#: The tests that share a method's uninterrupted run stay on one test worker.
ON_ONE_WORKER = {method: pytest.mark.xdist_group(f'demo_runs_{method}')
                 for method in ('mabn', 'cbn', 'brn')}


@pytest.mark.parametrize('method', [pytest.param(method, marks=ON_ONE_WORKER[method])
                                    for method in ('mabn', 'cbn', 'brn')])
@pytest.mark.end_to_end
def test_killed_run_resumes_exactly(method, scene_data, uninterrupted, tmp_path):
    """SIGKILL after the checkpoint of iteration 8, then --resume: the final
    state dict (weights and every norm buffer) and the optimizer's momentum
    equal an uninterrupted run's bit for bit."""
    work_dir = tmp_path / 'killed'
    returncode = start_and_kill_after_checkpoint(method, work_dir, scene_data,
                                                 tmp_path / 'killed.log')
    assert returncode == -signal.SIGKILL
    assert not (work_dir / f'iter_{MAX_ITERS}.pth').exists()
    assert not list(work_dir.glob('*.partial'))

    out = train_demo(method, work_dir, scene_data, '--resume').stdout
    assert 'resumed epoch: 0, iter: 8' in out
    assert 'random state of the checkpoint restored after the replay of 8 batches' in out
    assert f'Iter(train) [ 9/{MAX_ITERS}]' in out and f'Iter(train) [ 8/{MAX_ITERS}]' not in out

    expected = load_ckpt(uninterrupted(method) / f'iter_{MAX_ITERS}.pth')
    resumed = load_ckpt(work_dir / f'iter_{MAX_ITERS}.pth')
    assert differences(expected['state_dict'], resumed['state_dict']) == {}
    assert differences(momentum_buffers(expected), momentum_buffers(resumed)) == {}
    # The comparison covers the layers' state, past their schedules.
    state = resumed['state_dict']
    assert state['backbone.layer1.0.bn1.num_batches_tracked'].item() == MAX_ITERS
    layer_buffers = {'mabn': ('buffer_x2', 'buffer_gz', 'running_var'),
                     'cbn': ('running_mean', 'running_var', 'history_pushes'),
                     'brn': ('running_mean', 'running_var')}[method]
    for name in layer_buffers:
        assert f'neck.lateral_convs.0.bn.{name}' in state
    if method == 'mabn':
        assert state['backbone.bn1.buffer_x2'].shape == (2, 16)


@pytest.mark.end_to_end
@ON_ONE_WORKER['mabn']
def test_killed_run_with_precise_bn_hook_resumes_exactly(scene_data, uninterrupted, tmp_path):
    """PreciseBNHook recomputes the statistics at the last iteration from its
    own batches and restores the random states: a killed and resumed run still
    ends as an uninterrupted one, bit for bit, and the statistics changed."""
    config = tmp_path / 'mabn_precise.py'
    config.write_text(f"_base_ = '{DEMO / 'mask_rcnn_r18_mabn.py'}'\n"
                      "custom_hooks = [dict(type='PreciseBNHook', num_iters=2)]\n")
    work_dir = tmp_path / 'killed'
    start_and_kill_after_checkpoint('mabn', work_dir, scene_data, tmp_path / 'killed.log',
                                    config=config)
    out = train_demo('mabn', work_dir, scene_data, '--resume', config=config).stdout
    assert re.search(r'PreciseBNHook \(after iteration 12\): statistics of \d+ layers '
                     r'recomputed from 2 batches of 2 per process', out), out[-3000:]
    expected = load_ckpt(uninterrupted('mabn', config) / f'iter_{MAX_ITERS}.pth')
    resumed = load_ckpt(work_dir / f'iter_{MAX_ITERS}.pth')
    assert differences(expected['state_dict'], resumed['state_dict']) == {}
    plain = load_ckpt(uninterrupted('mabn') / f'iter_{MAX_ITERS}.pth')['state_dict']
    changed = differences(plain, resumed['state_dict'])
    assert changed and all(key.endswith('running_var') for key in changed), changed


@pytest.mark.end_to_end
@ON_ONE_WORKER['mabn']
def test_resume_without_random_state_is_not_exact(scene_data, uninterrupted, tmp_path):
    """Guards the reason for ResumeRandomStateHook: mmengine's own resume (the
    checkpoint without ``rng_states``) ends elsewhere, and the user is told."""
    reference = uninterrupted('mabn')
    work_dir = tmp_path / 'plain'
    work_dir.mkdir()
    ckpt = load_ckpt(reference / 'iter_8.pth')
    assert {'python', 'numpy', 'torch'} <= set(ckpt.pop('rng_states'))
    torch.save(ckpt, work_dir / 'iter_8.pth')
    out = train_demo('mabn', work_dir, scene_data, '--resume', work_dir / 'iter_8.pth').stdout
    assert 'the resumed checkpoint has no random state' in out
    expected = load_ckpt(reference / f'iter_{MAX_ITERS}.pth')['state_dict']
    diff = differences(expected, load_ckpt(work_dir / f'iter_{MAX_ITERS}.pth')['state_dict'])
    assert 'backbone.bn1.buffer_x2' in diff and max(
        v for v in diff.values() if isinstance(v, float)) > 1e-4


def test_random_state_hook_isolates_validation_and_restores_after_replay():
    """In process: a validation (even one that saves a checkpoint) does not
    move training's random stream; a resume restores the saved state right
    before the first batch after the replay; load_from does not restore."""
    from mmnorm.engine.resume import ResumeRandomStateHook

    def draw():
        return torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random()

    hook = ResumeRandomStateHook()
    seed_everything(1)
    first = draw()
    seed_everything(1)
    checkpoint = {}
    hook.before_val(None)
    draw()  # the validation's data loader and model
    hook.before_save_checkpoint(None, checkpoint)  # save_best during validation
    hook.after_val(None)
    assert draw() == first

    class Loop:
        dataloader_iterator = iter(range(10))

    class Runner:
        train_loop, iter, epoch = Loop(), 3, 0

    hook.after_load_checkpoint(Runner, checkpoint)
    hook.before_train_epoch(Runner)
    seed_everything(2)
    assert [next(Runner.train_loop.dataloader_iterator) for _ in range(3)] == [0, 1, 2]
    draw()  # the replay's data pipeline
    assert next(Runner.train_loop.dataloader_iterator) == 3
    assert draw() == first

    Runner.iter, Runner.train_loop = 0, Loop()  # load_from: iteration 0
    hook.after_load_checkpoint(Runner, checkpoint)
    hook.before_train_epoch(Runner)
    assert isinstance(Runner.train_loop.dataloader_iterator, type(iter(range(1))))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------- damaged checkpoints
@pytest.fixture
def damaged_run(uninterrupted, tmp_path):
    """A copy of the BRN run's work dir whose newest checkpoint, iter_12.pth,
    lost its last 30% (last_checkpoint names it)."""
    work_dir = tmp_path / 'damaged'
    shutil.copytree(uninterrupted('brn'), work_dir)
    truncate(work_dir / 'iter_12.pth', work_dir / 'iter_12.pth')
    (work_dir / 'last_checkpoint').write_text(str(work_dir / 'iter_12.pth'))
    return work_dir


def assert_clean_error(proc, *parts):
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert 'Traceback' not in proc.stdout, proc.stdout[-4000:]
    error = next(line for line in proc.stdout.splitlines() if line.startswith('error: '))
    for part in parts:
        assert part in error, error
    return error


@pytest.mark.end_to_end
@ON_ONE_WORKER['brn']
def test_resume_path_refuses_truncated_checkpoint(damaged_run, scene_data):
    proc = train_demo('brn', damaged_run, scene_data, '--resume', damaged_run / 'iter_12.pth',
                      check=False)
    assert_clean_error(proc, f'--resume {damaged_run / "iter_12.pth"} cannot be used',
                       'truncated or corrupt')


@pytest.mark.end_to_end
@ON_ONE_WORKER['brn']
def test_auto_resume_stops_at_truncated_newest_then_previous_resumes(
        damaged_run, scene_data, uninterrupted):
    """--resume without a path stops, names the damaged file and the intact
    ones; resuming from the one it proposes works and ends where the
    uninterrupted run ended, in an intact, atomically written iter_12.pth."""
    proc = train_demo('brn', damaged_run, scene_data, '--resume', check=False)
    error = assert_clean_error(proc, f'names {damaged_run / "iter_12.pth"}',
                               'truncated or corrupt', 'iter_8.pth, iter_4.pth',
                               'Not falling back by itself')
    proposed = error.rsplit('--resume ', 1)[1].strip()
    assert proposed == str(damaged_run / 'iter_8.pth')

    out = train_demo('brn', damaged_run, scene_data, '--resume', proposed).stdout
    assert 'resumed epoch: 0, iter: 8' in out
    assert 'checkpoints are written atomically' in out
    checkpoint_check.verify_checkpoint(damaged_run / 'iter_12.pth')
    assert not list(damaged_run.glob('*.partial'))
    expected = load_ckpt(uninterrupted('brn') / 'iter_12.pth')['state_dict']
    assert differences(expected, load_ckpt(damaged_run / 'iter_12.pth')['state_dict']) == {}


@pytest.mark.end_to_end
@ON_ONE_WORKER['brn']
def test_test_tool_refuses_truncated_checkpoint(damaged_run, scene_data):
    proc = run([sys.executable, REPO / 'tools' / 'test.py', DEMO / 'mask_rcnn_r18_brn.py',
                damaged_run / 'iter_12.pth', '--work-dir', damaged_run / 'test',
                '--cfg-options', *demo_options(scene_data, 'brn')], env=demo_env(), check=False)
    assert_clean_error(proc, f'checkpoint {damaged_run / "iter_12.pth"} cannot be used',
                       'truncated or corrupt')


# ----------------------------------------------- checkpoint_check, in process
@pytest.fixture
def small_checkpoint(tmp_path):
    """A zip-format checkpoint of a few tensors, as mmengine writes them."""
    path = tmp_path / 'iter_3.pth'
    torch.save(dict(meta=dict(iter=3), state_dict={'w': torch.arange(4096.0),
                                                   'b': torch.ones(7)}), path)
    return path


@pytest.mark.parametrize('keep', [0.7, 0.999, 0.01])
def test_truncated_zip_checkpoint_is_refused(small_checkpoint, tmp_path, keep):
    bad = tmp_path / 'cut.pth'
    truncate(small_checkpoint, bad, keep)
    assert checkpoint_check.checkpoint_problem(str(small_checkpoint)) is None
    with pytest.raises(checkpoint_check.CheckpointFileError,
                       match=rf'^--resume {re.escape(str(bad))} cannot be used: truncated'):
        checkpoint_check.verify_checkpoint(bad, '--resume')


def test_flipped_byte_fails_the_crc(small_checkpoint):
    data = bytearray(small_checkpoint.read_bytes())
    with zipfile.ZipFile(small_checkpoint) as archive:
        info = next(i for i in archive.infolist() if i.file_size == 4096 * 4)
    # the first byte of the tensor data: after the local header and its name/extra fields
    name_len, extra_len = np.frombuffer(bytes(data[info.header_offset + 26:
                                                   info.header_offset + 30]), '<u2')
    start = info.header_offset + 30 + int(name_len) + int(extra_len)
    data[start + 100] ^= 0xFF
    small_checkpoint.write_bytes(bytes(data))
    assert checkpoint_check.checkpoint_problem(str(small_checkpoint)) == (
        f'corrupt: the member {info.filename} fails its CRC-32 check')


def test_missing_empty_and_legacy_checkpoints(tmp_path):
    assert checkpoint_check.checkpoint_problem(str(tmp_path / 'no.pth')) == 'it does not exist'
    (tmp_path / 'empty.pth').write_bytes(b'')
    assert checkpoint_check.checkpoint_problem(str(tmp_path / 'empty.pth')) == (
        'truncated: the file is empty (0 bytes)')
    legacy = tmp_path / 'legacy.pth'
    torch.save({'w': torch.ones(1000)}, legacy, _use_new_zipfile_serialization=False)
    assert checkpoint_check.checkpoint_problem(str(legacy)) is None
    truncate(legacy, tmp_path / 'legacy_cut.pth')
    problem = checkpoint_check.checkpoint_problem(str(tmp_path / 'legacy_cut.pth'))
    assert problem.startswith('truncated or corrupt: it is not a zip archive')
    with zipfile.ZipFile(tmp_path / 'other.zip', 'w') as archive:
        archive.writestr('readme.txt', 'hello')
    assert 'holds no data.pkl' in checkpoint_check.checkpoint_problem(str(tmp_path / 'other.zip'))


def test_latest_checkpoint_policy(small_checkpoint, tmp_path):
    work_dir = small_checkpoint.parent
    assert checkpoint_check.latest_checkpoint(str(work_dir)) is None  # no last_checkpoint
    (work_dir / 'last_checkpoint').write_text(str(small_checkpoint))
    assert checkpoint_check.latest_checkpoint(str(work_dir)) == str(small_checkpoint)
    (work_dir / 'last_checkpoint').write_text('')
    with pytest.raises(checkpoint_check.CheckpointFileError, match='it is empty.*--resume '
                       + re.escape(str(small_checkpoint))):
        checkpoint_check.latest_checkpoint(str(work_dir))
    (work_dir / 'last_checkpoint').write_text(str(work_dir / 'iter_9.pth'))
    with pytest.raises(checkpoint_check.CheckpointFileError,
                       match='iter_9.pth, which cannot be used: it does not exist'):
        checkpoint_check.latest_checkpoint(str(work_dir))
    small_checkpoint.unlink()
    with pytest.raises(checkpoint_check.CheckpointFileError, match='There is no intact'):
        checkpoint_check.latest_checkpoint(str(work_dir))


# ---------------------------------------------------------- atomic writes
def test_atomic_put_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    """A write interrupted at any point before the rename (here: the rename
    itself fails, as if the process died just before it) leaves the previous
    file untouched; mmengine's LocalBackend would have truncated it."""
    backend = checkpoint_check.AtomicLocalBackend()
    target = tmp_path / 'iter_4.pth'
    backend.put(b'old' * 1000, target)
    assert target.read_bytes() == b'old' * 1000
    assert not (tmp_path / 'iter_4.pth.partial').exists()

    def die(src, dst):
        raise KeyboardInterrupt('killed before the rename')

    monkeypatch.setattr(checkpoint_check.os, 'replace', die)
    with pytest.raises(KeyboardInterrupt):
        backend.put(b'new' * 5000, target)
    assert target.read_bytes() == b'old' * 1000
    assert (tmp_path / 'iter_4.pth.partial').read_bytes() == b'new' * 5000


def test_removal_of_the_old_checkpoint_waits_for_the_new_one(tmp_path, monkeypatch):
    """mmengine's CheckpointHook (max_keep_ckpts) removes the old checkpoint
    before it saves the new one; through the atomic backend the old file
    survives a save that dies, and goes once a save completes."""
    hook_backend = checkpoint_check.AtomicLocalBackend()  # the hook's instance
    save_backend = checkpoint_check.AtomicLocalBackend()  # save_checkpoint's own
    old, new = tmp_path / 'iter_4.pth', tmp_path / 'iter_8.pth'
    save_backend.put(b'old', old)
    hook_backend.remove(old)
    assert old.read_bytes() == b'old'  # still there: nothing new is on disk yet

    def die(src, dst):
        raise KeyboardInterrupt('killed before the rename')

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_check.os, 'replace', die)
        with pytest.raises(KeyboardInterrupt):
            save_backend.put(b'new', new)
    assert old.read_bytes() == b'old' and not new.exists()
    save_backend.put(b'new', new)
    assert new.read_bytes() == b'new' and not old.exists()
    other = tmp_path / 'elsewhere'
    save_backend.put(b'x', other / 'iter_1.pth')
    hook_backend.remove(other / 'iter_1.pth')
    save_backend.put(b'y', tmp_path / 'iter_12.pth')  # another folder: no effect there
    assert (other / 'iter_1.pth').exists()


def test_runner_checkpoint_hook_uses_atomic_backend(tmp_path, monkeypatch):
    """make_checkpoint_saves_atomic sets the backend on default CheckpointHooks
    only; mmengine's save_checkpoint then writes through it."""
    from mmengine.hooks import CheckpointHook
    from mmengine.runner.checkpoint import save_checkpoint

    class FakeRunner:
        work_dir = str(tmp_path)
        hooks = [CheckpointHook(interval=1), CheckpointHook(interval=1, out_dir='s3://bucket/x'),
                 CheckpointHook(interval=1, backend_args=dict(backend='local'))]

    checkpoint_check.make_checkpoint_saves_atomic(FakeRunner)
    assert [h.backend_args for h in FakeRunner.hooks] == [
        dict(backend='local_atomic'), None, dict(backend='local')]
    calls = []
    original = checkpoint_check.AtomicLocalBackend.put

    def spy(self, obj, filepath):
        calls.append(filepath)
        original(self, obj, filepath)

    monkeypatch.setattr(checkpoint_check.AtomicLocalBackend, 'put', spy)
    save_checkpoint({'state_dict': {'w': torch.ones(3)}}, str(tmp_path / 'iter_1.pth'),
                    backend_args=FakeRunner.hooks[0].backend_args)
    assert calls == [str(tmp_path / 'iter_1.pth')]
    checkpoint_check.verify_checkpoint(tmp_path / 'iter_1.pth')
