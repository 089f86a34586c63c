"""Mixed precision: ``tools/train.py --amp`` on the CPU.

Without an accelerator, mmnorm.engine.amp runs ``--amp`` as bfloat16 autocast
with ``torch.amp.GradScaler('cpu')`` (CPUAmpOptimWrapper) and runs mmcv's
float32-only CPU ops (NMS, RoIAlign) in float32 under autocast. The
end-to-end test trains each demo config (MABN, CBN, BRN, GN + WS; shrunk as in
tests/engine/test_faults.py, so that each layer's schedule is crossed within 12
iterations) for 12 iterations with ``--amp``: every loss is finite
and the checkpoint's parameters and buffers are finite float32. PyTorch's
CPU GradScaler exists from torch 2.3 on: on older torch ``--amp`` without a
GPU stops with an error naming the feature and the version it needs.
"""
import math
import re

import pytest
import torch
from mmcv.ops import nms, roi_align
from test_faults import load_ckpt, scene_data, train_demo  # noqa: F401  (scene_data: fixture)

from mmnorm.compat import TorchTooOldError, torch_version
from mmnorm.engine import amp

AMP_ITERS = 12  # the MAX_ITERS of test_faults, whose schedules end by then
CPU_GRAD_SCALER = torch_version() >= (2, 3)
needs_cpu_grad_scaler = pytest.mark.skipif(
    not CPU_GRAD_SCALER, reason=f'the CPU GradScaler needs torch >= 2.3 (this is '
    f'{torch.__version__}); test_amp_without_gpu_refused_before_torch_2_3 checks the error')

#: Buffers each method's layers must have in the checkpoint (checked float32).
NORM_BUFFERS = {
    'mabn': ('running_var', 'buffer_x2', 'buffer_gz'),
    'cbn': ('running_mean', 'running_var'),
    'brn': ('running_mean', 'running_var'),
    'gnws': (),
}


@needs_cpu_grad_scaler
@pytest.mark.parametrize('method', ['mabn', 'cbn', 'brn', 'gnws'])
@pytest.mark.end_to_end
def test_amp_trains_demo_config(method, scene_data, tmp_path):  # noqa: F811
    out = train_demo(method, tmp_path, scene_data, '--amp', max_iters=AMP_ITERS,
                     checkpoint_interval=AMP_ITERS).stdout
    assert 'optim_wrapper type CPUAmpOptimWrapper' in out
    losses = re.findall(rf'Iter\(train\) \[\s*\d+/{AMP_ITERS}\].*?  loss: (\S+)', out)
    assert len(losses) == AMP_ITERS  # log interval 1, window 1: every iteration's loss
    assert all(math.isfinite(float(loss)) for loss in losses), losses

    ckpt = load_ckpt(tmp_path / f'iter_{AMP_ITERS}.pth')
    # Saved by the AMP wrapper only. No step was skipped for an inf/NaN
    # gradient: the scale kept its initial 2^16 and counted AMP_ITERS good steps.
    scaler = ckpt['optimizer']['loss_scaler']
    assert (scaler['scale'], scaler['_growth_tracker']) == (2.0 ** 16, AMP_ITERS)
    state = ckpt['state_dict']
    for key, value in state.items():
        if value.is_floating_point():
            assert value.dtype == torch.float32, key
            assert torch.isfinite(value).all(), key
    for name in NORM_BUFFERS[method]:
        assert state[f'backbone.layer1.0.bn1.{name}'].dtype == torch.float32
    if method == 'gnws':
        assert 'backbone.layer1.0.gn1.weight' in state


@needs_cpu_grad_scaler
def test_cpu_amp_wrapper_steps_in_bfloat16_and_checks_arguments():
    """Under the wrapper's context a conv runs in bfloat16; a step with a
    non-finite gradient is skipped and the scale halved; bad arguments name
    the wrapper and the key."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3)
    wrapper = amp.CPUAmpOptimWrapper(optimizer=torch.optim.SGD(conv.parameters(), lr=0.1))
    assert wrapper.loss_scaler.get_scale() == 2.0 ** 16
    with wrapper.optim_context(conv):
        y = conv(torch.randn(1, 2, 5, 5))
    assert y.dtype == torch.bfloat16
    before = conv.weight.detach().clone()
    wrapper.update_params(y.float().sum())
    assert not torch.equal(conv.weight, before)

    before = conv.weight.detach().clone()
    with wrapper.optim_context(conv):
        y = conv(torch.randn(1, 2, 5, 5))
    wrapper.update_params(y.float().sum() * float('inf'))
    assert torch.equal(conv.weight, before)  # skipped
    assert wrapper.loss_scaler.get_scale() == 2.0 ** 15

    with pytest.raises(ValueError, match='CPUAmpOptimWrapper: dtype must be bfloat16'):
        amp.CPUAmpOptimWrapper(optimizer=torch.optim.SGD(conv.parameters(), lr=0.1),
                                   dtype='float16')
    with pytest.raises(TypeError, match='CPUAmpOptimWrapper: loss_scale must be'):
        amp.CPUAmpOptimWrapper(optimizer=torch.optim.SGD(conv.parameters(), lr=0.1),
                                   loss_scale='static')


def test_amp_without_gpu_refused_before_torch_2_3(scene_data, tmp_path, monkeypatch):  # noqa: F811
    """On torch < 2.3 the tool stops with one line naming the feature and the
    versions (run for real on such a torch, else with the version patched in
    process); the wrapper's constructor says the same."""
    if not CPU_GRAD_SCALER:
        proc = train_demo('mabn', tmp_path, scene_data, '--amp', max_iters=2, check=False)
        assert proc.returncode == 1, proc.stdout[-3000:]
        assert proc.stdout.strip().splitlines()[-1] == (
            'error: --amp without a GPU (the CPU GradScaler) needs torch >= 2.3; this '
            f'environment has torch {torch.__version__}')
    monkeypatch.setattr(torch, '__version__', '2.2.2')
    with pytest.raises(TorchTooOldError, match=r'^--amp without a GPU \(the CPU GradScaler\) '
                       r'needs torch >= 2\.3; this environment has torch 2\.2\.2$'):
        amp.use_cpu_amp(dict(optim_wrapper=dict(type='AmpOptimWrapper')))
    with pytest.raises(TorchTooOldError, match=r'^CPUAmpOptimWrapper \(mixed precision without '
                       r'a GPU: the CPU GradScaler\) needs torch >= 2\.3'):
        amp.CPUAmpOptimWrapper(optimizer=torch.optim.SGD(torch.nn.Linear(1, 1).parameters(),
                                                         lr=0.1))


def test_mmcv_ops_run_in_float32_under_cpu_autocast():
    """After the fix, RoIAlign takes bfloat16 features under autocast and
    returns bfloat16, equal to the float32 op on the same values, with a
    gradient; NMS keeps the same boxes; float32 calls are unchanged."""
    amp.run_mmcv_ops_in_float32()
    torch.manual_seed(0)
    feats = torch.randn(1, 4, 16, 16).bfloat16().requires_grad_()
    rois = torch.tensor([[0, 1.0, 2.0, 9.0, 12.0], [0, 0.0, 0.0, 15.0, 15.0]])
    expected = roi_align(feats.detach().float(), rois, (7, 7), 1.0, 2, 'avg', True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = roi_align(feats, rois, (7, 7), 1.0, 2, 'avg', True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.bfloat16().float(), rtol=0, atol=0)
    out.float().sum().backward()
    assert feats.grad.dtype == torch.bfloat16 and feats.grad.abs().sum() > 0

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=torch.float)
    scores = torch.tensor([0.9, 0.8, 0.7])
    _, keep32 = nms(boxes, scores, 0.5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        dets, keep = nms(boxes.bfloat16(), scores.bfloat16(), 0.5)
    assert keep.tolist() == keep32.tolist() == [0, 2]
    assert dets.dtype == torch.bfloat16
