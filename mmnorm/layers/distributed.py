"""Per-step statistics over all processes, for the layers' ``sync_stats=True``.

Every function here works on torch.distributed's default process group and is
a collective: each process must call it, in the same order, the same number
of times (an empty input takes part with an element count of 0). They are
only called when :func:`sync_world` is true; otherwise the layers keep each
process's own statistics and nothing here runs.

"Union" below means the concatenation of all processes' inputs along every
reduced dim: a statistic of the union is what a single process that sees all
inputs computes. Element counts are combined, so processes with different
batch sizes are weighted by their element counts.
"""
import torch
import torch.distributed as dist


def sync_world():
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor):
    """Sum ``tensor`` over all processes, in place; returns it."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def union_mean(local_sum, count):
    """The mean over the union from this process's per-channel sums.

    Args:
        local_sum (Tensor): (C,) sums over this process's elements.
        count (int): this process's number of elements per channel (may be 0).

    Returns:
        (mean (C,), total): ``sum over processes of local_sum`` divided by the
        total count (0 where the total is 0), and the total count, a 0-dim
        tensor of ``local_sum``'s dtype. One all-reduce of C + 1 numbers.
    """
    packed = torch.cat([local_sum, local_sum.new_tensor([count])])
    all_reduce_sum(packed)
    total = packed[-1]
    return packed[:-1] / total.clamp_min(1), total


class _UnionMoments(torch.autograd.Function):
    """Per-channel mean and biased variance of the union, differentiable.

    Forward: each process computes its count n_p, mean m_p and sum of squared
    deviations S_p (two-pass, so no cancellation of E[x^2] - mean^2); one
    all-gather of (n_p, m_p, S_p), combined in process order, the same on every
    process (Chan et al.'s pairwise formula), N = sum n_p::

        mean = sum_p n_p m_p / N      var = sum_p (S_p + n_p (m_p - mean)^2) / N

    Backward: every process's loss depends on the shared (mean, var), so the
    gradient reaching x_p is the sum over processes of their incoming
    gradients (one all-reduce of 2C numbers)::

        dx_p = G_mean / N + 2 G_var (x_p - mean) / N,   G = sum over processes

    as for SyncBatchNorm; DDP then averages the parameter gradients.
    """

    @staticmethod
    def forward(ctx, x, former_mean, former_var, former_total):
        if former_mean is not None:  # a replay: the moments of an earlier call, no all-gather
            mean, var, total = former_mean.clone(), former_var.clone(), former_total.clone()
            ctx.save_for_backward(x, mean, total.clamp_min(1))
            ctx.mark_non_differentiable(total)
            return mean, var, total
        dims = [0] + list(range(2, x.dim()))
        channels = x.size(1)
        count = x.numel() // channels
        if count > 0:
            var, mean = torch.var_mean(x, dims, correction=0)
        else:
            var = mean = x.new_zeros(channels)
        local = torch.cat([x.new_tensor([count]), mean, var * count])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        table = torch.stack(gathered)  # (processes, 1 + 2C)
        counts, means, squares = table[:, :1], table[:, 1:1 + channels], table[:, 1 + channels:]
        total = counts.sum()
        scale = total.clamp_min(1)
        mean = (counts * means).sum(0) / scale
        var = (squares + counts * (means - mean).square()).sum(0) / scale
        ctx.save_for_backward(x, mean, scale)
        ctx.mark_non_differentiable(total)
        return mean, var, total

    @staticmethod
    def backward(ctx, grad_mean, grad_var, _grad_total):
        x, mean, scale = ctx.saved_tensors
        channels = x.size(1)
        grads = all_reduce_sum(torch.cat([grad_mean, grad_var]))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dx = (x - mean.view(shape)) * (grads[channels:] * (2 / scale)).view(shape)
        return dx + (grads[:channels] / scale).view(shape), None, None, None


def union_moments(x, former=None):
    """(mean, biased variance, total count) of the union for x (N, C, *) in a
    float dtype: (C,), (C,) differentiable in x (see :class:`_UnionMoments`),
    and a 0-dim tensor (not differentiable). Where the union is empty, mean and
    variance are 0 and the count is 0. ``former``: the (mean, variance, count)
    of an earlier call on the same input, replayed (activation checkpointing's
    recompute) without the all-gather; the backward is a collective as ever."""
    return _UnionMoments.apply(x, *(former if former is not None else (None, None, None)))
