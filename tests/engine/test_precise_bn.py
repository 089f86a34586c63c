"""PreciseBN: the recomputed statistics against an independent computation, and
everything else left as it was."""
import copy
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mmengine.model import BaseModel
from mmengine.registry import HOOKS
from torch import nn

from mmnorm import BRN, CBN, MABN, CenConv
from mmnorm.engine.precise_bn import precise_statistics

C = 6


def norm(kind):
    return dict(BN=lambda: nn.BatchNorm2d(C), MABN=lambda: MABN(C, buffer_size=2, warmup_iters=2),
                BRN=lambda: BRN(C, warmup_iters=1, rmax_iters=3, dmax_iters=3),
                CBN=lambda: CBN(C, buffer_num=2))[kind]()


def model_of(kind):
    conv = CenConv if kind == 'MABN' else nn.Conv2d
    return nn.Sequential(conv(3, C, 3, bias=False), norm(kind), nn.ReLU(),
                         conv(C, C, 1, bias=False), norm(kind))


def trained(kind, steps=4):
    torch.manual_seed(0)
    model = model_of(kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        model(torch.randn(2, 3, 6, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.mark.parametrize('kind', ['BN', 'MABN', 'BRN', 'CBN'])
def test_population_statistics_of_the_first_layer_match_a_direct_computation(kind):
    model = trained(kind)
    batches = [torch.randn(2, 3, 6, 6) for _ in range(5)]
    with torch.no_grad():  # the first norm's input is the conv's output: independent of any norm
        x = torch.cat([model[0](b) for b in batches]).double()
    report = precise_statistics(model, batches, num_iters=4)  # the 5th batch is not used
    x = x[:8]
    layer = model[1]
    if kind == 'MABN':
        torch.testing.assert_close(layer.running_var, x.square().mean((0, 2, 3)).float())
    else:
        var, mean = torch.var_mean(x, (0, 2, 3), correction=1)
        torch.testing.assert_close(layer.running_mean, mean.float())
        torch.testing.assert_close(layer.running_var, var.float())
    assert report['iters'] == 4 and report['layers'] == {'1': 4, '4': 4}


def test_second_layer_sees_the_first_in_training_mode():
    # The later layer's statistics are those of its inputs when the earlier
    # layers normalise with batch statistics (training mode), as detectron2.
    model = trained('BN')
    batches = [torch.randn(2, 3, 6, 6) for _ in range(3)]
    reference = copy.deepcopy(model).train()
    inputs = []
    reference[4].register_forward_pre_hook(lambda m, args: inputs.append(args[0].double()))
    with torch.no_grad():
        for b in batches:
            reference(b)
    precise_statistics(model, batches, num_iters=3)
    var, mean = torch.var_mean(torch.cat(inputs), (0, 2, 3), correction=1)
    torch.testing.assert_close(model[4].running_mean, mean.float())
    torch.testing.assert_close(model[4].running_var, var.float())


@pytest.mark.parametrize('kind', ['BN', 'MABN', 'BRN', 'CBN'])
def test_everything_else_is_left_as_it_was(kind):
    model = trained(kind).eval()
    before = copy.deepcopy(model.state_dict())
    batches = [torch.randn(2, 3, 6, 6) for _ in range(3)]
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    expected = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    precise_statistics(model, batches, num_iters=3,
                       forward=lambda m, b: m(b + torch.rand(1)))  # the forward draws too
    assert (torch.rand(3).tolist(), np.random.rand(), random.random()) == (
        expected[0].tolist(), expected[1], expected[2])
    assert not model.training
    for key, value in model.state_dict().items():
        recomputed = key.endswith(('running_mean', 'running_var'))
        if not recomputed:
            assert torch.equal(value, before[key]), key


def test_frozen_layers_and_empty_batches():
    model = trained('BN')
    frozen = model[1]
    model.train = lambda mode=True: (nn.Module.train(model, mode), frozen.eval())[0]  # norm_eval
    frozen_state = copy.deepcopy(frozen.state_dict())
    batches = [torch.randn(2, 3, 6, 6), torch.randn(0, 3, 6, 6), torch.randn(2, 3, 6, 6)]
    report = precise_statistics(model, batches, num_iters=3)
    assert report['layers'] == {'4': 2}  # the frozen layer is left alone; the empty batch skipped
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, frozen_state[key]), key
    empty = precise_statistics(trained('BN'), [torch.randn(0, 3, 6, 6)], num_iters=1)
    assert empty['skipped'] == ['1', '4'] and empty['layers'] == {}


class ToyDetector(BaseModel):
    def __init__(self):
        super().__init__()
        self.body = model_of('MABN')

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.body(torch.stack(inputs) if isinstance(inputs, list) else inputs)
        return dict(loss=out.square().mean()) if mode == 'loss' else out


def test_hook_is_registered_and_recomputes_before_validation_and_at_the_end():
    from mmengine.dataset import pseudo_collate
    hook = HOOKS.build(dict(type='PreciseBNHook', num_iters=2))
    torch.manual_seed(0)
    model = ToyDetector()
    dataset = [dict(inputs=torch.randn(3, 6, 6)) for _ in range(10)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=pseudo_collate)
    runner = SimpleNamespace(model=model, train_dataloader=loader, val_loop=object(), iter=0,
                             train_loop=SimpleNamespace(max_iters=6, val_interval=4,
                                                        val_begin=1))
    for runner.iter in range(6):
        hook.after_train_iter(runner, runner.iter)
    assert len(hook.reports) == 2  # after iteration 4 (validation) and 6 (the last)
    assert hook.reports[0]['layers'] == {'body.1': 2, 'body.4': 2}
    direct = model_of('MABN')
    direct.load_state_dict(model.body.state_dict())
    x = torch.stack([item['inputs'] for item in dataset[:4]])
    with torch.no_grad():
        expected = direct[0](x).double().square().mean((0, 2, 3)).float()
    torch.testing.assert_close(model.body[1].running_var, expected)
    with pytest.raises(ValueError, match='num_iters must be an int >= 1'):
        HOOKS.build(dict(type='PreciseBNHook', num_iters=0))


def _ddp_worker(rank, port, out_dir):
    import torch.distributed as dist

    from conftest import exit_without_teardown
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=2)
    model = trained('BRN')
    torch.manual_seed(10 + rank)  # each process its own batches, of different sizes
    batches = [torch.randn(2 + rank, 3, 6, 6) for _ in range(2)]
    precise_statistics(model, batches, num_iters=2)
    torch.save(dict(state=model.state_dict(), batches=batches), f'{out_dir}/rank{rank}.pt')
    exit_without_teardown()


def test_processes_average_their_statistics(tmp_path):
    import torch.multiprocessing as mp

    from conftest import free_port
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    for key, value in ranks[0]['state'].items():  # every process holds the same
        assert torch.equal(value, ranks[1]['state'][key]), key
    model = trained('BRN')
    with torch.no_grad():
        x = torch.cat([model[0](b) for r in ranks for b in r['batches']]).double()
    var, mean = torch.var_mean(x, (0, 2, 3), correction=1)
    torch.testing.assert_close(ranks[0]['state']['1.running_mean'], mean.float())
    torch.testing.assert_close(ranks[0]['state']['1.running_var'], var.float())
