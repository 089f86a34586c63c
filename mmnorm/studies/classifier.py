"""An image classifier around a detection backbone, for comparing norm layers.

:class:`NormStudyClassifier` (root ``MODELS``) runs any backbone built from the
registry - typically MMDetection's ``dict(type='mmdet.ResNet', ...)`` with
``norm_cfg`` / ``conv_cfg`` naming mmnorm's layers - then global average
pooling of the last feature map, a linear layer and cross-entropy. It follows
mmengine's ``BaseModel`` contract: ``forward(inputs, data_samples, mode)``
with ``mode`` ``'loss'`` (dict of losses), ``'predict'`` (one dict per image)
or ``'tensor'`` (logits).

:class:`ClassificationAccuracy` (root ``METRICS``) is top-1 accuracy in %,
reported as ``accuracy/top1``.
"""
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.registry import METRICS, MODELS
from torch import nn

__all__ = ['ClassificationAccuracy', 'NormStudyClassifier']


@MODELS.register_module()
class NormStudyClassifier(BaseModel):
    """Backbone -> global average pooling -> linear -> cross-entropy.

    Args:
        backbone (dict): Config of the backbone, built with the root
            ``MODELS`` registry (e.g. ``dict(type='mmdet.ResNet', depth=18,
            in_channels=1, norm_cfg=dict(type='BRN'), norm_eval=False)``). Its
            forward returns a tensor or a tuple of feature maps; the last one
            is classified.
        num_classes (int): Number of classes.
        feat_channels (int, optional): Channels of the last feature map.
            Default: the backbone's ``feat_dim`` attribute (MMDetection's
            ResNet has it).
        input_size (int, optional): If set, images are resized (bilinear) to
            ``input_size`` x ``input_size`` before the backbone. ResNet's stem
            divides the resolution by 4 and the stages by 8 more, so a 28x28
            image leaves a 1x1 map in the last stage; resizing it to 56 keeps
            2x2 there (and 14x14 in the first stage), so per-channel batch
            statistics still pool over more than the images of the batch.
        data_preprocessor (dict, optional): mmengine data preprocessor, e.g.
            ``dict(type='ImgDataPreprocessor', mean=[72.94], std=[90.0])``.
        init_cfg (dict, optional): mmengine init config.
    """

    def __init__(self,
                 backbone: dict,
                 num_classes: int = 10,
                 feat_channels: Optional[int] = None,
                 input_size: Optional[int] = None,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.backbone = MODELS.build(backbone)
        if feat_channels is None:
            feat_channels = getattr(self.backbone, 'feat_dim', None)
            if feat_channels is None:
                raise ValueError(f'NormStudyClassifier: {type(self.backbone).__name__} has no '
                                 '`feat_dim` attribute; pass feat_channels=')
        if input_size is not None and (not isinstance(input_size, int) or input_size < 1):
            raise ValueError(f'NormStudyClassifier: input_size must be a positive int or None, '
                             f'got {input_size!r}')
        self.num_classes = num_classes
        self.input_size = input_size
        self.head = nn.Linear(feat_channels, num_classes)

    # ------------------------------------------------------------------ parts
    def extract_feat(self, inputs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, feat_channels) pooled features."""
        if self.input_size is not None and tuple(inputs.shape[-2:]) != (self.input_size, ) * 2:
            inputs = F.interpolate(inputs, size=(self.input_size, self.input_size),
                                   mode='bilinear', align_corners=False)
        feats = self.backbone(inputs)
        if isinstance(feats, (tuple, list)):
            feats = feats[-1]
        return feats.mean(dim=(2, 3))

    @staticmethod
    def _stack(inputs: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor):
            return inputs
        return torch.stack(list(inputs))

    @staticmethod
    def labels(data_samples, device) -> torch.Tensor:
        """int64 (N,) labels from a tensor or a sequence of ints / 0-dim tensors."""
        if isinstance(data_samples, torch.Tensor):
            return data_samples.to(device=device, dtype=torch.long).view(-1)
        return torch.tensor([int(s) for s in data_samples], dtype=torch.long, device=device)

    # ---------------------------------------------------------------- forward
    def forward(self,
                inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
                data_samples=None,
                mode: str = 'tensor') -> Union[Dict[str, torch.Tensor], List[dict], torch.Tensor]:
        """mmengine's three modes.

        * ``'tensor'``: logits (N, num_classes).
        * ``'loss'``: ``dict(loss_cls=..., acc=...)``; ``acc`` is the batch's
          top-1 accuracy in %, detached (only logged: mmengine sums the keys
          containing ``loss``). Needs ``data_samples`` (labels).
        * ``'predict'``: one ``dict(pred_label=int, pred_score=(num_classes,)
          softmax, gt_label=int or None)`` per image.
        """
        logits = self.head(self.extract_feat(self._stack(inputs)))
        if mode == 'tensor':
            return logits
        if mode == 'loss':
            if data_samples is None:
                raise ValueError("NormStudyClassifier: mode='loss' needs data_samples (labels)")
            labels = self.labels(data_samples, logits.device)
            loss = F.cross_entropy(logits, labels)
            acc = (logits.detach().argmax(1) == labels).float().mean() * 100
            return dict(loss_cls=loss, acc=acc)
        if mode == 'predict':
            scores = logits.detach().softmax(dim=1).cpu()
            preds = scores.argmax(dim=1).tolist()
            gts = ([None] * len(preds) if data_samples is None else
                   self.labels(data_samples, 'cpu').tolist())
            return [dict(pred_label=p, pred_score=s, gt_label=g)
                    for p, s, g in zip(preds, scores, gts)]
        raise ValueError(f"NormStudyClassifier: invalid mode {mode!r}; "
                         "use 'loss', 'predict' or 'tensor'")


@METRICS.register_module()
class ClassificationAccuracy(BaseMetric):
    """Top-1 accuracy in %, from the ``pred_label`` / ``gt_label`` of each
    prediction of :class:`NormStudyClassifier`. Reported as ``accuracy/top1``
    (``prefix`` replaces ``accuracy``)."""

    default_prefix = 'accuracy'

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            if sample.get('gt_label') is None:
                raise ValueError('ClassificationAccuracy: a prediction has no gt_label; '
                                 "run the model's predict mode with the labels")
            self.results.append((int(sample['pred_label']), int(sample['gt_label'])))

    def compute_metrics(self, results: list) -> dict:
        if not results:
            raise ValueError('ClassificationAccuracy: no predictions to evaluate')
        correct = sum(pred == gt for pred, gt in results)
        return dict(top1=100.0 * correct / len(results))
