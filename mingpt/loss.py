"""
The training loss without the logits: lm_head and cross-entropy fused, a chunk of rows at a time.

The logits of a GPT-2 batch are big: 64 x 128 tokens x 50,257 entries is 1.6 GB in fp32, and the plain
loss writes and reads several tensors of that size (the logits, their log-softmax, the gradient of each).
Only the loss and the gradients of the two inputs are needed, so this computes them chunk by chunk in
the forward: for rows x_c, z = x_c W^T, loss += logsumexp(z) - z[target], and since
d loss / d z = softmax(z) - onehot(target), the gradients dx_c = dz W and dW += dz^T x_c follow at once,
in the chunk's own buffer. The same three matrix products as lm_head's forward and backward; memory
a chunk's logits rather than the batch's; the backward only scales the saved gradients by the
incoming one (the loss is a scalar). On gpt-mini with GPT-2's vocabulary this makes the training step
1.5x nanoGPT's, which computes the plain loss (bench/README.md, Training).

Shapes: N rows (B*T positions), C n_embd, V vocab_size.
"""

import torch

# a chunk's fp32 logits (667 rows of GPT-2's vocabulary); of 16-256 MB, 64-128 MB ran fastest
CHUNK_BYTES = 128 * 2**20


class LinearCrossEntropy(torch.autograd.Function):
    """ mean cross-entropy of softcap(x @ weight^T) against targets (-1: not counted), gradients computed
    in the forward; see the module's docstring """

    @staticmethod
    def forward(ctx, x, weight, targets, softcap=None):
        # x (N, C), weight (V, C), targets (N,)
        N, V = x.size(0), weight.size(0)
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        counted = targets.ne(-1)
        share = (counted / counted.sum()).float()[:, None]  # (N, 1): a row's weight in the mean (0: not counted)
        targets = targets.clamp(min=0)[:, None]  # (N, 1): an uncounted row gathers a real column, for nothing
        # the products in autocast's dtype where it is on (as lm_head's would run), the softmax in fp32
        device = x.device.type
        mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        xm, wm = x.to(mm_dtype), weight.to(mm_dtype)
        rows = min(N, max(1, CHUNK_BYTES // (4 * V)))
        z = torch.empty(rows, V, device=x.device)  # (rows, V): a chunk's logits, then their gradient
        tanh = torch.empty_like(z) if softcap is not None else None
        loss = torch.zeros((), device=x.device)
        dx = torch.empty_like(x) if need_dx else None
        dw = torch.zeros_like(weight) if need_dw else None
        with torch.autocast(device, enabled=False):
            for a in range(0, N, rows):
                b = min(N, a + rows)
                zc, tc, sc = z[:b - a], targets[a:b], share[a:b]
                if mm_dtype == torch.float32:
                    torch.mm(xm[a:b], wm.t(), out=zc)  # into the chunk's buffer: no fresh pages a chunk
                else:
                    zc.copy_(xm[a:b] @ wm.t())
                if softcap is not None:
                    th = torch.tanh(zc.div_(softcap), out=tanh[:b - a])
                    torch.mul(th, softcap, out=zc)
                # loss = logsumexp(z) - z[target], one exp a logit: e = exp(z - max), lse = max + log(sum e)
                z_target = zc.gather(1, tc)
                z_max = zc.amax(dim=1, keepdim=True)
                e = zc.sub_(z_max).exp_()
                e_sum = e.sum(dim=1, keepdim=True)
                loss += ((z_max + e_sum.log() - z_target) * sc).sum()
                if not (need_dx or need_dw):
                    continue
                # d loss / dz = share * (softmax - onehot) = (e - e_sum * onehot) * share / e_sum: the
                # per-row factor goes on the (rows, C) sides of the products, not over the (rows, V) one
                dz = e.scatter_add_(1, tc, -e_sum)
                row_factor = sc / e_sum  # (rows, 1)
                if softcap is not None:
                    dz.addcmul_(dz, th.mul_(th), value=-1)  # through softcap * tanh(z / softcap): x (1 - tanh^2)
                dzm = dz if mm_dtype == torch.float32 else dz.to(mm_dtype)
                if need_dx:
                    dx[a:b] = (dzm @ wm).mul_(row_factor)
                if need_dw and dw.dtype == mm_dtype:
                    dw.addmm_(dzm.t(), xm[a:b] * row_factor.to(mm_dtype))
                elif need_dw:
                    dw += dzm.t() @ (xm[a:b] * row_factor.to(mm_dtype))
        ctx.save_for_backward(dx, dw)
        return loss

    @staticmethod
    def backward(ctx, grad):
        dx, dw = ctx.saved_tensors
        return (None if dx is None else dx * grad.to(dx.dtype),
                None if dw is None else dw * grad.to(dw.dtype), None, None)


def worth_chunking(rows, vocab_size):
    """ whether (rows, vocab_size) logits outgrow one chunk; those that fit (a character vocabulary) are
    better computed the plain way: nothing to save there, and torch.compile fuses it better """
    return rows * vocab_size * 4 > CHUNK_BYTES


def linear_cross_entropy(x, weight, targets, softcap=None):
    """ x (..., C), weight (V, C), targets (...) -> the mean cross-entropy of softcap(x @ weight^T),
    as F.cross_entropy(..., ignore_index=-1) on those logits, never holding more than a chunk of them """
    return LinearCrossEntropy.apply(x.reshape(-1, x.size(-1)), weight, targets.reshape(-1), softcap)
