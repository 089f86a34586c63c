"""tools/deploy.py --to mmdet (mmnorm.checkpoints.plain_mmdet): a plain
MMDetection config and a weights-only checkpoint that need no mmnorm.

Unit level (both stacks): the four demo configs' models built in-process,
their config and state dict rewritten, the plain model loaded strictly and
compared with the mmnorm model in eval mode; the config rewrite's other rules;
the tool's one-line errors; the plain backbone and neck through ONNX.

End to end (default stack): each demo config trained 2 iterations on the tiny
COCO set, deployed, then used by plain MMDetection in a Python in which
``import mmnorm`` fails, against the trained checkpoint.

Nothing at this module's top level imports mmnorm: the no-mmnorm process
imports this module for :func:`predict_images` and :func:`plain_side`.
"""
import inspect
import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import REPO, load_tool, run, tool_env, write_tiny_coco
from detection_outputs import assert_same_instances, binary_and_soft

DEMO = REPO / 'configs' / 'demo'
METHODS = ('mabn', 'brn', 'cbn', 'gnws')
#: Modules replaced in the demo model (ResNet-18: 20 norms and convs, FPN 8, the
#: 4-conv box head 4, the 4-conv mask head 4; the RPN head has none).
REPLACED = {
    'mabn': {'MABN -> BN': 36, 'CenConv -> Conv2d': 36},
    'brn': {'BRN -> BN': 36},
    'cbn': {'CBN -> BN': 36},
    'gnws': {'WSConv -> Conv2d': 36},
}
MMNORM_TYPES = ('MABN', 'BRN', 'CBN', 'CenConv', 'WSConv', 'mmnorm')
WEIGHTS_ONLY_ENV = 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'


def demo_config(method):
    return DEMO / f'mask_rcnn_r18_{method}.py'


def build(model_cfg):
    from mmengine.registry import MODELS, DefaultScope
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(model_cfg)


def randomize(model, seed=0):
    """Non-trivial affine parameters and running statistics of every norm
    (what a training leaves; a new model has 1 and 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not (hasattr(module, 'running_var') or isinstance(module, torch.nn.GroupNorm)):
                continue
            for name, low, high in (('weight', 0.5, 2.0), ('running_var', 0.5, 2.0),
                                    ('bias', -0.3, 0.3), ('running_mean', -0.3, 0.3)):
                tensor = getattr(module, name, None)
                if isinstance(tensor, torch.Tensor):
                    tensor.copy_(torch.rand(tensor.shape, generator=gen) * (high - low) + low)
    return model


def outputs(model, x):
    """The FPN features and the raw head outputs (``mode='tensor'``) in eval mode."""
    from mmdet.structures import DetDataSample
    model.eval()
    sample = DetDataSample(metainfo=dict(img_shape=tuple(x.shape[-2:]), ori_shape=tuple(
        x.shape[-2:]), scale_factor=(1.0, 1.0), batch_input_shape=tuple(x.shape[-2:])))

    def leaves(node):
        if isinstance(node, (list, tuple)):
            return [leaf for child in node for leaf in leaves(child)]
        return [node]
    with torch.no_grad():
        return leaves(model.extract_feat(x)) + leaves(model(x, [sample], mode='tensor'))


@pytest.fixture
def trusting(monkeypatch):
    """The tools set TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD (mmnorm.engine.trusted_checkpoints):
    run one in this process and leave the variable as it was."""
    monkeypatch.setenv(WEIGHTS_ONLY_ENV, 'unset below')
    monkeypatch.delenv(WEIGHTS_ONLY_ENV)


# ------------------------------------------------------------- unit level
@pytest.mark.parametrize('method', METHODS)
def test_plain_config_and_weights_compute_what_the_trained_model_computes(method, tmp_path,
                                                                         one_thread):
    from mmengine.config import Config

    import mmnorm  # noqa: F401  (the demo configs' layers)
    from mmnorm.checkpoints.plain_mmdet import check_plain_model, plain_config, plain_state_dict
    from mmnorm.surgery.fuse import mmnorm_modules
    cfg = Config.fromfile(demo_config(method))
    torch.manual_seed(0)
    trained = randomize(build(cfg.model))
    plain_cfg, changes = plain_config(cfg)
    plain_cfg.dump(tmp_path / 'config.py')
    text = (tmp_path / 'config.py').read_text()
    assert not [name for name in MMNORM_TYPES if name in text], changes
    assert 'custom_imports' not in text and '_delete_' not in text and '_base_' not in text
    assert "custom_imports: dropped (it imported mmnorm only)" in changes
    reread = Config.fromfile(tmp_path / 'config.py')
    assert reread.to_dict() == plain_cfg.to_dict()
    # What stays: data, evaluators, schedule.
    for key in ('test_dataloader', 'val_evaluator', 'test_evaluator', 'train_cfg',
                'optim_wrapper', 'param_scheduler'):
        assert reread[key] == cfg[key], key
    norm = reread.model.backbone.norm_cfg
    if method == 'gnws':
        assert norm == cfg.model.backbone.norm_cfg  # GroupNorm stays
        assert reread.model.backbone.conv_cfg == dict(type='Conv2d')
    else:
        assert norm == dict(type='BN', requires_grad=True, eps=1e-5)
    plain = build(reread.model)
    assert not mmnorm_modules(plain)
    check_plain_model(trained, plain)
    state, replaced = plain_state_dict(trained)
    assert dict(replaced) == REPLACED[method]
    assert list(state) == list(plain.state_dict())
    plain.load_state_dict(state, strict=True)
    if method == 'mabn':
        assert not state['backbone.bn1.running_mean'].any()
        assert torch.equal(state['backbone.bn1.running_var'], trained.backbone.bn1.running_var)
    x = torch.randn(1, 3, 96, 128)
    expected, got = outputs(trained, x), outputs(plain, x)
    assert len(got) == len(expected) == 8  # 5 FPN levels; box scores, deltas, masks
    for out, ref in zip(got, expected):
        # The same kernels on the same numbers (BN's with MABN's zero mean;
        # convs with W_hat computed by the layer itself): equal to rounding.
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_plain_config_rules():
    from mmengine.config import Config

    import mmnorm  # noqa: F401
    from mmnorm.checkpoints.plain_mmdet import DeployError, plain_config
    cfg = Config(dict(
        custom_imports=dict(imports=['mmnorm', 'mmdet.models'], allow_failed_imports=False),
        custom_hooks=[dict(type='CBNBurninHook'), dict(type='PreciseBNHook', num_iters=2),
                      dict(type='EMAHook')],
        default_hooks=dict(precise=dict(type='PreciseBNHook'), logger=dict(type='LoggerHook')),
        norm=dict(type='CBN', buffer_num=2),
        model=dict(
            backbone=dict(norm_cfg=dict(type='MABN', eps=1e-3, requires_grad=False,
                                        buffer_size=4, sync_stats=True),
                          conv_cfg=dict(type='WSConv', eps=1e-4)),
            neck=dict(norm_cfg=dict(type='GN', num_groups=4), conv_cfg=dict(type='CenConv')),
            heads=[dict(norm_cfg=dict(type='BRN', rmax=2.0)), dict(norm_cfg=dict(type='SyncBN'))]),
        optim_wrapper=dict(type='CPUAmpOptimWrapper', loss_scale='dynamic')))
    plain, changes = plain_config(cfg)
    assert plain.model.backbone.norm_cfg == dict(type='BN', requires_grad=False, eps=1e-3)
    assert plain.model.backbone.conv_cfg == dict(type='Conv2d')
    assert plain.model.neck == dict(norm_cfg=dict(type='GN', num_groups=4),
                                    conv_cfg=dict(type='Conv2d'))
    assert plain.model.heads == [dict(norm_cfg=dict(type='BN', requires_grad=True, eps=1e-5)),
                                 dict(norm_cfg=dict(type='SyncBN'))]
    assert plain.norm == dict(type='BN', requires_grad=True, eps=1e-5)
    assert plain.custom_imports == dict(imports=['mmdet.models'], allow_failed_imports=False)
    assert plain.custom_hooks == [dict(type='EMAHook')]
    assert plain.default_hooks == dict(logger=dict(type='LoggerHook'))
    assert plain.optim_wrapper == dict(type='AmpOptimWrapper', loss_scale='dynamic')
    assert cfg.model.backbone.norm_cfg.type == 'MABN'  # the input is not changed
    assert 'model.backbone.norm_cfg: MABN -> BN' in changes
    assert 'model.backbone.conv_cfg: WSConv -> Conv2d' in changes
    assert 'custom_hooks: CBNBurninHook dropped (mmnorm, training only)' in changes
    assert 'custom_hooks: PreciseBNHook dropped (mmnorm, training only)' in changes
    assert "custom_imports: 'mmnorm' removed" in changes
    with pytest.raises(DeployError, match=r'train_dataloader\.dataset \(FashionMNIST\)'):
        plain_config(Config(dict(train_dataloader=dict(dataset=dict(type='FashionMNIST')))))


def run_deploy(monkeypatch, *args):
    """tools/deploy.py ARGS in this process, as ``run_tool`` runs it:
    the ``error: ...`` line it exits with, or None."""
    from mmnorm.engine.command_line import run_tool
    tool = load_tool('deploy')
    monkeypatch.setattr(sys, 'argv', ['deploy.py', *map(str, args)])
    try:
        run_tool(tool.main, tool.ERRORS)
    except SystemExit as stop:
        return str(stop.code)
    return None


def test_deploy_tool_refuses_in_one_line_and_writes_all_or_nothing(tmp_path, monkeypatch,
                                                                    trusting):
    from mmengine.config import Config

    import mmnorm  # noqa: F401
    mabn = build(Config.fromfile(demo_config('mabn')).model)
    checkpoint = tmp_path / 'mabn.pth'
    torch.save(dict(state_dict=mabn.state_dict(), meta=dict()), checkpoint)
    out = tmp_path / 'plain'
    assert run_deploy(monkeypatch, demo_config('mabn'), checkpoint, out, '--to', 'onnx') == (
        "error: --to must be 'module' (the pickled folded module, the default) or 'mmdet' (a "
        "plain MMDetection config and checkpoint), got 'onnx'")
    error = run_deploy(monkeypatch, demo_config('gnws'), checkpoint, out, '--to', 'mmdet')
    assert error == (f'error: checkpoint {checkpoint} does not match the model of '
                     f'{demo_config("gnws")}: missing keys 66 (backbone.gn1.weight, '
                     'backbone.gn1.bias, backbone.layer1.0.gn1.weight, ...), unexpected keys 210 '
                     '(backbone.bn1.weight, backbone.bn1.bias, backbone.bn1.running_var, ...)')
    state = mabn.state_dict()
    state['backbone.conv1.weight'] = torch.zeros(64, 3, 3, 3)
    torch.save(dict(state_dict=state), tmp_path / 'other.pth')
    assert run_deploy(monkeypatch, demo_config('mabn'), tmp_path / 'other.pth', out, '--to',
                      'mmdet') == (
        f'error: checkpoint {tmp_path / "other.pth"} does not match the model of '
        f'{demo_config("mabn")}: 1 tensor(s) of another shape, first: size mismatch for '
        'backbone.conv1.weight: copying a param with shape torch.Size([64, 3, 3, 3]) from '
        'checkpoint, the shape in current model is torch.Size([64, 3, 7, 7]).')
    (tmp_path / 'other.pth').unlink()
    out.mkdir()
    assert run_deploy(monkeypatch, demo_config('mabn'), checkpoint, out, '--to', 'mmdet') == (
        f'error: {out} exists: name a folder that does not exist yet (nothing was written)')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['mabn.pth', 'plain']
    assert not list(out.iterdir())
    # A failure while writing leaves nothing, not even the folder being written.
    out.rmdir()
    from mmnorm.checkpoints import plain_mmdet

    def fail(folder, scope):
        assert sorted(p.name for p in Path(folder).iterdir()) == ['config.py', 'model.pth']
        raise OSError('disk full')
    with monkeypatch.context() as patch:
        patch.setattr(plain_mmdet, '_check_written', fail)
        with pytest.raises(OSError, match='disk full'):
            run_deploy(monkeypatch, demo_config('mabn'), checkpoint, out, '--to', 'mmdet')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['mabn.pth']
    # And without the failure, the pair (read back by the writer itself).
    assert run_deploy(monkeypatch, demo_config('mabn'), checkpoint, out, '--to', 'mmdet') is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ['mabn.pth', 'plain']
    content = torch.load(out / 'model.pth', map_location='cpu', weights_only=True)
    assert content['meta']['replaced'] == REPLACED['mabn']


# ------------------------------------------------------------------- ONNX
class BackboneNeck(torch.nn.Module):
    def __init__(self, detector):
        super().__init__()
        self.backbone, self.neck = detector.backbone, detector.neck

    def forward(self, x):
        return tuple(self.neck(self.backbone(x)))


#: ONNX Runtime against PyTorch on the plain ResNet-18 + FPN: float32 kernels
#: of two libraries through some 25 convs; measured 1.9e-5 at most on outputs up
#: to 18 (torch 2.13 and 2.1 alike).
ONNX_RTOL = ONNX_ATOL = 1e-4


def test_plain_backbone_and_neck_run_in_onnxruntime(tmp_path, one_thread):
    onnx = pytest.importorskip('onnx', reason='onnx is not installed (requirements/tests.txt)')
    ort = pytest.importorskip('onnxruntime',
                              reason='onnxruntime is not installed (requirements/tests.txt)')
    from mmengine.config import Config

    import mmnorm  # noqa: F401
    from mmnorm.checkpoints.plain_mmdet import plain_config, plain_state_dict
    cfg = Config.fromfile(demo_config('mabn'))
    torch.manual_seed(0)
    trained = randomize(build(cfg.model)).eval()
    plain = build(plain_config(cfg)[0].model)
    plain.load_state_dict(plain_state_dict(trained)[0], strict=True)
    net = BackboneNeck(plain).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        expected = net(x)
    parameters = inspect.signature(torch.onnx.export).parameters
    # torch >= 2.9 defaults to the torch.export-based exporter, which needs
    # onnxscript; the TorchScript one (dynamo=False) needs nothing more.
    kwargs = dict(dynamo=False) if 'dynamo' in parameters else {}
    path = tmp_path / 'backbone_neck.onnx'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch 2.13: the TorchScript exporter is deprecated
        try:
            torch.onnx.export(net, (x,), str(path), input_names=['image'], opset_version=17,
                              **kwargs)
        except ModuleNotFoundError as error:
            pytest.skip(f'torch {torch.__version__}: torch.onnx.export needs {error.name}, '
                        'which is not installed')
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    got = session.run(None, {'image': x.numpy()})
    assert len(got) == len(expected) == 5
    for out, ref in zip(got, expected):
        torch.testing.assert_close(torch.from_numpy(out), ref, rtol=ONNX_RTOL, atol=ONNX_ATOL)


# --------------------------------------------------- shared with the no-mmnorm side
def predict_images(model, cfg, images):
    """``model.test_step`` on ``images`` through the test pipeline of ``cfg``
    (without LoadAnnotations): per image, the boxes, scores, labels, binary
    masks and the mask probabilities as the mask head returns them for
    ``mask_thr_binary < 0`` (uint8 floor(255 p)) of the same predictions."""
    from mmcv.transforms import Compose
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import DefaultScope
    steps = [dict(step) for step in cfg.test_dataloader.dataset.pipeline
             if step['type'] != 'LoadAnnotations']
    with DefaultScope.overwrite_default_scope('mmdet'):
        pipeline = Compose(steps)
        batch = pseudo_collate([pipeline(dict(img_path=str(path), img_id=i))
                                for i, path in enumerate(images)])
        model.eval()
        binary, soft = binary_and_soft(model, batch)
    results = []
    for b, s in zip(binary, soft):
        b, s = b.pred_instances, s.pred_instances
        results.append(dict(bboxes=b.bboxes, scores=b.scores, labels=b.labels, masks=b.masks,
                            soft=s.masks))
    return results


def plain_side(job_file):
    """What a user of plain MMDetection does with each pair, in a Python in
    which ``import mmnorm`` fails: ``init_detector(config, checkpoint)``, the
    weights loaded again with weights_only=True and strict=True, predictions
    on the scenes, and mmengine's test loop (``Runner.from_cfg(cfg).test()``,
    what MMDetection's tools/test.py runs) with its predictions dumped. The
    results go to the JSON / .pt files the job names."""
    job = json.loads(Path(job_file).read_text())
    try:
        import mmnorm  # noqa: F401
    except ImportError as error:
        blocked = f'{type(error).__name__}: {error}'
    else:
        raise AssertionError(f'mmnorm was imported from {mmnorm.__file__}')
    from mmdet.apis import init_detector
    from mmengine.config import Config
    from mmengine.runner import Runner
    torch.set_num_threads(1)
    report = dict(blocked=blocked, metrics={}, classes={})
    predictions = {}
    for name, pair in job['pairs'].items():
        config, weights = f'{pair}/config.py', f'{pair}/model.pth'
        model = init_detector(config, weights, device='cpu')
        content = torch.load(weights, map_location='cpu', weights_only=True)
        model.load_state_dict(content['state_dict'], strict=True)
        report['classes'][name] = list(model.dataset_meta['classes'])
        predictions[name] = predict_images(model, model.cfg, job['images'])
        cfg = Config.fromfile(config)
        cfg.work_dir = f'{job["work_dir"]}/{name}'
        cfg.experiment_name = f'plain_{name}'
        cfg.load_from = weights
        cfg.test_evaluator = [cfg.test_evaluator,
                              dict(type='DumpDetResults', out_file_path=f'{cfg.work_dir}.pkl')]
        report['metrics'][name] = Runner.from_cfg(cfg).test()
    report['mmnorm_modules'] = sorted(key for key, module in sys.modules.items()
                                      if key.split('.')[0] == 'mmnorm' and module is not None)
    torch.save(predictions, job['predictions'])
    Path(job['report']).write_text(json.dumps(report))


NO_MMNORM = '''
import sys
from test_plain_mmdet import plain_side
plain_side(sys.argv[1])
print('plain side done')
'''


# ------------------------------------------------------------ end to end
def data_options(data):
    """--cfg-options pointing a demo config at the tiny COCO set ``data``."""
    root = f'{data.root}/'
    options = [f'data_root={root}']
    for loader, ann in (('train', data.train_ann), ('val', data.val_ann), ('test', data.val_ann)):
        options += [f'{loader}_dataloader.dataset.data_root={root}',
                    f'{loader}_dataloader.dataset.ann_file={ann.relative_to(data.root)}',
                    f'{loader}_dataloader.dataset.data_prefix.img=images/',
                    f'{loader}_dataloader.num_workers=0']
    return options + [f'val_evaluator.ann_file={data.val_ann}',
                      f'test_evaluator.ann_file={data.val_ann}']


def parse_options(options):
    """``--cfg-options`` ``key=value`` strings as the tools parse them."""
    from mmengine.config import DictAction
    return {key: DictAction._parse_iterable(value)
            for key, value in (option.split('=', 1) for option in options)}


#: Training only: 2 iterations, no validation (tools/test.py evaluates).
TRAIN_OPTIONS = ['train_cfg.max_iters=2', 'val_dataloader=None', 'val_cfg=None',
                 'val_evaluator=None']
#: The demo val scenes the predictions are compared on (the first ones of
#: data/fmnist_scenes/val, written again: a smaller set is a prefix).
SCENES = 3
METRIC = re.compile(r'coco/(\w+): (-?\d+\.\d+)')


#: Runs tools/NAME.py with each argv in turn, in one process (as its command
#: line would: ``runpy`` as ``__main__``), each followed by a marker line: 12
#: tool runs cost one interpreter start-up (3.7 s each here) instead of 12.
TOOL_RUNS = """
import json, runpy, sys
for argv in json.loads(sys.argv[1]):
    sys.argv = argv
    runpy.run_path(argv[0], run_name='__main__')
    print('[tool run finished]', flush=True)
"""


@pytest.fixture(scope='module')
def pairs(tmp_path_factory):
    """Each demo config trained 2 iterations on the tiny COCO set (with the
    demo's class names), evaluated by tools/test.py (--out) and deployed by
    tools/deploy.py --to mmdet, then used in a Python without mmnorm
    (:func:`plain_side`)."""
    from mmengine.config import Config

    from mmnorm.datasets import scenes
    root = tmp_path_factory.mktemp('plain_mmdet')
    classes = Config.fromfile(DEMO / '_base_.py').classes
    data = write_tiny_coco(root / 'tiny', classes=classes)
    scenes.prepare(str(root / 'scenes'), num_train=1, num_val=SCENES)
    images = [str(root / 'scenes' / 'val' / f'{i:06d}.png') for i in range(SCENES)]
    options = data_options(data)
    made = {method: dict(checkpoint=root / method / 'train' / 'iter_2.pth',
                         out=root / method / 'plain', test_pkl=root / method / 'test.pkl')
            for method in METHODS}
    runs = []
    for method in METHODS:
        runs.append([REPO / 'tools' / 'train.py', demo_config(method), '--work-dir',
                     root / method / 'train', '--cfg-options', *options, *TRAIN_OPTIONS,
                     f'experiment_name=train_{method}'])
    for method in METHODS:
        runs.append([REPO / 'tools' / 'test.py', demo_config(method), made[method]['checkpoint'],
                     '--work-dir', root / method / 'test', '--out', made[method]['test_pkl'],
                     '--cfg-options', *options, f'experiment_name=test_{method}'])
    for method in METHODS:
        runs.append([REPO / 'tools' / 'deploy.py', demo_config(method),
                     made[method]['checkpoint'], made[method]['out'], '--to', 'mmdet',
                     '--cfg-options', *options])
    log = run([sys.executable, '-c', TOOL_RUNS,
               json.dumps([[str(arg) for arg in argv] for argv in runs])]).stdout
    logs = log.split('[tool run finished]\n')
    assert len(logs) == len(runs) + 1, log[-3000:]
    for i, method in enumerate(METHODS):
        made[method].update(test_log=logs[len(METHODS) + i],
                            deploy_log=logs[2 * len(METHODS) + i])

    blocker = root / 'blocker' / 'mmnorm'
    blocker.mkdir(parents=True)
    (blocker / '__init__.py').write_text(
        "raise ImportError('mmnorm is blocked: plain MMDetection must not need it')\n")
    job = dict(pairs={m: str(made[m]['out']) for m in METHODS}, images=images,
               work_dir=str(root / 'plain_test'), predictions=str(root / 'plain_predictions.pt'),
               report=str(root / 'plain_report.json'))
    (root / 'job.json').write_text(json.dumps(job))
    path = ':'.join(str(p) for p in (blocker.parent, REPO / 'tests',
                                     REPO / 'tests' / 'checkpoints'))
    log = run([sys.executable, '-c', NO_MMNORM, root / 'job.json'], cwd=root,
              env=tool_env(PYTHONPATH=path)).stdout
    assert log.strip().splitlines()[-1] == 'plain side done', log[-3000:]
    return dict(root=root, made=made, images=images, options=options, job=job,
                report=json.loads((root / 'plain_report.json').read_text()),
                predictions=torch.load(root / 'plain_predictions.pt', weights_only=True))


@pytest.mark.end_to_end
@pytest.mark.xdist_group('plain_mmdet')
def test_deploy_tool_writes_a_plain_pair(pairs):
    made = pairs['made']['mabn']
    log = made['deploy_log']
    assert '[mmnorm deploy] replaced: CenConv -> Conv2d: 36, MABN -> BN: 36' in log
    assert '[mmnorm deploy] config: model.backbone.norm_cfg: MABN -> BN' in log
    assert '[mmnorm deploy] config: custom_imports: dropped (it imported mmnorm only)' in log
    assert (f'[mmnorm deploy] wrote {made["out"]}/config.py and {made["out"]}/model.pth '
            '(plain MMDetection, no mmnorm needed)') in log
    assert sorted(p.name for p in made['out'].iterdir()) == ['config.py', 'model.pth']
    assert not list(made['out'].parent.glob('.plain.partial-*'))
    text = (made['out'] / 'config.py').read_text()
    assert "norm_cfg=dict(eps=1e-05, requires_grad=True, type='BN')" in text
    assert not [name for name in MMNORM_TYPES if name in text]
    content = torch.load(made['out'] / 'model.pth', map_location='cpu', weights_only=True)
    assert sorted(content) == ['meta', 'state_dict']
    meta = content['meta']
    assert meta['config'] == str(demo_config('mabn'))
    assert meta['checkpoint'] == str(made['checkpoint'])
    assert meta['replaced'] == REPLACED['mabn']
    assert meta['mmnorm_version'] and meta['iter'] == 2
    assert list(meta['dataset_meta']['classes'])[:2] == ['T-shirt/top', 'Trouser']


@pytest.mark.end_to_end
@pytest.mark.xdist_group('plain_mmdet')
def test_plain_pair_loads_without_mmnorm(pairs):
    report = pairs['report']
    assert report['blocked'] == ('ImportError: mmnorm is blocked: plain MMDetection must not '
                                 'need it')
    assert report['mmnorm_modules'] == []
    for method in METHODS:
        assert report['classes'][method][:2] == ['T-shirt/top', 'Trouser']
        meta = torch.load(pairs['made'][method]['out'] / 'model.pth', weights_only=True)['meta']
        assert meta['replaced'] == REPLACED[method]


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.end_to_end
@pytest.mark.xdist_group('plain_mmdet')
def test_plain_pair_predicts_what_the_trained_model_predicts(pairs, method, one_thread):
    """On the first demo val scenes: boxes within 1e-3 px, scores within 1e-4,
    mask probabilities within 1/255 and binary masks equal away from the
    threshold (the folded model's comparison, tests/detection_outputs.py)."""
    from mmengine.config import Config

    import mmnorm  # noqa: F401
    cfg = Config.fromfile(demo_config(method))
    cfg.merge_from_dict(parse_options(pairs['options']))
    model = build(cfg.model)
    checkpoint = torch.load(pairs['made'][method]['checkpoint'], map_location='cpu',
                            weights_only=False)
    model.load_state_dict(checkpoint['state_dict'], strict=True)
    expected = predict_images(model, cfg, pairs['images'])
    got = pairs['predictions'][method]
    assert len(got) == len(expected) == SCENES
    for before, after in zip(expected, got):
        assert_same_instances(before, after, probabilities=(before['soft'], after['soft']))


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.end_to_end
@pytest.mark.xdist_group('plain_mmdet')
def test_plain_test_loop_gives_the_trained_models_ap(pairs, method):
    """mmengine's test loop on the pair (no mmnorm) against tools/test.py on
    the training checkpoint: box and mask AP within 0.001 (CocoMetric rounds
    to 3 decimals), and the dumped predictions the same instances (binary
    masks with IoU >= 0.99)."""
    import pickle
    made = pairs['made'][method]
    lines = [line for line in made['test_log'].splitlines() if 'Iter(test)' in line]
    expected = {key: float(value) for key, value in METRIC.findall(lines[-1])}
    got = pairs['report']['metrics'][method]
    for key in ('bbox_mAP', 'bbox_mAP_50', 'segm_mAP', 'segm_mAP_50'):
        assert abs(got[f'coco/{key}'] - expected[key]) <= 1e-3, (key, got, expected)
    with open(made['test_pkl'], 'rb') as f:
        trained = pickle.load(f)
    with open(f'{pairs["job"]["work_dir"]}/{method}.pkl', 'rb') as f:
        plain = pickle.load(f)
    assert len(plain) == len(trained) == 2
    for before, after in zip(trained, plain):
        assert_same_instances(before['pred_instances'], after['pred_instances'])
