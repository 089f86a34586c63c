"""mmnorm.benchmark.common, what the three benchmarks share: the one ratio and
its cells, reading a table back, error cells and the alternated medians."""
import math

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
