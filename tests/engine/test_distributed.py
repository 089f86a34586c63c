"""mmnorm.engine.distributed, in process and in a one-process group (the
tools that use it run end to end in tests/test_tools.py)."""
import os
import sys

from conftest import free_port, run, tool_env, write_exe


def test_slurm_environment_is_derived(tmp_path, monkeypatch):
    """The Slurm launcher's variables become torch.distributed's, with the
    master address from `scontrol show hostnames` (a stand-in here)."""
    from mmnorm.engine import distributed
    write_exe(tmp_path / 'scontrol',
              '#!/bin/sh\n[ "$1 $2 $3" = "show hostnames node[3-4]" ] '
              '&& printf "node3\\nnode4\\n"\n')
    monkeypatch.setenv('PATH', f'{tmp_path}:{os.environ["PATH"]}')
    for key in ('MASTER_ADDR', 'MASTER_PORT', 'RANK', 'WORLD_SIZE',
                'LOCAL_RANK'):
        monkeypatch.setenv(key, 'unset')  # so that monkeypatch restores it
        monkeypatch.delenv(key)
    monkeypatch.setenv('SLURM_PROCID', '3')
    monkeypatch.setenv('SLURM_NTASKS', '4')
    monkeypatch.setenv('SLURM_LOCALID', '1')
    monkeypatch.setenv('SLURM_NODELIST', 'node[3-4]')
    monkeypatch.setenv('PORT', '29999')
    distributed._env_from_slurm(None)
    assert (os.environ['MASTER_ADDR'], os.environ['MASTER_PORT']) == (
        'node3', '29999')
    assert (os.environ['RANK'], os.environ['WORLD_SIZE'],
            os.environ['LOCAL_RANK']) == ('3', '4', '1')


def test_cpu_ddp_wrapper_single_process(tmp_path):
    """setup_distributed on CPU: gloo process group, and a wrapper that
    accepts the device_ids mmengine's Runner passes."""
    code = '''
import torch
from mmengine.config import Config
from mmengine.registry import MODEL_WRAPPERS
from mmnorm.engine.distributed import setup_distributed
cfg = Config(dict())
setup_distributed(cfg, 'pytorch')
assert torch.distributed.get_backend() == 'gloo'
assert cfg.model_wrapper_cfg['type'] == 'CPUDistributedDataParallel'
ddp = MODEL_WRAPPERS.build(dict(cfg.model_wrapper_cfg),
                           default_args=dict(module=torch.nn.Linear(2, 2),
                                             device_ids=[0]))
assert ddp.device_ids is None
print('ok', type(ddp).__name__)
user_cfg = Config(dict(model_wrapper_cfg=dict(type='MMDistributedDataParallel')))
setup_distributed(user_cfg, 'pytorch')  # already initialised
assert user_cfg.model_wrapper_cfg['type'] == 'MMDistributedDataParallel'
torch.distributed.destroy_process_group()
'''
    env = tool_env(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0',
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()),
                   CUDA_VISIBLE_DEVICES='')
    proc = run([sys.executable, '-c', code], env=env)
    assert 'ok CPUDistributedDataParallel' in proc.stdout
    assert '[mmnorm rank 0/1] no CUDA: initialised torch.distributed' in proc.stdout
    assert ('[mmnorm rank 0/1] keeping the config\'s model_wrapper_cfg type '
            'MMDistributedDataParallel (the Runner passes device_ids') in proc.stdout


def test_run_tool_ends_the_process_group(tmp_path):
    """A tool that joined torch.distributed leaves it, process group destroyed,
    before interpreter shutdown (where gloo's threads could abort the process)."""
    code = '''
import torch
from mmengine.config import Config
from mmnorm.engine.command_line import run_tool
from mmnorm.engine.distributed import setup_distributed
run_tool(lambda: setup_distributed(Config(dict()), 'pytorch'))
print('initialised after run_tool:', torch.distributed.is_initialized())
'''
    env = tool_env(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0',
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()),
                   CUDA_VISIBLE_DEVICES='')
    proc = run([sys.executable, '-c', code], env=env)
    assert 'initialised after run_tool: False' in proc.stdout
