"""mmnorm.benchmark.common, what the three benchmarks share: the one ratio and
its cells, reading and finding a table, error cells and rows, the synthetic
boxes and the alternated medians."""
import math

import pytest
import torch

from mmnorm.benchmark import common


def test_ratio_and_its_cell():
    assert common.ratio(3, 2) == 1.5
    for value, base in ((None, 2), (3, None), (3, 0), (math.nan, 2), (3, math.nan)):
        assert math.isnan(common.ratio(value, base)), (value, base)
    assert common.fmt_ratio(common.ratio(1, 3)) == '0.33x'
    assert common.fmt_ratio(math.nan) == '-'
    assert common.read_ratio('0.33x') == 0.33
    for cell in ('-', '', 'not measured (--skip-memory)'):
        assert math.isnan(common.read_ratio(cell))


def test_markdown_tables_reads_what_markdown_table_writes():
    from mmnorm.studies.results import markdown_table
    text = ('intro\n\n' + markdown_table(['a', 'b x'], [[1, '2.00x'], ['', '-']])
            + '\nbetween\n\n' + markdown_table(['c'], [['3']]))
    assert common.markdown_tables(text) == [[{'a': '1', 'b x': '2.00x'}, {'a': '', 'b x': '-'}],
                                            [{'c': '3'}]]


def test_find_table_by_its_columns_and_a_failed_row():
    from mmnorm.studies.results import markdown_table
    text = (markdown_table(['a'], [['1']]) + '\n'
            + markdown_table(['a', 'b', 'c'], [common.not_measured(['x'], 'E', 3)]))
    assert common.find_table(text, ('a', 'b')) == [{'a': 'x', 'b': 'not measured: E', 'c': ''}]
    with pytest.raises(ValueError, match='no table with the columns a, d'):
        common.find_table(text, ('a', 'd'))


def test_boxes_and_masks_fill_the_image():
    boxes, masks = common.boxes_and_masks(50, (40, 60), torch.Generator().manual_seed(0))
    assert boxes.shape == (50, 4) and masks.shape == (50, 40, 60) and masks.dtype == torch.uint8
    sides = boxes[:, 2:] - boxes[:, :2]
    assert (boxes >= 0).all() and (boxes[:, 2] <= 60).all() and (boxes[:, 3] <= 40).all()
    assert (sides >= torch.tensor([6, 4])).all() and (sides <= torch.tensor([30, 20])).all()
    assert torch.equal(masks.sum((1, 2)).float(), sides.prod(1))


def test_describe_error_is_one_cell():
    assert common.describe_error(ValueError('a | b\nsecond')) == 'ValueError: a / b'
    announced = RuntimeError("backend='inductor' raised:\nRuntimeError: no compiler\nthird")
    assert common.describe_error(announced) == (
        "RuntimeError: backend='inductor' raised: RuntimeError: no compiler")
    assert len(common.describe_error(ValueError('x' * 500), 50)) == 50


def test_median_times_alternates_and_takes_medians():
    calls = []

    def step(item):
        calls.append(item)
        return (len(calls), -len(calls))

    medians = common.median_times(['a', 'b'], step, [1, 0], repeats=3)
    # one warm-up call of 'a', then rounds a b, b a, a b
    assert calls == ['a', 'a', 'b', 'b', 'a', 'a', 'b']
    assert medians == [[5, -5], [4, -4]]
