"""
mingpt.ops: GPT-2's GELU and causal self-attention in C, as torch ops: the same values and gradients as
torch's own (GELU's tanh form; scaled_dot_product_attention, causal), in the AVX-512 and AVX2 builds,
eager and compiled (torch.compile keeps the ops); the model trains through them as through torch's.
"""

import itertools
import json
import tempfile
import unittest
from unittest import mock

import torch
from torch.nn import functional as F

import mingpt.ops as ops
from mingpt.model import GPT

from tests.test_kernels import SUPPORTED, run_python


@unittest.skipUnless(SUPPORTED, "the kernel is for Linux on x86-64 with AVX2")
class TestGELU(unittest.TestCase):

    def test_equals_torchs_tanh_gelu_and_its_gradient(self):
        torch.manual_seed(0)
        for shape in ((64, 3072), (5, 4099), (ops.GELU_MIN_NUMEL + 3,)):
            with self.subTest(shape=shape):
                x = (torch.randn(shape) * 3).requires_grad_()
                dy = torch.randn(shape)
                y = ops.gelu(x)
                self.assertIn('mingpt', str(y.grad_fn).lower())  # the kernel ran, not torch's
                ref = F.gelu(x, approximate='tanh')
                torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(ref, x, dy)[0],
                                           rtol=1e-5, atol=1e-5)
        far = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4] * 3000)  # no inf or nan out there
        torch.testing.assert_close(ops.gelu(far), F.gelu(far, approximate='tanh'), rtol=1e-6, atol=1e-6)

    def test_small_or_other_tensors_take_torchs(self):
        for x in (torch.randn(100, requires_grad=True), torch.randn(64, 3072, dtype=torch.bfloat16, requires_grad=True)):
            self.assertIn('GeluBackward', type(ops.gelu(x).grad_fn).__name__)

    def test_compiled_calls_the_kernel(self):
        # a torch op (mingpt::gelu), so torch.compile keeps it: same values, and its backward
        x = torch.randn(64, 3072, requires_grad=True)
        dy = torch.randn(64, 3072)
        compiled = torch.compile(lambda t: ops.gelu(t) * 2)
        y = compiled(x)
        torch.testing.assert_close(y, F.gelu(x, approximate='tanh') * 2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0],
                                   torch.autograd.grad(F.gelu(x, approximate='tanh') * 2, x, dy)[0], rtol=1e-5, atol=1e-5)


def graph_nodes(t):
    """ the names of every node of t's autograd graph """
    seen, todo = {}, [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = type(node).__name__
            todo += [n for n, _ in node.next_functions]
    return set(seen.values())


def attention_errors(B, H, T, D, seed=0, packed=False):
    """ ops.attention against F.scaled_dot_product_attention(is_causal=True) on strided views of
    one (B, T, 3, H, D) projection, as the model makes them (packed: ops.attention_packed of the
    projection itself): the largest differences of the output and of the projection's gradient,
    relative to the largest reference value """
    torch.manual_seed(seed)
    qkv = torch.randn(B, T, 3, H, D, requires_grad=True)
    dy = torch.randn(B, T, H, D)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    y = ops.attention_packed(qkv) if packed else ops.attention(q, k, v)
    ref_grad, = torch.autograd.grad(ref, qkv, dy)
    grad, = torch.autograd.grad(y, qkv, dy)
    y, ref = y.detach(), ref.detach()
    return float((y - ref).abs().max() / ref.abs().max()), float((grad - ref_grad).abs().max() / ref_grad.abs().max())


@unittest.skipUnless(SUPPORTED, "the kernel is for Linux on x86-64 with AVX2")
class TestAttention(unittest.TestCase):

    # a context that is no whole number of row blocks or vectors, one position, heads of one and of
    # several vectors
    SHAPES = [(2, 3, 37, 16), (1, 2, 1, 32), (3, 2, 64, 48), (1, 1, 130, 64)]

    def test_equals_torchs_attention_and_its_gradients(self):
        for shape, packed in itertools.product(self.SHAPES, (False, True)):
            with self.subTest(shape=shape, packed=packed):
                out, grad = attention_errors(*shape, packed=packed)
                self.assertLess(out, 1e-5)
                self.assertLess(grad, 1e-5)

    def test_avx2_build_attends_alike(self):
        code = ("import json; from tests.test_ops import attention_errors; from mingpt import kernels\n"
                f"errors = [attention_errors(*s, packed=p) for s in {self.SHAPES!r} for p in (False, True)]\n"
                "print(json.dumps([kernels.lanes(), errors]))")
        with tempfile.TemporaryDirectory() as cache:
            done = run_python(code, ATEN_CPU_CAPABILITY='avx2', MINGPT_CACHE=cache)
        self.assertEqual(done.returncode, 0, done.stderr)
        lanes, errors = json.loads(done.stdout)
        self.assertEqual(lanes, 8)
        self.assertLess(max(max(e) for e in errors), 1e-5)

    def test_which_inputs_it_takes(self):
        q = torch.randn(2, 3, 16, 32)
        self.assertTrue(ops.usable_attention(q, q, q))
        self.assertTrue(ops.usable_attention(q.transpose(1, 2).contiguous().transpose(1, 2), q, q))  # strided
        self.assertFalse(ops.usable_attention(q, q[:, :, :8], q[:, :, :8]))         # keys of a cache
        self.assertFalse(ops.usable_attention(q.double(), q.double(), q.double()))
        self.assertFalse(ops.usable_attention(q[..., :12], q[..., :12], q[..., :12]))  # D: no whole vector
        self.assertFalse(ops.usable_attention(q, q.transpose(2, 3).contiguous().transpose(2, 3), q))  # columns
        long = torch.randn(1, 1, ops.ATTENTION_MAX_T + 1, 32)
        self.assertFalse(ops.usable_attention(long, long, long))

    def test_separate_tensors_and_compiled_calls(self):
        # three tensors made apart (as after QK-norm or rotations), eager and compiled: the same values and
        # gradients as torch's attention
        x = torch.randn(2, 2, 40, 32, requires_grad=True)

        def attend(t, use_kernel):
            q, k, v = t * 2, t.flip(2), t + 1
            if use_kernel:
                return ops.attention(q, k, v)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        ref = attend(x, False)
        dy = torch.randn_like(ref)
        ref_grad, = torch.autograd.grad(ref, x, dy)
        for f in (attend, torch.compile(attend)):
            y = f(x, True)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0], ref_grad, rtol=1e-5, atol=1e-5)

    def test_packed_compiled_equals_eager(self):
        # compiled, the packed op's gradient is the projection's own: values and gradients as eager
        qkv = torch.randn(2, 40, 3, 2, 32, requires_grad=True)
        y = ops.attention_packed(qkv)
        dy = torch.randn_like(y)
        grad, = torch.autograd.grad(y, qkv, dy)
        compiled = torch.compile(ops.attention_packed)(qkv)
        torch.testing.assert_close(compiled, y, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.autograd.grad(compiled, qkv, dy)[0], grad, rtol=1e-6, atol=1e-6)

    def test_model_trains_through_it_as_through_torchs(self):
        # the model's training forward takes the kernel (no cache, no mask, no attention dropout), and its
        # loss and gradients are those of torch's attention; the modern options' rotated, normed heads too
        # (GPT-2's heads reach the kernel as the projection's views, packed; the others apart)
        for options, op in (({}, 'mingpt_attention_packed'), ({'pos_emb': 'rope', 'qk_norm': True}, 'mingpt_attention_default')):
            with self.subTest(**options):
                torch.manual_seed(0)
                config = GPT.get_default_config()
                config.merge_from_dict(dict(model_type=None, n_layer=2, n_head=2, n_embd=64, vocab_size=50,
                                            block_size=40, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0, **options))
                model = GPT(config).train()
                x = torch.randint(0, 50, (3, 40))
                results = []
                for use_kernel in (True, False):
                    with mock.patch.object(ops, 'usable_attention', wraps=ops.usable_attention) as usable:
                        if not use_kernel:
                            usable.side_effect = lambda *a: False
                        model.zero_grad()
                        _, loss = model(x, x)
                        loss.backward()
                        self.assertEqual(usable.call_count, 2)  # asked once a layer
                        self.assertEqual(any(op in n for n in graph_nodes(loss)), use_kernel)
                    results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
                (loss, grads), (ref_loss, ref_grads) = results
                torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
                for g, ref in zip(grads, ref_grads):
                    torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


if __name__ == '__main__':
    unittest.main()
