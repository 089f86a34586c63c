"""tools/benchmark_layers.py runs on a tiny setting and prints the table it
promises: the expected rows and columns, positive numbers, measured ratios and
no aims (docs/gpu_check.md has those); its parts (mmnorm.benchmark.layers) do
what the table says; bfloat16 autocast, channels_last and --compile
(aot_eager on the CPU) add their rows and columns.
No timing assertions: the numbers of a tiny run are noise."""
import re
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmnorm.benchmark import common, layers
from mmnorm.layers import ahead_of_time, launching, paths

from conftest import REPO, load_tool, write_exe

SHAPES = ('res2 stage', 'FPN P3', 'box head', 'mask head')
DETECTION_SHAPES = {'res2 stage': (2, 256, 200, 336), 'stem': (2, 64, 400, 672),
                    'FPN P3': (2, 256, 100, 168), 'res5 stage': (2, 2048, 25, 42),
                    'box head': (512, 256, 7, 7), 'mask head': (128, 256, 14, 14)}
PAIRED_COLUMNS = ('fwd ms (layer / base)', 'fwd+bwd ms (layer / base)', 'eval ms (layer / base)',
                  'saved for backward + output MB (layer / base)')
RATIO_COLUMNS = ('fwd x', 'fwd+bwd x', 'eval x', 'memory x')
HISTORY = 'CBN history MB (layer / base)'
COMPILED = 'compiled fwd+bwd ms (layer / base)'
COMPILED_RATIOS = ('layer compiled / eager x', 'compiled fwd+bwd x')
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
TINY = ['--scale', '0.05', '--repeats', '1', '--min-time', '0', '--warmup', '1', '--threads', '1']


@pytest.fixture(scope='module')
def tool():
    return load_tool('benchmark_layers')


def numbers(cell):
    return [float(v) for v in re.findall(r'\d+(?:\.\d+)?', cell)]


@pytest.mark.end_to_end
def test_tiny_run(tool, tmp_path, capsys, keep_threads):
    out = tmp_path / 'docs' / 'bench.md'
    argv = TINY + ['--layers', 'MABN', 'wsconv', '--out', str(out)]
    markdown = tool.main(argv)
    assert markdown in capsys.readouterr().out
    assert out.read_text() == markdown
    assert out.with_suffix('.png').read_bytes().startswith(PNG_SIGNATURE)
    assert '--layers MABN wsconv' in markdown and 'torch ' in markdown

    table, = common.markdown_tables(markdown)  # measured ratios only: no aims table
    for column in ('layer', 'baseline', 'shape', 'dtype', 'memory format',
                   'buffers MB (layer / base)', HISTORY, layers.OPS_COLUMN,
                   layers.PROGRAMS_COLUMN, *PAIRED_COLUMNS, *RATIO_COLUMNS):
        assert column in table[0]
    header = list(table[0])  # the programs beside the operators and launches
    assert header.index(layers.PROGRAMS_COLUMN) == header.index(layers.OPS_COLUMN) + 1
    assert COMPILED not in table[0]  # only with --compile
    assert 'aim' not in table[0] and not re.search(r'\b(aim|met|MISSED)\b', markdown)
    assert [(r['layer'], r['baseline']) for r in table] == (
        [('MABN', 'BN')] * 4 + [('WSConv', 'Conv')] * 4)
    for row, shape in zip(table, SHAPES * 2, strict=True):
        assert row['shape'].startswith(shape)
        assert (row['dtype'], row['memory format']) == ('float32', 'contiguous')
        for column in PAIRED_COLUMNS:
            layer, base = numbers(row[column])
            assert layer > 0 and base > 0, (row, column)
        for column in RATIO_COLUMNS:  # a ratio of noise may round to 0.00x: format only
            assert re.fullmatch(r'\d+\.\d\dx', row[column]), (row, column)
        assert row[HISTORY] == '-'  # no CBN in these rows
        layer_ops, base_ops = (side.split('+') for side in row[layers.OPS_COLUMN].split(' / '))
        assert all(int(n) > 0 for n in layer_ops + base_ops), row
        # BatchNorm2d, WSConv and Conv2d launch no Triton kernel; MABN only on the fused path
        # (on the CPU: MMNORM_KERNELS=triton under TRITON_INTERPRET=1)
        if row['layer'] == 'MABN' and paths.fused(torch.empty(0)):
            assert re.fullmatch(r'[1-9]\d* / -', row[layers.PROGRAMS_COLUMN]), row
        else:
            assert row[layers.PROGRAMS_COLUMN] == '-', row

    # --plot-from reads the ratios back from the written table and redraws the plot.
    points = layers.points_from_markdown(markdown)
    assert [(label, shape) for label, shape, _ in points] == (
        [('MABN\nvs BN\nfloat32\ncontiguous', s) for s in SHAPES]
        + [('WSConv\nvs Conv\nfloat32\ncontiguous', s) for s in SHAPES])
    for (_, _, ratios), row in zip(points, table, strict=True):
        assert ratios == {'fwd+bwd': float(row['fwd+bwd x'].rstrip('x')),
                          'eval': float(row['eval x'].rstrip('x'))}
    out.with_suffix('.png').unlink()
    assert tool.main(['--plot-from', str(out)]) is None
    assert out.with_suffix('.png').read_bytes().startswith(PNG_SIGNATURE)


def test_ops_per_step_counts_each_dispatched_operation():
    """A forward through two BatchNorm2d dispatches twice the operations of a
    forward through one, and its backward more (the input's gradient is
    accumulated once either way); a module that adds a constant dispatches one
    more forward operation than the same module without."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    grad_for = layers.incoming_grad(torch.randn(2, 4, 3, 3))

    def count(module):
        return layers.ops_per_step(module, x, grad_for, layers.forward_context(x.device,
                                                                                'float32'))

    one = count(nn.BatchNorm2d(4))
    assert one[0] > 0 and one[1] > 0
    two = count(nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4)))
    assert two[0] == 2 * one[0] and one[1] < two[1] <= 2 * one[1]

    class PlusOne(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) + 1

    assert count(PlusOne(4))[0] == one[0] + 1


class FakeKernel:
    """Stands for a Triton kernel: ``kernel[grid](*args)`` does nothing."""
    __name__ = 'fake_kernel'

    def __getitem__(self, grid):
        return lambda *args, **constants: None


NO_TRITON = paths.triton_problem()


@pytest.mark.skipif(NO_TRITON is not None, reason=f'the Triton modules need Triton: {NO_TRITON}')
def test_launch_grids_records_and_restores_every_module():
    """launch_grids wraps the ``launch`` name of each mmnorm.layers.*.kernels
    module imported so far: every launch's grid is recorded (the kernel still
    launched, counted in LAUNCHES) and the names are restored after, also on
    an error."""
    modules = [ahead_of_time.kernel_modules()[name] for name in ahead_of_time.KERNEL_MODULES]
    assert [m.__name__ for m in modules] == list(layers.TRITON_MODULES)
    originals = [m.launch for m in modules]
    x = torch.zeros(1)
    before = launching.LAUNCHES.count
    with layers.launch_grids() as grids:
        for i, module in enumerate(modules):
            module.launch(FakeKernel(), (i + 2, 3), x)
    assert grids == [(2, 3), (3, 3), (4, 3), (5, 3)]
    assert launching.LAUNCHES.count == before + 4
    assert [m.launch for m in modules] == originals
    with pytest.raises(ZeroDivisionError), layers.launch_grids(grids):
        modules[0].launch(FakeKernel(), (7,), x)
        raise ZeroDivisionError
    assert grids[-1] == (7,) and [m.launch for m in modules] == originals
    assert layers.fewest_programs(grids) == 6 and layers.fewest_programs([]) is None


@pytest.mark.skipif(NO_TRITON is not None, reason=f'the Triton modules need Triton: {NO_TRITON}')
def test_programs_column_gives_the_smallest_grid_of_a_step():
    """A layer whose step launches grids of 3 x 5 and 2 x 4 programs (through
    the shared kernels' ``launch``) gets 8 in the programs column, its
    BatchNorm2d baseline none ('-'); a row with no launch on either side '-'."""
    shared = ahead_of_time.kernel_modules()['shared']

    class Launching(nn.BatchNorm2d):
        def forward(self, x):
            shared.launch(FakeKernel(), (3, 5), x)
            shared.launch(FakeKernel(), (2, 4), x)
            return super().forward(x)

    args = SimpleNamespace(warmup=0, repeats=1, min_time=0, compile=False)
    shape = layers.make_shapes(0.05)[2]
    row = layers.Row('Launching', 'BN', lambda shape: Launching(shape.size[1]), layers.bn)
    result = layers.measure(row, shape, args, torch.device('cpu'))
    assert not result.error
    assert (result.layer['programs'], result.baseline['programs']) == (8, None)
    plain = layers.measure(layers.Row('BN', 'BN', layers.bn, layers.bn), shape, args,
                           torch.device('cpu'))
    table, = common.markdown_tables('\n'.join(layers.table([result, plain], torch.device('cpu'))))
    assert [r[layers.PROGRAMS_COLUMN] for r in table] == ['8 / -', '-']


@pytest.mark.end_to_end
def test_tiny_run_bfloat16_channels_last_compiled(tool, tmp_path, keep_threads):
    """--dtype float32 bfloat16 --memory-format channels_last --compile
    (backend aot_eager: no C++ compiler needed): a set of rows per dtype, the
    compiled columns with positive numbers, the plot."""
    out = tmp_path / 'bench.md'
    markdown = tool.main(TINY + ['--layers', 'MABN', 'WSConv', '--dtype', 'float32', 'bfloat16',
                                 '--memory-format', 'channels_last', '--compile',
                                 '--compile-backend', 'aot_eager', '--out', str(out)])
    assert "torch.autocast('cpu', dtype=torch.bfloat16)" in markdown
    assert "backend='aot_eager'" in markdown
    table, = common.markdown_tables(markdown)
    assert [(r['layer'], r['dtype'], r['memory format']) for r in table] == [
        (layer, dtype, 'channels_last') for dtype in ('float32', 'bfloat16')
        for layer in ('MABN', 'WSConv') for _ in SHAPES]
    for row in table:
        for column in PAIRED_COLUMNS + (COMPILED,):
            layer, base = numbers(row[column])
            assert layer > 0 and base > 0, (row, column)
        for column in RATIO_COLUMNS + COMPILED_RATIOS:
            assert re.fullmatch(r'\d+\.\d\dx', row[column]), (row, column)

    labels = [label for label, _, _ in layers.points_from_markdown(markdown)]
    assert list(dict.fromkeys(labels)) == [
        f'{layer}\nvs {base}\n{dtype}\nchannels_last' for dtype in ('float32', 'bfloat16')
        for layer, base in (('MABN', 'BN'), ('WSConv', 'Conv'))]
    assert out.with_suffix('.png').read_bytes().startswith(PNG_SIGNATURE)


def test_measure_autocast_and_channels_last():
    """bfloat16 runs the forwards under autocast, channels_last converts the
    input, the module and the incoming gradient; float32 contiguous does neither."""
    seen = []

    class Probe(nn.Conv2d):
        def forward(self, x):
            y = super().forward(x)
            seen.append((x.is_contiguous(memory_format=torch.channels_last),
                         self.weight.is_contiguous(memory_format=torch.channels_last), y.dtype))
            if y.requires_grad:
                y.register_hook(lambda g: seen.append(
                    ('grad', g.is_contiguous(memory_format=torch.channels_last), g.dtype)))
            return y

    row = layers.Row('Probe', 'Conv', lambda shape: layers.conv(shape, Probe), layers.conv,
                     conv_input=True)
    shape = layers.make_shapes(0.05)[1]  # 3x3 conv: channels_last is not also contiguous
    args = SimpleNamespace(warmup=0, repeats=1, min_time=0, compile=False)
    for dtype, memory_format, expected in (
            ('bfloat16', 'channels_last', {(True, True, torch.bfloat16),
                                           ('grad', True, torch.bfloat16)}),
            ('float32', 'contiguous', {(False, False, torch.float32),
                                       ('grad', False, torch.float32)})):
        seen.clear()
        result = layers.measure(row, shape, args, torch.device('cpu'), dtype, memory_format)
        assert not result.error and (result.dtype, result.memory_format) == (dtype, memory_format)
        assert set(seen) == expected, (dtype, memory_format)


def test_compile_failure_is_a_cell(tool, keep_threads):
    """A layer that does not compile (here: no such backend) gets its error in
    the compiled cell; its eager numbers are still there."""
    markdown = tool.main(TINY + ['--layers', 'BRN', '--compile',
                                 '--compile-backend', 'no_such_backend'])
    table, = common.markdown_tables(markdown)
    assert len(table) == 4
    for row in table:
        assert row[COMPILED].startswith('compile failed: layer: InvalidBackend'), row
        assert [row[column] for column in COMPILED_RATIOS] == ['', '']
        assert min(numbers(row['fwd+bwd ms (layer / base)'])) > 0


def test_compiled_warmup_until_nothing_compiles(monkeypatch):
    """A layer that recompiles at every call (its forward reads the length of
    a tuple that grows) is warmed up beyond COMPILE_WARMUP calls, until dynamo
    stops compiling it; if the warm-up ends first, the cell says how many
    frames compiled while timed."""
    class Growing(nn.Conv2d):
        seen = ()

        def forward(self, x):
            self.seen = self.seen + (None,)
            return super().forward(x) * len(self.seen)

    built = []

    def build(shape):
        built.append(layers.conv(shape, Growing))
        return built[-1]

    row = layers.Row('Growing', 'Conv', build, layers.conv, conv_input=True)
    shape = layers.make_shapes(0.05)[2]
    args = SimpleNamespace(warmup=0, repeats=2, min_time=0, compile=True,
                           compile_backend='aot_eager')
    result = layers.measure(row, shape, args, torch.device('cpu'))
    assert not result.error and len(result.compiled) == 2
    eager_calls = 2 + 1 + 2  # timed training steps, the memory step, timed eval forwards
    assert len(built[0].seen) - eager_calls > layers.COMPILE_WARMUP + args.repeats + 5
    monkeypatch.setattr(layers, 'MAX_COMPILE_WARMUP', 3)
    result = layers.measure(row, shape, args, torch.device('cpu'))
    cells = layers.compiled_cells(result)
    assert re.fullmatch(r'[\d.]+ / [\d.]+ \(compiled [1-9]\d* frames while timed\)', cells[0])


def test_help_shows_defaults(tool, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        tool.parse_args(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    for default in ('(default: 0.5)', '(default: 5)', '(default: 2)', "(default: ['float32'])",
                    '(default: default)',
                    "(default: ['contiguous'])", '(default: inductor)', '(default: False)',
                    '(default: 1.0 on the CPU, 0.05 on CUDA)'):
        assert default in text, default
    assert re.search(r'--device DEVICE where to run: cpu, cuda', text)
    assert tool.parse_args(['--device', 'cpu']).min_time == 1.0
    assert tool.parse_args(['--device', 'cpu', '--min-time', '0.2']).min_time == 0.2
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert tool.parse_args(['--device', 'cuda']).min_time == 0.05


def test_cuda_header(tmp_path, monkeypatch):
    """The CUDA header names GPU, driver, CUDA, cuDNN and the date; the CPU
    header the thread count."""
    write_exe(tmp_path / 'nvidia-smi', '#!/bin/sh\necho 580.159.04\n')
    monkeypatch.setenv('PATH', str(tmp_path))
    assert common.driver_version() == '580.159.04'
    monkeypatch.setenv('PATH', str(tmp_path / 'nothing'))
    assert common.driver_version() == 'unknown'
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'NVIDIA H100 80GB HBM3')
    text = layers.device_text(torch.device('cuda'))
    for part in ('device cuda (NVIDIA H100 80GB HBM3, driver unknown', f'CUDA {torch.version.cuda}',
                 'cuDNN', f'measured {time.strftime("%Y-%m-%d")}'):
        assert part in text, text
    threads = torch.get_num_threads()
    assert layers.device_text(torch.device('cpu')) == f'device cpu, {threads} threads'


def test_plot_from_the_committed_table():
    """docs/layer_benchmark.md gives its points (float32, contiguous, every shape)."""
    points = layers.points_from_markdown((REPO / 'docs' / 'layer_benchmark.md').read_text())
    assert points and all(label.endswith('\nfloat32\ncontiguous') for label, _, _ in points)
    assert {shape for _, shape, _ in points} == set(SHAPES)
    assert all(ratio > 0 for _, _, ratios in points for ratio in ratios.values())


def test_cbn_rows(tool, keep_threads):
    """Conv+CBN against conv+BN and against the two-autograd.grad reference,
    with the history each side holds."""
    markdown = tool.main(TINY + ['--layers', 'Conv+CBN', 'conv+cbn-vs-grad'])
    table, = common.markdown_tables(markdown)
    assert [(r['layer'], r['baseline']) for r in table] == (
        [('Conv+CBN', 'Conv+BN')] * 4 + [('Conv+CBN', 'Conv+CBN(autograd.grad)')] * 4)
    for row in table:
        assert 'not measured' not in row['fwd ms (layer / base)'], row
        for column in PAIRED_COLUMNS:
            assert min(numbers(row[column])) > 0, (row, column)
        for column in RATIO_COLUMNS:
            assert re.fullmatch(r'\d+\.\d\dx', row[column]), (row, column)
    for row in table[:4]:
        assert re.fullmatch(r'\d+\.\d+ / -', row[HISTORY]) and numbers(row[HISTORY])[0] > 0
    for row in table[4:]:
        cbn, reference = numbers(row[HISTORY])
        assert 0 < cbn < reference, row  # the reference keeps dmu weight-sized


def test_reference_matches_cbn():
    """The reference computes CBN's compensated statistics: same outputs,
    input and weight gradients and running statistics as conv + mmnorm's CBN
    over steps whose conv weight moves (float64), and the history sizes the
    table reports."""
    import copy

    import torch
    from torch import nn

    from mmnorm.layers.cbn import CBN
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False).double()
    cbn = nn.Sequential(copy.deepcopy(conv), CBN(5, buffer_num=3).double())
    reference = layers.TwoGradCBN(copy.deepcopy(conv), buffer_num=3).double()
    naive = layers.TwoGradCBN(copy.deepcopy(conv), buffer_num=3, rho=0.0).double()
    convs = (cbn[0], reference.conv, naive.conv)
    for step in range(6):
        x = (torch.randn(2, 3, 6, 6, dtype=torch.float64) * 2 + 1).requires_grad_()
        grad = torch.randn(2, 5, 6, 6, dtype=torch.float64)
        results = []
        for module, layer_conv in zip((cbn, reference, naive), convs):
            module.zero_grad()
            x.grad = None
            y = module(x)
            y.backward(grad)
            results.append((y.detach(), x.grad.clone(), layer_conv.weight.grad.clone()))
        for mine, theirs in zip(results[0], results[1]):
            torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-9)
        if step >= 1:  # the past is used, and compensation changes it
            assert not torch.allclose(results[0][0], results[2][0], rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            delta = 0.05 * torch.randn_like(conv.weight)
            for layer_conv in convs:
                layer_conv.weight.add_(delta)
    torch.testing.assert_close(cbn[1].running_mean, reference.running_mean)
    torch.testing.assert_close(cbn[1].running_var, reference.running_var)
    common.check_history_full(reference)
    k, c, weight = 3, 5, conv.weight.numel()
    # float64 mu, nu (C each), dmu (in x kh x kw), dnu and theta (weight-sized),
    # and the int64 per-channel valid flags, per stored step
    assert layers.history_bytes(cbn) == k * 8 * (2 * c + 3 * 3 * 3 + 2 * weight + c)
    assert layers.history_bytes(reference) == k * 8 * (2 * c + 3 * weight)


def test_shapes_scale():
    full = {s.name: s.size for s in layers.make_shapes(1.0)}
    assert full == {'res2 stage': (2, 256, 200, 336), 'FPN P3': (2, 256, 100, 168),
                    'box head': (512, 256, 7, 7), 'mask head': (128, 256, 14, 14)}
    half = {s.name: s.size for s in layers.make_shapes(0.5)}
    assert half['box head'] == (128, 256, 7, 7) and half['res2 stage'][:2] == (2, 256)
    detection = layers.make_shapes(1.0, 'detection')
    assert {s.name: s.size for s in detection} == DETECTION_SHAPES
    assert [s.name for s in detection] == list(DETECTION_SHAPES)
    convs = {s.name: (s.conv_in, s.kernel) for s in detection}
    assert convs['stem'] == (3, 7) and convs['res5 stage'] == (512, 1)
    assert [s.size for s in detection if s.name in full] == list(full.values())


def test_detection_shapes_option(tool):
    """--shapes detection: a row per layer at each of the six shapes."""
    assert tool.parse_args([]).shapes == 'default'
    markdown = tool.main(TINY + ['--layers', 'BRN', '--shapes', 'detection'])
    table, = common.markdown_tables(markdown)
    assert [r['shape'].rsplit(' ', 1)[0] for r in table] == list(DETECTION_SHAPES)
    assert all(min(numbers(r['fwd+bwd ms (layer / base)'])) > 0 for r in table)
    assert '- res5 stage: norm input (2, 2048, 2, 3); conv 1x1 512 -> 2048' in markdown
    with pytest.raises(SystemExit):
        tool.parse_args(['--shapes', 'all'])


def test_failing_layer_becomes_a_row(tool, monkeypatch):
    """A layer that cannot be built (e.g. cbn.py mid-edit) is reported, not fatal."""
    def broken(shape):
        raise ImportError('cannot import name CBN')

    row = layers.Row('Conv+CBN', 'Conv+BN', broken, layers.bn)
    monkeypatch.setattr(layers, 'ROWS', [row] + [r for r in layers.ROWS if r.name == 'BRN'])
    markdown = tool.main(['--scale', '0.05', '--repeats', '1', '--min-time', '0', '--warmup', '0'])
    table, = common.markdown_tables(markdown)
    assert [r['layer'] for r in table] == ['Conv+CBN'] * 4 + ['BRN'] * 4
    assert all('not measured: ImportError: cannot import name CBN' in r['fwd ms (layer / base)']
               for r in table[:4])
    assert all(min(numbers(r['fwd+bwd ms (layer / base)'])) > 0 for r in table[4:])
    # the plot leaves the rows that were not measured out
    assert [label.split('\n')[0] for label, _, _ in layers.points_from_markdown(markdown)] == (
        ['BRN'] * 4)


def test_unknown_layer_is_an_error(tool):
    with pytest.raises(SystemExit):
        tool.main(['--layers', 'NoSuchNorm'])
