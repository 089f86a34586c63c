"""Comparing a detector's predictions before and after a transformation:
shared by the folded model's tests (tests/surgery/test_fuse.py) and the plain
MMDetection pair's (tests/checkpoints/test_plain_mmdet.py), which also imports
it in a Python in which ``import mmnorm`` fails: nothing here imports mmnorm."""
import torch


def binary_and_soft(model, batch):
    """``model.test_step(batch)`` twice, without gradients: as configured
    (binary masks), and with ``mask_thr_binary=-1`` (the mask probabilities,
    uint8 floor(255 p)); the same instances both times (checked)."""
    test_cfg = model.roi_head.test_cfg
    threshold = test_cfg.mask_thr_binary
    with torch.no_grad():
        binary = model.test_step(batch)
        test_cfg.mask_thr_binary = -1
        try:
            soft = model.test_step(batch)
        finally:
            test_cfg.mask_thr_binary = threshold
    for b, s in zip(binary, soft):
        assert torch.equal(b.pred_instances.bboxes, s.pred_instances.bboxes)
    return binary, soft


#: How far a folded model's mask probabilities may move: one step of the mask
#: head's 8-bit soft masks. Folding moves each output by float32 rounding
#: through some 30 layers: 1.4e-5 at most in a probability, measured on the
#: MABN + CenConv model of test_fuse.py, far below it.
MASK_TOL = 1 / 255


#: The least IoU of a deployed model's mask with the checkpoint's in
#: tools/test.py's --out files, which hold binary masks (RLE) only: folding
#: moves a probability by about 1e-5 (see MASK_TOL), which can flip only the
#: pixels that close to 0.5; far fewer than 1% of a mask.
MIN_MASK_IOU = 0.99


def assert_same_instances(before, after, score_tol=1e-4, box_tol=1e-3, probabilities=None):
    """``before`` and ``after`` hold the same instances, matched by label and
    nearest box (near-equal scores may be listed in another order): boxes
    within ``box_tol`` px, scores within ``score_tol``.

    Masks, as pred_instances with ``probabilities`` (the soft masks of
    ``before`` and ``after`` as the mask head returns them for
    ``mask_thr_binary < 0``: ``floor(255 p)`` in uint8): probabilities within
    :data:`MASK_TOL`, and binary masks equal at every pixel whose probability
    is farther than that from the 0.5 threshold (nearer ones may flip on
    another CPU). As RLE dicts (tools/test.py --out): IoU >= :data:`MIN_MASK_IOU`."""
    assert len(before['scores']) == len(after['scores']) > 0
    dist = (before['bboxes'][:, None] - after['bboxes'][None]).abs().amax(-1)
    dist[before['labels'][:, None] != after['labels'][None]] = float('inf')
    match = dist.argmin(1)
    assert sorted(match.tolist()) == list(range(len(match)))  # one to one
    assert dist.gather(1, match[:, None]).max() < box_tol
    torch.testing.assert_close(after['scores'][match], before['scores'], rtol=0, atol=score_tol)
    if probabilities is None:
        from pycocotools import mask as rle
        for i, j in enumerate(match.tolist()):
            pair = [after['masks'][j], before['masks'][i]]
            empty = rle.area(rle.merge(pair, intersect=False)) == 0  # IoU 1, pycocotools says 0
            assert empty or rle.iou(pair[:1], pair[1:], [0])[0, 0] >= MIN_MASK_IOU, i
        return
    soft_before, soft_after = (p.long() for p in probabilities)
    assert (soft_after[match] - soft_before).abs().max() <= round(255 * MASK_TOL)
    # p lies in [s/255, (s+1)/255): stable where that interval is MASK_TOL clear of 0.5
    stable = ((soft_before + 1) / 255 <= 0.5 - MASK_TOL) | (soft_before / 255 >= 0.5 + MASK_TOL)
    assert stable.float().mean() > 0.9, 'too few pixels away from the threshold to compare'
    assert torch.equal(after['masks'][match][stable], before['masks'][stable])
