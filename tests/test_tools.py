"""End-to-end tests of tools/train.py, tools/test.py, tools/dist_train.sh and
tools/slurm_train.sh (under a stand-in srun) on a tiny Mask R-CNN
(tests/configs/tiny_mask_rcnn.py) and a tiny COCO set (the unit tests of
mmnorm.engine.distributed are in tests/engine/test_distributed.py).

The tools run in subprocesses with this interpreter. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
is removed from their environment, so the tools' own trusted-loading fix
(mmnorm.engine.trusted_checkpoints) is what is tested.
"""
import os
import pickle
import shutil
import sys

import pytest

from mmnorm.compat import torch_version

from conftest import REPO, free_port, run, tool_env, write_exe

pytestmark = pytest.mark.end_to_end
CONFIG = REPO / 'tests' / 'configs' / 'tiny_mask_rcnn.py'
#: The tests that read one shared training (``trained``, ``dist_trained``) stay on one worker.
ON_TRAINED_WORKER = pytest.mark.xdist_group('tools_trained')
ON_DIST_WORKER = pytest.mark.xdist_group('tools_dist')


def train(work_dir, data, *args, max_iters=2, env=None, check=True, options=()):
    return run([sys.executable, REPO / 'tools' / 'train.py', CONFIG,
                '--work-dir', work_dir, *args, '--cfg-options',
                *data.cfg_options(), f'train_cfg.max_iters={max_iters}', *options],
               env=env, check=check)


def load_ckpt(path):
    import torch
    return torch.load(path, map_location='cpu', weights_only=False)


@pytest.fixture(scope='module')
def trained(tiny_coco_session, tmp_path_factory):
    """Train the tiny config 2 iterations; return (work_dir, output)."""
    work_dir = tmp_path_factory.mktemp('train')
    proc = train(work_dir, tiny_coco_session)
    return work_dir, proc.stdout


@pytest.mark.every_stack
@ON_TRAINED_WORKER
def test_train_writes_checkpoint(trained):
    work_dir, out = trained
    ckpt = work_dir / 'iter_2.pth'
    assert ckpt.is_file()
    assert (work_dir / 'last_checkpoint').read_text().strip().endswith(
        'iter_2.pth')
    assert 'Iter(train) [2/2]' in out
    assert 'coco/bbox_mAP' in out  # validated at the end of training
    assert '[mmnorm] training finished at epoch 0, iter 2' in out
    state = load_ckpt(ckpt)
    assert state['meta']['iter'] == 2
    assert 'backbone.conv1.weight' in state['state_dict']
    assert 'optimizer' in state and 'message_hub' in state


@pytest.mark.parametrize('how', ['path', 'auto'])
@ON_TRAINED_WORKER
def test_resume_continues(trained, tiny_coco_session, tmp_path, how):
    src_dir, _ = trained
    if how == 'path':
        work_dir = tmp_path / 'resumed'
        args = ['--resume', src_dir / 'iter_2.pth']
    else:  # --resume alone: the latest checkpoint of the work dir
        work_dir = tmp_path / 'copy'
        shutil.copytree(src_dir, work_dir)
        (work_dir / 'last_checkpoint').write_text(str(work_dir / 'iter_2.pth'))
        args = ['--resume']
    out = train(work_dir, tiny_coco_session, *args, max_iters=4).stdout
    assert 'resumed epoch: 0, iter: 2' in out
    if how == 'auto':
        assert 'Auto resumed from the latest checkpoint' in out
    assert 'Iter(train) [3/4]' in out and 'Iter(train) [4/4]' in out
    assert 'Iter(train) [1/4]' not in out
    state = load_ckpt(work_dir / 'iter_4.pth')
    assert state['meta']['iter'] == 4


@pytest.mark.skipif(torch_version() < (2, 6), reason='torch < 2.6 loads with weights_only=False '
                    'by default: mmengine loads its checkpoints without trust_checkpoints')
@ON_TRAINED_WORKER
def test_resume_fails_without_trusted_loading(trained, tiny_coco_session,
                                              tmp_path):
    """Guards the reason for trust_checkpoints: with torch's default
    (weights_only=True from torch 2.6 on) mmengine cannot load its own checkpoints."""
    src_dir, _ = trained
    proc = train(tmp_path / 'w', tiny_coco_session, '--resume',
                 src_dir / 'iter_2.pth', max_iters=4,
                 env=tool_env(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD='0'),
                 check=False)
    assert proc.returncode != 0
    assert 'Weights only load failed' in proc.stdout


@pytest.mark.every_stack
@ON_TRAINED_WORKER
def test_test_tool_evaluates(trained, tiny_coco_session, tmp_path):
    src_dir, _ = trained
    out_pkl = tmp_path / 'preds.pkl'
    proc = run([sys.executable, REPO / 'tools' / 'test.py', CONFIG,
                src_dir / 'iter_2.pth', '--work-dir', tmp_path / 'test',
                '--out', out_pkl, '--cfg-options',
                *tiny_coco_session.cfg_options()])
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP',
                'coco/segm_mAP_50'):
        assert f'{key}:' in proc.stdout
    assert 'Load checkpoint from' in proc.stdout
    with open(out_pkl, 'rb') as f:
        preds = pickle.load(f)
    assert len(preds) == 2  # the 2 val images
    assert {'pred_instances', 'img_id'} <= set(preds[0])


@ON_TRAINED_WORKER
def test_test_tool_precise_bn_recomputes_before_testing(trained, tiny_coco_session, tmp_path):
    """--precise-bn N: the statistics are recomputed from N training batches
    with the checkpoint's weights, and the test uses them (its predictions
    differ from those of the checkpoint's own statistics)."""
    src_dir, _ = trained
    preds = {}
    for name, extra in (('plain', []), ('precise', ['--precise-bn', '2'])):
        preds[name] = tmp_path / f'{name}.pkl'
        proc = run([sys.executable, REPO / 'tools' / 'test.py', CONFIG, src_dir / 'iter_2.pth',
                    '--work-dir', tmp_path / name, '--out', preds[name], *extra,
                    '--cfg-options', *tiny_coco_session.cfg_options()])
    out = proc.stdout
    assert out.index('Load checkpoint from') < out.index('PreciseBNHook (before testing)')
    assert 'statistics of 34 layers recomputed from 2 batches of 2 per process' in out
    assert 'coco/bbox_mAP:' in out
    scores = []
    for name in ('plain', 'precise'):
        with open(preds[name], 'rb') as f:
            scores.append([p['pred_instances']['scores'].tolist() for p in pickle.load(f)])
    assert scores[0] != scores[1]


@ON_TRAINED_WORKER
def test_test_tool_precise_bn_refuses_bad_values(trained, tiny_coco_session, tmp_path):
    src_dir, _ = trained
    proc = run([sys.executable, REPO / 'tools' / 'test.py', CONFIG, src_dir / 'iter_2.pth',
                '--precise-bn', '0'], check=False)
    assert proc.returncode == 2
    assert '--precise-bn must be at least 1, got 0' in proc.stdout


@pytest.fixture(scope='module')
def dist_trained(tiny_coco_session, tmp_path_factory):
    """tools/dist_train.sh, 2 CPU processes, 2 iterations (it validates at its
    end), started in an empty folder with a relative work dir: (folder,
    output, what the folder held afterwards)."""
    cwd = tmp_path_factory.mktemp('dist') / 'cwd'
    cwd.mkdir()
    out = run(['bash', REPO / 'tools' / 'dist_train.sh', CONFIG, '2', '--work-dir', 'train',
               '--cfg-options', *tiny_coco_session.cfg_options(), 'train_cfg.max_iters=2'],
              env=tool_env(PORT=str(free_port()), PYTHON=sys.executable), cwd=cwd).stdout
    return cwd, out, sorted(os.listdir(cwd))


@pytest.mark.every_stack
@ON_DIST_WORKER
def test_dist_train_two_cpu_processes(dist_trained):
    cwd, out, _ = dist_trained
    for rank in (0, 1):
        assert (f'[mmnorm rank {rank}/2] no CUDA: initialised torch.distributed'
                f' for the pytorch launcher with the gloo backend') in out
        assert f'[mmnorm rank {rank}/2] training finished at epoch 0, iter 2' in out
    assert 'CPUDistributedDataParallel' in out
    assert 'Distributed training: True' in out
    assert 'GPU number: 2' in out  # mmengine's name for the world size
    assert 'Iter(train) [2/2]' in out
    assert load_ckpt(cwd / 'train' / 'iter_2.pth')['meta']['iter'] == 2


@ON_DIST_WORKER
def test_two_process_runs_write_only_their_work_dirs(dist_trained, tiny_coco_session):
    """dist_train.sh (which validates at its end) and dist_test.sh
    (with --out, a metric added after the runner is built), 2 CPU processes
    each, started in an empty folder, leave nothing there but their work dirs:
    the processes' results are collected in WORK_DIR/.dist_test, which goes
    once collected, not in mmengine's default ./.dist_test."""
    cwd, out, after_training = dist_trained
    assert 'coco/segm_mAP:' in out and 'GPU number: 2' in out
    assert after_training == ['train']

    out = run(['bash', REPO / 'tools' / 'dist_test.sh', CONFIG, 'train/iter_2.pth', '2',
               '--work-dir', 'test', '--out', 'test/preds.pkl', '--cfg-options',
               *tiny_coco_session.cfg_options()],
              env=tool_env(PORT=str(free_port()), PYTHON=sys.executable), cwd=cwd).stdout
    assert 'coco/segm_mAP:' in out and (cwd / 'test' / 'preds.pkl').is_file()
    assert sorted(os.listdir(cwd)) == ['test', 'train']
    assert not list(cwd.rglob('.dist_test'))


FAKE_SRUN = r"""#!/usr/bin/env bash
# Stand-in for srun: starts --ntasks copies of the command on this machine
# with the variables Slurm gives each task.
echo "fake srun $*"
n=1
while [ $# -gt 0 ]; do
    case "$1" in
        -p) shift 2 ;;
        --ntasks=*) n=${1#--ntasks=}; shift ;;
        --cpus-per-task=*) export SLURM_CPUS_PER_TASK=${1#--cpus-per-task=}; shift ;;
        -*) shift ;;
        *) break ;;
    esac
done
pids=()
for ((i = 0; i < n; i++)); do
    SLURM_PROCID=$i SLURM_NTASKS=$n SLURM_LOCALID=$i SLURM_NODELIST=fakenode \
        "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/sh
[ "$1 $2 $3" = "show hostnames fakenode" ] && echo 127.0.0.1
"""


def test_slurm_train_two_cpu_tasks(tiny_coco_session, tmp_path):
    """tools/slurm_train.sh under a stand-in srun/scontrol: the tasks find
    each other from SLURM_* variables and train with gloo."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    write_exe(bin_dir / 'srun', FAKE_SRUN)
    write_exe(bin_dir / 'scontrol', FAKE_SCONTROL)
    env = tool_env(PATH=f'{bin_dir}:{os.environ["PATH"]}', GRES='', GPUS='2',
                   GPUS_PER_NODE='2', CPUS_PER_TASK='1', PYTHON=sys.executable,
                   PORT=str(free_port()))
    for key in ('MASTER_ADDR', 'MASTER_PORT', 'RANK', 'WORLD_SIZE',
                'LOCAL_RANK', 'OMP_NUM_THREADS'):
        env.pop(key, None)
    work_dir = tmp_path / 'slurm'
    out = run(['bash', REPO / 'tools' / 'slurm_train.sh', 'part', 'job',
               CONFIG, work_dir, '--cfg-options',
               *tiny_coco_session.cfg_options(), 'train_cfg.max_iters=2'],
              env=env).stdout
    assert '--ntasks=2 --ntasks-per-node=2 --cpus-per-task=1' in out
    assert '--gres' not in out
    for rank in (0, 1):
        assert (f'[mmnorm rank {rank}/2] no CUDA: initialised torch.distributed'
                f' for the slurm launcher with the gloo backend (config asked '
                f'for nccl), local rank {rank}, master 127.0.0.1:'
                f'{env["PORT"]}') in out
        assert f'[mmnorm rank {rank}/2] training finished at epoch 0, iter 2' in out
    assert 'Distributed launcher: slurm' in out
    assert 'OMP_NUM_THREADS was not set: using 1 thread(s) per process' in out
    assert load_ckpt(work_dir / 'iter_2.pth')['meta']['iter'] == 2


@pytest.mark.every_stack
def test_train_with_cp_gives_the_losses_and_buffers_of_the_run_without(trained,
                                                                       tiny_coco_session,
                                                                       tmp_path):
    # MMDetection's with_cp (reentrant activation checkpointing in every
    # backbone block) on BRN layers: the recomputed forwards replay their
    # steps, so the run is the run without it, and nothing warns
    work_dir, out = trained
    proc = train(tmp_path, tiny_coco_session, options=['model.backbone.with_cp=True'])
    assert 'RuntimeWarning' not in proc.stdout
    losses = [line.split('loss: ')[1].split()[0] for line in out.splitlines()
              if 'Iter(train)' in line and 'loss: ' in line]
    with_cp = [line.split('loss: ')[1].split()[0] for line in proc.stdout.splitlines()
               if 'Iter(train)' in line and 'loss: ' in line]
    assert losses and with_cp == losses
    plain, checkpointed = (load_ckpt(d / 'iter_2.pth')['state_dict'] for d in (work_dir, tmp_path))
    for key, value in plain.items():
        if not value.is_floating_point():
            assert bool((checkpointed[key] == value).all()), key
        else:
            assert float((checkpointed[key] - value).abs().max()) <= 1e-5 * max(
                1.0, float(value.abs().max())), key
