"""tools/gpu_check.sh --smoke: the GPU check's code path on tiny shapes, here on
the CPU, installing mmengine from a folder of wheels as on a bare GPU machine."""
import re
import subprocess
import sys

import pytest

from mmnorm._torch import CUSTOM_OPS

from conftest import REPO, tool_env


@pytest.fixture(scope='module')
def wheels(tmp_path_factory):
    folder = tmp_path_factory.mktemp('wheels')
    done = subprocess.run(['bash', str(REPO / 'tools' / 'gpu_check.sh'), '--download', str(folder)],
                          capture_output=True, text=True, env=tool_env(PYTHON=sys.executable))
    if done.returncode != 0:
        pytest.skip(f'no package registry to fill the wheel folder from: {done.stderr[-500:]}')
    return folder


def cuda_test_outcomes(log):
    """{'passed': 39, 'skipped': 8, ...} from the last line of pytest's summary
    in the CUDA tests' step of the check's log ('39 passed, 8 skipped, 81
    warnings in 53.09s')."""
    step = log[log.index('] CUDA tests (at most'):log.index('] CUDA tests: exit')]
    summaries = re.findall(r'^=*\s*((?:\d+ [a-z]+(?:, )?)+) in [\d.]+s', step, re.MULTILINE)
    assert summaries, f'no pytest summary in the CUDA tests\' step:\n{step[-4000:]}'
    outcomes = {}
    for count, outcome in re.findall(r'(\d+) ([a-z]+)', summaries[-1]):
        outcome = {'warning': 'warnings', 'error': 'errors'}.get(outcome, outcome)
        outcomes[outcome] = int(count)
    return outcomes


@pytest.mark.end_to_end
def test_smoke_installs_from_wheels_and_runs_every_step(wheels, tmp_path):
    names = sorted(path.name.split('-')[0] for path in wheels.glob('*.whl'))
    assert names == ['addict', 'mmengine', 'platformdirs', 'termcolor', 'yapf']
    # A bare machine: importing mmengine fails until the check installs it.
    bare = tmp_path / 'bare'
    (bare / 'mmengine').mkdir(parents=True)
    (bare / 'mmengine' / '__init__.py').write_text('raise ImportError("not installed")\n')
    out_dir = tmp_path / 'out'
    done = subprocess.run(
        ['bash', str(REPO / 'tools' / 'gpu_check.sh'), '--smoke', '--wheels', str(wheels),
         '--out', str(out_dir)], capture_output=True, text=True, cwd=tmp_path, timeout=1200,
        env=tool_env(PYTHON=sys.executable, PYTHONPATH=str(bare), OMP_WAIT_POLICY='PASSIVE'))
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert f'installing {sorted(wheels.glob("mmengine-*.whl"))[0].name} into' in log
    assert 'CUDA tests: exit 0' in log and 'layer benchmark: exit 0' in log
    outcomes = cuda_test_outcomes(log)
    ran = sum(count for outcome, count in outcomes.items()
              if outcome not in ('warnings', 'deselected'))
    # On the CPU (MMNORM_CUDA_TESTS_ON_CPU=1) the tests run: they may not all skip.
    assert outcomes.get('passed', 0) > 0 and outcomes.get('skipped', 0) < ran, outcomes
    layers = (out_dir / 'gpu_layer_benchmark.md').read_text()
    for text in ('| MABN | BN |', '| BRN | BN |', '| WSConv | Conv |', 'bfloat16', 'channels_last'):
        assert text in layers
    if CUSTOM_OPS:
        assert 'layer compiled / eager x' in layers
    else:
        assert 'no compiled columns (torch < 2.4: no torch.library.custom_op)' in log
    assert 'not measured:' not in layers and 'failed:' not in layers
    if 'Mask R-CNN iteration: skipped, torchvision does not run with this torch' in log:
        assert not (out_dir / 'gpu_maskrcnn.md').exists()
        return
    assert 'Mask R-CNN iteration: exit 0' in log
    table = (out_dir / 'gpu_maskrcnn.md').read_text()
    for method in ('frozen BN', 'BN', 'MABN + CenConv', 'BRN', 'GN + WS', 'CBN'):
        assert f'| {method} |' in table
