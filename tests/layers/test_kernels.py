"""Which path the layers take, and the log line that says so (on every stack:
the torch 2.1 stack has Triton 2.1 and no custom_op, so it takes ATen's)."""
import mmengine.logging
import torch

from mmnorm import MABN
from mmnorm.layers import paths


def test_the_log_says_once_which_path_and_why(monkeypatch):
    mmengine.logging.MMLogger.get_instance('test_kernels')  # as a Runner makes before its model
    logged = []
    monkeypatch.setattr(mmengine.logging, 'print_log', lambda msg, **kw: logged.append(msg))
    monkeypatch.delenv(paths.KERNELS_ENV, raising=False)
    try:
        reason = paths.select()
        MABN(4)
        MABN(4)
    finally:
        paths.select()
    assert logged == [reason]
    problem = paths.triton_problem()
    if problem is None:
        assert reason == ('mmnorm layers: CUDA tensors take the fused Triton kernels, other '
                          'devices the ATen path')
    else:
        assert reason == f'mmnorm layers: every layer takes the ATen path: {problem}'
        assert not paths.fused(torch.empty(1, device='meta'))
    if torch.__version__.startswith('2.1.'):
        assert 'Triton 2.1.0 is older than 3.0' in reason and 'custom_op' in reason
    assert not paths.fused(torch.empty(1))  # CPU tensors: ATen unless asked for


def test_aten_is_chosen_by_name(monkeypatch):
    monkeypatch.setenv(paths.KERNELS_ENV, 'aten')
    try:
        assert paths.select() == ('mmnorm layers: MMNORM_KERNELS=aten: every layer takes '
                                     'the ATen path')
        assert paths._PATHS == {}
    finally:
        monkeypatch.delenv(paths.KERNELS_ENV)
        paths.select()


def test_without_an_mmengine_logger_python_logging_gets_it(monkeypatch, caplog):
    # A plain script's stdout stays its own: the line goes to logging.getLogger('mmnorm').
    monkeypatch.setattr(mmengine.logging.MMLogger, '_instance_dict', {})
    try:
        reason = paths.select()
        with caplog.at_level('INFO', logger='mmnorm'):
            MABN(4)
    finally:
        paths.select()
    assert [r.getMessage() for r in caplog.records if r.name == 'mmnorm'] == [reason]


def test_every_planted_bug_of_the_mutation_check_is_still_in_the_kernels():
    # tools/mutation_check.py plants each bug by replacing an exact snippet: a
    # kernel change that drops one must update the list (and the list its tests)
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location('mutation_check',
                                                  root / 'tools' / 'mutation_check.py')
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert len(check.BUGS) >= 19
    for name, (file, snippet, replacement) in check.BUGS.items():
        text = (root / 'mmnorm' / 'layers' / file).read_text()
        assert text.count(snippet) == 1 and snippet != replacement, name
