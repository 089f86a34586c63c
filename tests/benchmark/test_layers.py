"""tools/benchmark_layers.py runs on a tiny setting and prints the table it
promises: the expected rows and columns, positive numbers, the aims summary;
its parts (mmnorm.benchmark.layers) do what the table says.
No timing assertions: the numbers of a tiny run are noise."""
import re

import pytest
from conftest import load_tool

from mmnorm.benchmark import layers

SHAPES = ('res2 stage', 'FPN P3', 'box head', 'mask head')
PAIRED_COLUMNS = ('fwd ms (layer / base)', 'fwd+bwd ms (layer / base)', 'eval ms (layer / base)',
                  'saved for backward + output MB (layer / base)')
RATIO_COLUMNS = ('fwd x', 'fwd+bwd x', 'eval x', 'memory x')
HISTORY = 'CBN history MB (layer / base)'
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
TINY = ['--scale', '0.05', '--repeats', '1', '--min-time', '0', '--warmup', '1', '--threads', '1']


@pytest.fixture(scope='module')
def tool():
    return load_tool('benchmark_layers')


def parse_tables(markdown):
    """Every markdown table in ``markdown`` as a list of dicts (header -> cell)."""
    tables, rows = [], None
    for line in markdown.splitlines():
        if not line.startswith('|'):
            rows = None
            continue
        cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
        if rows is None:
            rows = {'header': cells, 'rows': []}
            tables.append(rows)
        elif not set(''.join(cells)) <= set('-'):
            rows['rows'].append(dict(zip(rows['header'], cells)))
    return tables


def numbers(cell):
    return [float(v) for v in re.findall(r'\d+(?:\.\d+)?', cell)]


def test_tiny_run(tool, tmp_path, capsys, keep_threads):
    out = tmp_path / 'docs' / 'bench.md'
    argv = TINY + ['--layers', 'MABN', 'wsconv', '--out', str(out)]
    markdown = tool.main(argv)
    assert markdown in capsys.readouterr().out
    assert out.read_text() == markdown
    assert out.with_suffix('.png').read_bytes().startswith(PNG_SIGNATURE)
    assert '--layers MABN wsconv' in markdown and 'torch ' in markdown

    table, aims = parse_tables(markdown)
    for column in ('layer', 'baseline', 'shape', 'aim', 'buffers MB (layer / base)', HISTORY,
                   *PAIRED_COLUMNS, *RATIO_COLUMNS):
        assert column in table['header']
    assert [(r['layer'], r['baseline']) for r in table['rows']] == (
        [('MABN', 'BN')] * 4 + [('WSConv', 'Conv')] * 4)
    for row, shape in zip(table['rows'], SHAPES * 2, strict=True):
        assert row['shape'].startswith(shape)
        for column in PAIRED_COLUMNS:
            layer, base = numbers(row[column])
            assert layer > 0 and base > 0, (row, column)
        for column in RATIO_COLUMNS:  # a ratio of noise may round to 0.00x: format only
            assert re.fullmatch(r'\d+\.\d\dx', row[column]), (row, column)
        assert re.search(r'(met|MISSED)', row['aim'])
        assert row[HISTORY] == '-'  # no CBN in these rows

    assert aims['header'] == ['layer', 'aim', 'ratio per shape', 'worst', 'verdict']
    assert [(r['layer'], r['aim']) for r in aims['rows']] == [
        ('MABN', 'fwd+bwd <= 1.5x'), ('WSConv', 'fwd+bwd <= 1.1x'),
        ('WSConv', 'eval = 1.0x (<= 1.05x, noise)')]
    assert all(r['verdict'] in ('met', 'MISSED') for r in aims['rows'])

    # --plot-from reads the ratios back from the written table and redraws the plot.
    points = layers.points_from_markdown(markdown)
    assert [(row.name, shape) for row, shape, _ in points] == (
        [('MABN', s) for s in SHAPES] + [('WSConv', s) for s in SHAPES])
    for (_, _, ratios), row in zip(points, table['rows']):
        assert ratios == {'fwd+bwd': float(row['fwd+bwd x'].rstrip('x')),
                          'eval': float(row['eval x'].rstrip('x'))}
    out.with_suffix('.png').unlink()
    assert tool.main(['--plot-from', str(out)]) is None
    assert out.with_suffix('.png').read_bytes().startswith(PNG_SIGNATURE)


def test_cbn_rows(tool, keep_threads):
    """Conv+CBN against conv+BN (with the aim) and against the two-autograd.grad
    reference, with the history each side holds."""
    markdown = tool.main(TINY + ['--layers', 'Conv+CBN', 'conv+cbn-vs-grad'])
    table, aims = parse_tables(markdown)
    assert [(r['layer'], r['baseline']) for r in table['rows']] == (
        [('Conv+CBN', 'Conv+BN')] * 4 + [('Conv+CBN', 'Conv+CBN(autograd.grad)')] * 4)
    for row in table['rows']:
        assert 'not measured' not in row['fwd ms (layer / base)'], row
        for column in PAIRED_COLUMNS:
            assert min(numbers(row[column])) > 0, (row, column)
        for column in RATIO_COLUMNS:
            assert re.fullmatch(r'\d+\.\d\dx', row[column]), (row, column)
    for row in table['rows'][:4]:
        assert re.fullmatch(r'\d+\.\d+ / -', row[HISTORY]) and numbers(row[HISTORY])[0] > 0
        assert re.search(r'(met|MISSED)', row['aim'])
    for row in table['rows'][4:]:
        cbn, reference = numbers(row[HISTORY])
        assert 0 < cbn < reference, row  # the reference keeps dmu weight-sized
        assert row['aim'] == '-'
    assert [(r['layer'], r['aim']) for r in aims['rows']] == [('Conv+CBN', 'fwd+bwd <= 1.6x')]


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
    layers.check_history_full(reference)
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


def test_failing_layer_becomes_a_row(tool, monkeypatch):
    """A layer that cannot be built (e.g. cbn.py mid-edit) is reported, not fatal."""
    def broken(shape):
        raise ImportError('cannot import name CBN')

    row = layers.Row('Conv+CBN', 'Conv+BN', broken, layers.bn,
                     aims=(layers.Aim('fwd+bwd', 1.6, 'fwd+bwd <= 1.6x'),))
    monkeypatch.setattr(layers, 'ROWS', [row] + [r for r in layers.ROWS if r.name == 'BRN'])
    markdown = tool.main(['--scale', '0.05', '--repeats', '1', '--min-time', '0', '--warmup', '0'])
    table, aims = parse_tables(markdown)
    assert [r['layer'] for r in table['rows']] == ['Conv+CBN'] * 4 + ['BRN'] * 4
    assert all('not measured: ImportError: cannot import name CBN' in r['fwd ms (layer / base)']
               for r in table['rows'][:4])
    assert all(min(numbers(r['fwd+bwd ms (layer / base)'])) > 0 for r in table['rows'][4:])
    assert aims['rows'][0]['verdict'] == 'not measured'
    # the plot leaves the rows that were not measured out
    assert [row.name for row, _, _ in layers.points_from_markdown(markdown)] == ['BRN'] * 4


def test_unknown_layer_is_an_error(tool):
    with pytest.raises(SystemExit):
        tool.main(['--layers', 'NoSuchNorm'])
