"""tools/benchmark_layers.py runs on a tiny setting and prints the table it
promises: the expected rows and columns, positive numbers, the aims summary.
No timing assertions: the numbers of a tiny run are noise."""
import importlib.util
import re

import pytest
from conftest import REPO

SCRIPT = REPO / 'tools' / 'benchmark_layers.py'
SHAPES = ('res2 stage', 'FPN P3', 'box head', 'mask head')
PAIRED_COLUMNS = ('fwd ms (layer / base)', 'fwd+bwd ms (layer / base)', 'eval ms (layer / base)',
                  'saved for backward + output MB (layer / base)')
RATIO_COLUMNS = ('fwd x', 'fwd+bwd x', 'eval x', 'memory x')


@pytest.fixture(scope='module')
def bench():
    spec = importlib.util.spec_from_file_location('benchmark_layers', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.fixture
def keep_threads():
    import torch
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tiny_run(bench, tmp_path, capsys, keep_threads):
    out = tmp_path / 'docs' / 'bench.md'
    argv = ['--scale', '0.05', '--repeats', '1', '--min-time', '0', '--warmup', '1',
            '--threads', '1', '--layers', 'MABN', 'wsconv', '--out', str(out)]
    markdown = bench.main(argv)
    assert markdown in capsys.readouterr().out
    assert out.read_text() == markdown
    assert '--layers MABN wsconv' in markdown and 'torch ' in markdown

    table, aims = parse_tables(markdown)
    for column in ('layer', 'baseline', 'shape', 'aim', 'buffers MB (layer / base)',
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

    assert aims['header'] == ['layer', 'aim', 'ratio per shape', 'worst', 'verdict']
    assert [(r['layer'], r['aim']) for r in aims['rows']] == [
        ('MABN', 'fwd+bwd <= 1.5x'), ('WSConv', 'fwd+bwd <= 1.1x'),
        ('WSConv', 'eval = 1.0x (<= 1.05x, noise)')]
    assert all(r['verdict'] in ('met', 'MISSED') for r in aims['rows'])


def test_shapes_scale(bench):
    full = {s.name: s.size for s in bench.make_shapes(1.0)}
    assert full == {'res2 stage': (2, 256, 200, 336), 'FPN P3': (2, 256, 100, 168),
                    'box head': (512, 256, 7, 7), 'mask head': (128, 256, 14, 14)}
    half = {s.name: s.size for s in bench.make_shapes(0.5)}
    assert half['box head'] == (128, 256, 7, 7) and half['res2 stage'][:2] == (2, 256)


def test_failing_layer_becomes_a_row(bench, monkeypatch):
    """A layer that cannot be built (e.g. cbn.py mid-edit) is reported, not fatal."""
    def broken(shape):
        raise ImportError('cannot import name CBN')

    row = bench.Row('Conv+CBN', 'Conv+BN', broken, bench.bn,
                    aims=(bench.Aim('fwd+bwd', 1.6, 'fwd+bwd <= 1.6x'),))
    monkeypatch.setattr(bench, 'ROWS', [row] + [r for r in bench.ROWS if r.name == 'BRN'])
    markdown = bench.main(['--scale', '0.05', '--repeats', '1', '--min-time', '0', '--warmup', '0'])
    table, aims = parse_tables(markdown)
    assert [r['layer'] for r in table['rows']] == ['Conv+CBN'] * 4 + ['BRN'] * 4
    assert all('not measured: ImportError: cannot import name CBN' in r['fwd ms (layer / base)']
               for r in table['rows'][:4])
    assert all(min(numbers(r['fwd+bwd ms (layer / base)'])) > 0 for r in table['rows'][4:])
    assert aims['rows'][0]['verdict'] == 'not measured'


def test_unknown_layer_is_an_error(bench):
    with pytest.raises(SystemExit):
        bench.main(['--layers', 'NoSuchNorm'])
