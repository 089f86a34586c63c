"""tools/benchmark_maskrcnn.py: its options, its inputs, a failing method and a
failing compile as rows of the table (these need no torchvision), and a
``--smoke`` run of every method on the CPU that writes the header and the table
it promises (this one needs a working torchvision). No timing assertions: a
smoke run's numbers are noise.

The smoke run compiles two models, the 'frozen BN' baseline and 'GN + WS' (an
mmnorm conv, WSConv, in the compiled graph), not all six: on 2 CPU cores with
torch 2.1 a compile with aot_eager takes 20-60 s per model, and MABN and BRN
do not compile there (their compile support needs torch >= 2.4; MABN's graph
breaks overflow aot_eager's nested backward-compiler wrappers,
pytorch/pytorch#93935, and every later compile in the process then fails with
the same RecursionError)."""
import argparse
import re
from collections import OrderedDict

import pytest
import torch
from torch import nn

from mmnorm.benchmark import maskrcnn
from mmnorm.benchmark.common import markdown_tables

from conftest import load_tool


def _torchvision_refusal():
    """Why torchvision's detection models cannot run here, or None."""
    try:
        import torchvision
        torchvision.ops.nms(torch.zeros(1, 4), torch.ones(1), 0.5)
    except Exception as exc:  # noqa: BLE001  (ImportError, or RuntimeError from its ops)
        first_line = (str(exc).strip().splitlines() or [''])[0]
        return (f'the benchmark builds torchvision\'s Mask R-CNN, and with torch '
                f'{torch.__version__} here `import torchvision; torchvision.ops.nms(...)` '
                f'fails: {type(exc).__name__}: {first_line}')
    return None


NO_TORCHVISION = _torchvision_refusal()
COMPILED = ('frozen BN', 'GN + WS')
SMOKE = ['--smoke', '--device', 'cpu', '--compile-methods', *COMPILED]
TRUNK = {
    'frozen BN': '53 Conv2d, 53 FrozenBatchNorm2d',
    'BN': '53 Conv2d, 53 BatchNorm2d',
    'MABN + CenConv': '53 CenConv, 53 MABN',
    'BRN': '53 Conv2d, 53 BRN',  # conv=None: no CenConv
    'CBN': '53 Conv2d, 53 CBN',
    'GN + WS': '53 WSConv, 53 GroupNorm',
}


@pytest.fixture(scope='module')
def tool():
    return load_tool('benchmark_maskrcnn')


def test_options(tool, capsys):
    args = tool.parse_args([])
    assert (args.methods, args.compile_methods) == (list(maskrcnn.METHODS),) * 2
    assert (args.iters, args.warmup, args.image_size, args.images, args.dtype, args.compile,
            args.smoke, args.out) == (10, 3, [800, 1333], 2, 'float32', True, False, None)
    args = tool.parse_args(['--methods', 'mabn+cenconv', 'GN + WS', '--compile-methods', 'cbn',
                            '--no-compile'])
    assert (args.methods, args.compile_methods, args.compile) == (
        ['MABN + CenConv', 'GN + WS'], ['CBN'], False)
    with pytest.raises(SystemExit):
        tool.parse_args(['--methods', 'SyncBN'])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        tool.parse_args(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    for option in ('--device', '--methods', '--iters', '--warmup', '--image-size', '--images',
                   '--dtype', '--compile, --no-compile', '--compile-methods', '--smoke', '--out'):
        assert option in text
    for default in ('(default: 10)', '(default: 3)', '(default: [800, 1333])',
                    '(default: float32)', '(default: True)', "(default: ['frozen BN', 'BN',"):
        assert default in text


def test_inputs_are_valid_targets():
    images, targets = maskrcnn.make_inputs(2, (64, 96), torch.device('cpu'))
    assert [tuple(image.shape) for image in images] == [(3, 64, 96)] * 2
    for target in targets:
        boxes, masks = target['boxes'], target['masks']
        assert boxes.shape == (maskrcnn.BOXES, 4) and masks.dtype == torch.uint8
        assert masks.shape == (maskrcnn.BOXES, 64, 96)
        assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes >= 0).all()
        assert (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 64).all()
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        assert torch.equal(masks.sum((1, 2)).float(), areas)
        assert ((target['labels'] >= 1) & (target['labels'] <= 90)).all()


def fake_args():
    return argparse.Namespace(image_size=[8, 8], dtype='float32', warmup=1, iters=2)


class FakeDetector(nn.Module):
    """A stand-in with a ``backbone.body`` and a loss dict, one loss not finite."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(OrderedDict(
            body=nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))))

    def forward(self, images, targets):
        y = self.backbone(torch.stack(images))
        return {'loss_ok': y.square().mean(), 'loss_bad': torch.tensor(float('nan'))}


def raising_backend(graph, example_inputs):
    raise RuntimeError('no compiler here\nsecond line')


def test_failures_are_rows(monkeypatch):
    inputs = ([torch.rand(3, 8, 8)], [{}])
    cpu = torch.device('cpu')

    def failing_build(method, image_size):
        raise ValueError('cannot build | this\nsecond line')

    monkeypatch.setattr(maskrcnn, 'build_model', failing_build)
    failed = maskrcnn.measure('CBN', inputs, fake_args(), cpu, 'aot_eager')
    assert failed.eager is None and failed.problems == [
        'failed: ValueError: cannot build / this']

    monkeypatch.setattr(maskrcnn, 'build_model', lambda method, image_size: FakeDetector())
    ran = maskrcnn.measure('BN', inputs, fake_args(), cpu, raising_backend)
    assert ran.eager > 0 and ran.peak is None and ran.compiled is None
    assert ran.layers == '1 Conv2d, 1 BatchNorm2d'
    assert ran.problems[0] == 'loss not finite: loss_bad'
    assert ran.problems[1].startswith('compiled failed: ') and len(ran.problems) == 2
    assert 'no compiler here' in ran.problems[1] and 'second line' not in ran.problems[1]

    base = maskrcnn.Result('frozen BN', 'x', eager=0.5, compiled=0.25)
    table, = markdown_tables(maskrcnn.table([base, ran, failed], ['frozen BN', 'BN', 'CBN']))
    assert [row['status'] for row in table] == ['ok', '; '.join(ran.problems), failed.problems[0]]
    assert [row['compiled ms'] for row in table] == ['250.0', '-', '-']
    assert table[1]['x frozen BN'] == f'{ran.eager / 0.5:.2f}x'
    assert [row['peak MB'] for row in table] == ['n/a'] * 3


@pytest.mark.skipif(NO_TORCHVISION is not None, reason=str(NO_TORCHVISION))
def test_smoke_run_every_method(tool, tmp_path, capsys, keep_threads):
    import torchvision
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = tmp_path / 'docs' / 'maskrcnn.md'
    markdown = tool.main(SMOKE + ['--out', str(out)])
    assert markdown in capsys.readouterr().out
    assert out.read_text() == markdown

    assert re.search(r'Measured on \d{4}-\d\d-\d\d \d\d:\d\d UTC with `python '
                     r'tools/benchmark_maskrcnn.py --smoke .*` \(smoke mode', markdown)
    for fact in ('device: CPU', 'NVIDIA driver ', f'torch {torch.__version__}',
                 f'CUDA {torch.version.cuda}', f'cuDNN {torch.backends.cudnn.version()}',
                 f'torchvision {torchvision.__version__}', '2 images of 128 x 160, float32',
                 '1 warm-up iterations', 'median of 1 timed iterations',
                 "torch.compile(model.backbone, backend='aot_eager')"):
        assert fact in markdown, fact

    table, = markdown_tables(markdown)
    assert [row['method'] for row in table] == list(maskrcnn.METHODS)
    for row in table:
        assert row['status'] == 'ok', row
        assert row['ResNet trunk layers'] == TRUNK[row['method']]
        assert float(row['iteration ms']) > 0 and row['peak MB'] == 'n/a'
        assert re.fullmatch(r'\d+\.\d\dx', row['x frozen BN'])
        if row['method'] in COMPILED:
            assert float(row['compiled ms']) > 0
            assert re.fullmatch(r'\d+\.\d\dx', row['compiled x frozen BN'])
        else:
            assert (row['compiled ms'], row['compiled x frozen BN']) == ('not run', '-')
    assert table[0]['x frozen BN'] == table[0]['compiled x frozen BN'] == '1.00x'
