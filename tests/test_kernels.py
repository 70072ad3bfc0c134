"""
mingpt.kernels: the single-row kernel is built here (CI has a compiler), multiplies as F.linear does for
fp32 and int8 weights, in its AVX-512 and AVX2 builds; the Linears and int8 Linears take it for
decoding once packed for one row, keep their copy in step with the weight, and fall back to torch's
kernels where it is unavailable.
"""

import os
import platform
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch
from torch.nn import functional as F

import mingpt.kernels as kernels
from mingpt import hardware
from mingpt.hardware import GEMV_INT8, Linear, pack_weights
from mingpt.lora import add_lora, merge
from mingpt.model import GPT
from mingpt.quantize import Int8Linear, quantize

from tests.common import REPO, tiny_gpt

SUPPORTED = sys.platform.startswith('linux') and platform.machine() == 'x86_64' and \
    torch.backends.cpu.get_cpu_capability() in kernels.ISA_FLAGS

# products of every shape the kernel treats apart: a partial last block of 8 output rows, 1-4 input
# rows, the input width a multiple of 16 (both builds' vector widths), with and without a bias
SHAPES = [(50, 48, 1), (8, 16, 4), (2304, 768, 1), (1003, 256, 3), (5, 64, 2)]

CHECK_BUILD = r"""
import json, torch
from torch.nn import functional as F
from mingpt import kernels, ops
torch.manual_seed(0)
errors = []
for N, K, M in %r:
    w, b, x = torch.randn(N, K), torch.randn(N), torch.randn(M, K)
    q, s = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N)
    ref = F.linear(x, w, b); ref8 = F.linear(x, q.float() * s[:, None])
    errors.append(float((kernels.product(x, kernels.block(w), N, b) - ref).abs().max() / ref.abs().max()))
    errors.append(float((kernels.product(x, kernels.block(q), N, None, scale=s) - ref8).abs().max() / ref8.abs().max()))
# GPT-2's GELU and its gradient, against torch's, relative to the largest value: a tail past the last
# whole vector, and inputs far out on both sides
x = (torch.randn(3, 7001) * 4).requires_grad_()
dy = torch.randn(3, 7001)
for y in (ops.gelu(x), F.gelu(x, approximate='tanh')):
    errors.append(y)
    errors.append(torch.autograd.grad(y, x, dy)[0])
y, gx, ref, ref_gx = errors[-4:]
errors[-4:] = [float((y - ref).abs().max() / ref.abs().max()), float((gx - ref_gx).abs().max() / ref_gx.abs().max())]
print(json.dumps({'available': kernels.available(), 'lanes': kernels._library().mingpt_gemv_lanes(), 'errors': errors}))
"""


def run_python(code, **env):
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env}, timeout=300)


@unittest.skipUnless(SUPPORTED, "the kernel is for Linux on x86-64 with AVX2 (here: "
                     f"{sys.platform} {platform.machine()})")
class TestKernel(unittest.TestCase):

    def test_builds_here(self):
        # CI and every Linux box with a C compiler: the kernel must be there, not silently skipped
        self.assertTrue(kernels.available())

    def test_products_equal_f_linear(self):
        torch.manual_seed(0)
        for N, K, M in SHAPES:
            for bias in (True, False):
                with self.subTest(N=N, K=K, M=M, bias=bias):
                    w, x = torch.randn(N, K), torch.randn(M, K)
                    b = torch.randn(N) if bias else None
                    y = kernels.product(x, kernels.block(w), N, b)
                    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
                    q, s = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N) * 0.01
                    y = kernels.product(x, kernels.block(q), N, b, scale=s)
                    torch.testing.assert_close(y, F.linear(x, q.float() * s[:, None], b), rtol=1e-5, atol=1e-4)
        # leading dimensions are kept: (B, T, K) -> (B, T, N)
        x = torch.randn(1, 1, 48)
        self.assertEqual(kernels.product(x, kernels.block(torch.randn(50, 48)), 50).shape, (1, 1, 50))

    def test_block_layout(self):
        # blocked[b, k // lanes, r, l] = W[b * rows + r, k + l], rows past N zero
        rows, lanes = kernels._library().mingpt_gemv_rows(), kernels._library().mingpt_gemv_lanes()
        w = torch.arange(10 * 2 * lanes, dtype=torch.float32).view(10, 2 * lanes)
        blocked = kernels.block(w)
        self.assertEqual(blocked.shape, (2, 2, rows, lanes))
        self.assertTrue(torch.equal(blocked[0, 1, 3], w[3, lanes:]))
        self.assertTrue(torch.equal(blocked[1, 0, 1], w[rows + 1, :lanes]))
        self.assertTrue(torch.equal(blocked[1, :, 2:], torch.zeros(2, rows - 2, lanes)))

    def test_avx2_build_multiplies_alike(self):
        # torch's AVX2 capability (how the guide emulates a CPU without AVX-512) selects the AVX2 build
        with tempfile.TemporaryDirectory() as cache:
            done = run_python(CHECK_BUILD % SHAPES, ATEN_CPU_CAPABILITY='avx2', MINGPT_CACHE=cache)
            self.assertEqual(done.returncode, 0, done.stderr)
            result = eval(done.stdout.replace('true', 'True'))
            self.assertEqual(result['lanes'], 8)
            self.assertLess(max(result['errors']), 1e-5)
            self.assertTrue(any(p.name.startswith('kernels-avx2-') for p in (Path(cache) / 'kernels').iterdir()))

    def test_unavailable_without_compiler_or_when_turned_off(self):
        code = ("import logging, torch; logging.basicConfig(level=logging.INFO)\n"
                "from mingpt import kernels; from mingpt.model import GPT\n"
                "from tests.common import tiny_gpt\n"
                "m = tiny_gpt(n_embd=384, n_head=4, vocab_size=50); print(kernels.available())\n"
                "print(m.generate(torch.tensor([[1, 2]]), 4).tolist())")
        reference = run_python(code, MINGPT_KERNELS='0')
        with tempfile.TemporaryDirectory() as cache:
            no_compiler = run_python(code, CC='/bin/false', MINGPT_CACHE=cache)
        for done, reason in ((reference, 'MINGPT_KERNELS=0'), (no_compiler, '/bin/false')):
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(done.stdout.split('\n')[0], 'False')
            self.assertIn(reason, done.stderr)  # one log line says why
        self.assertEqual(reference.stdout, no_compiler.stdout)  # and generation still works

    def test_built_once_per_source(self):
        with tempfile.TemporaryDirectory() as cache:
            code = "from mingpt import kernels; print(kernels.available())"
            first = run_python(code, MINGPT_CACHE=cache)
            built = sorted((Path(cache) / 'kernels').iterdir())
            second = run_python(code, MINGPT_CACHE=cache, CC='/bin/false')  # no compiling needed now
            self.assertEqual((first.stdout, second.stdout), ('True\n', 'True\n'), second.stderr)
            self.assertEqual(sorted((Path(cache) / 'kernels').iterdir()), built)
            self.assertEqual([p.suffix for p in built], ['.so'])  # no half-built files left


@unittest.skipUnless(SUPPORTED, "the kernel is for Linux on x86-64 with AVX2")
class TestLinears(unittest.TestCase):

    def counting(self):
        calls = []
        product = kernels.product

        def counted(x, blocked, *args, **kwargs):
            calls.append((x.numel() // x.size(-1), blocked.dtype))
            return product(x, blocked, *args, **kwargs)
        return mock.patch.object(kernels, 'product', counted), calls

    def test_linear_packed_for_one_row(self):
        torch.manual_seed(0)
        layer = Linear(512, 1000)
        patch, calls = self.counting()
        with patch, torch.no_grad():
            x = torch.randn(1, 1, 512)
            layer(x)
            self.assertEqual(calls, [])  # not packed: the weight as it is, through torch
            layer.pack('one')
            for x in (torch.randn(1, 1, 512), torch.randn(1, 4, 512), torch.randn(1, 7, 512)):
                torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
            self.assertEqual(calls, [(1, torch.float32), (4, torch.float32), (7, torch.float32)])
            layer(torch.randn(1, kernels.MAX_ROWS[torch.float32] + 1, 512))  # more rows: torch's kernel
            self.assertEqual(len(calls), 3)
            copy = layer._packed[1]
            layer.weight.mul_(-2)  # changed in place: the copy is made anew
            x = torch.randn(1, 1, 512)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
            self.assertIsNot(layer._packed[1], copy)
            layer.pack('many')  # one copy at a time: the other layout replaces it
            if hardware._onednn_pack is not None:
                self.assertTrue(layer._packed[1].is_mkldnn)
        with patch:  # gradients: never the kernel
            layer(torch.randn(1, 1, 512)).sum().backward()
        self.assertIsNotNone(layer.weight.grad)
        self.assertEqual(len(calls), 4)  # the three above and the one after the weight changed

    def test_weights_the_kernel_cannot_take_keep_torchs_path(self):
        # an input width that is no multiple of the vector width (n_embd 520): packing for one row
        # keeps no copy, and products read the weight as it is, through torch
        torch.manual_seed(0)
        layer, int8 = Linear(520, 1000), Int8Linear.from_linear(torch.nn.Linear(520, 1000))
        self.assertFalse(kernels.supports(layer.weight))
        patch, calls = self.counting()
        with patch, torch.no_grad():
            layer.pack('one')
            int8.pack('one')
            x = torch.randn(1, 1, 520)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(int8(x), F.linear(x, int8.dequantized(), int8.bias), rtol=0.05, atol=0.05)
        self.assertEqual(calls, [])
        self.assertIsNone(layer._packed)
        self.assertNotIn(GEMV_INT8.name, int8._prepared)

    def test_int8_linear_takes_it_for_few_rows(self):
        torch.manual_seed(0)
        layer = Int8Linear.from_linear(torch.nn.Linear(256, 1003))
        patch, calls = self.counting()
        with patch, torch.no_grad():
            for x in (torch.randn(1, 256), torch.randn(3, 256), torch.randn(16, 256)):
                exact = F.linear(x, layer.dequantized(), layer.bias)
                tolerance = 1e-5 if x.size(0) <= kernels.MAX_ROWS[torch.int8] else 0.05  # fbgemm quantizes x
                torch.testing.assert_close(layer(x), exact, rtol=tolerance, atol=tolerance)
        self.assertEqual(calls, [(1, torch.int8)])
        self.assertIn(GEMV_INT8.name, layer._prepared)

    def test_decoding_one_sequence_reads_the_packed_weights(self):
        # generate of one prompt packs for one row; its tokens are those of the same model with the
        # kernel turned off (the logits agree to fp32 rounding, and greedy picks the same)
        model = tiny_gpt(n_layer=2, n_head=4, n_embd=384, vocab_size=700, block_size=24, sharpen=4)
        idx = torch.randint(0, 700, (1, 5))
        with mock.patch.object(kernels, '_lib', False):
            reference = model.generate(idx, 12)
        patch, calls = self.counting()
        with patch:
            self.assertTrue(torch.equal(model.generate(idx, 12), reference))
        # the prefill's 5-row products (fp32 weights: up to 8 rows): 4 Linears of 2 layers and the head;
        # then for each of 11 decode steps the head (the blocks' products run in mingpt_block_step)
        self.assertEqual(len(calls), 9 + 11)
        self.assertEqual(model.lm_head.packs, 'one')
        quantize(model, 'int8')
        with patch:
            model.generate(idx, 3)
        self.assertEqual(calls[-1], (1, torch.int8))


# the same decode steps with every block in mingpt_block_step and in torch: the largest difference in
# the logits and in the KV cache, relative to their size
CHECK_STEP = r"""
import json, torch
from unittest import mock
from mingpt import kernels
from mingpt.hardware import pack_weights
from mingpt.model import GPT
from mingpt.quantize import quantize

def block_steps(bias=True, int8=False, max_len=40, steps=35):
    torch.manual_seed(0)
    c = GPT.get_default_config()
    c.model_type, c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size, c.bias = None, 2, 4, 64, 50, 64, bias
    model = GPT(c).eval()
    with torch.no_grad():
        for p in model.parameters():  # not GPT-2's init: biases and gains away from 0 and 1
            p.add_(torch.randn_like(p) * 0.3)
    quantize(model, 'int8' if int8 else None)
    pack_weights(model, 'one')
    idx = torch.randint(0, 50, (1, 5 + steps))
    results = []
    for in_c in (True, False):
        calls = []

        def counted(*args, real=kernels.block_step):
            y = real(*args)
            calls.append(y is not None)  # None: the block ran in torch after all
            return y
        with mock.patch.object(kernels, 'block_step', counted), torch.inference_mode():
            for block in model.transformer.h:
                block.step_in_c = in_c
            cache = model.make_kv_cache(1, max_len)
            model(idx[:, :5], kv_cache=cache)
            logits = torch.cat([model(idx[:, i:i + 1], kv_cache=cache, cache_pos=i)[0] for i in range(5, 5 + steps)])
        results.append((logits, torch.stack([torch.stack([layer.k, layer.v]) for layer in cache]), sum(calls)))
    (lc, kc, n_c), (lt, kt, n_t) = results
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())
    return {'logits': rel(lc, lt), 'cache': rel(kc, kt), 'calls': [n_c, n_t]}

print(json.dumps({'lanes': kernels._library().mingpt_gemv_lanes(),
                  'cases': [block_steps(bias, int8) for bias in (True, False) for int8 in (False, True)]}))
"""


@unittest.skipUnless(SUPPORTED, "the kernel is for Linux on x86-64 with AVX2")
class TestBlockStep(unittest.TestCase):

    def check_steps(self, done, lanes):
        self.assertEqual(done.returncode, 0, done.stderr)
        result = eval(done.stdout.replace('true', 'True'))
        self.assertEqual(result['lanes'], lanes)
        for case in result['cases']:  # fp32 and int8 weights, with and without biases
            # 2 blocks x 35 steps in C, then none with step_in_c off; positions up to the cache's end
            self.assertEqual(case['calls'], [70, 0])
            self.assertLess(case['logits'], 1e-5)
            self.assertLess(case['cache'], 1e-5)

    def test_steps_equal_torchs_block(self):
        self.check_steps(run_python(CHECK_STEP), kernels._library().mingpt_gemv_lanes())

    def test_avx2_build_steps_alike(self):
        with tempfile.TemporaryDirectory() as cache:
            self.check_steps(run_python(CHECK_STEP, ATEN_CPU_CAPABILITY='avx2', MINGPT_CACHE=cache), 8)

    def test_which_blocks_take_it(self):
        def packed(**options):
            model = tiny_gpt(n_embd=64, n_head=4, vocab_size=50)
            for name, value in options.items():
                setattr(model.config, name, value)
            model = GPT(model.config).eval()
            pack_weights(model, 'one')
            return [block.step_in_c for block in model.transformer.h]

        self.assertEqual(packed(), [True, True])
        for option in (dict(norm='rmsnorm'), dict(mlp_act='relu2'), dict(qk_norm=True)):
            with self.subTest(**option):  # not GPT-2's block: torch runs it
                self.assertEqual(packed(**option), [False, False])
        model = tiny_gpt(n_embd=64, n_head=4, vocab_size=50)
        model.transformer.h[1].mlp.c_fc.register_forward_hook(lambda *args: None)
        pack_weights(model, 'one')  # a hook must see its layer run: that block stays in torch
        self.assertEqual([block.step_in_c for block in model.transformer.h], [True, False])
        pack_weights(model, 'many')
        self.assertEqual([block.step_in_c for block in model.transformer.h], [False, False])

    def test_a_strided_input_is_read_as_it_is(self):
        # x a view with a stride of 2 along the channels: the C step must see its values, not its storage
        model = tiny_gpt(n_embd=64, n_head=4, vocab_size=50)
        pack_weights(model, 'one')
        block = model.transformer.h[0]
        x = torch.randn(1, 1, 128)[..., ::2]
        with torch.inference_mode():
            y = block(x, model.make_kv_cache(1)[0], 0)
            block.step_in_c = False
            torch.testing.assert_close(y, block(x, model.make_kv_cache(1)[0], 0), rtol=1e-5, atol=1e-5)

    def counted_generate(self, model, idx, n):
        calls = []
        real = kernels.block_step

        def counted(*args):
            y = real(*args)
            calls.append(y is not None)
            return y
        with mock.patch.object(kernels, 'block_step', counted):
            out = model.generate(idx, n)
        return out, calls

    def test_adapters_weight_changes_and_training_keep_it_exact(self):
        model = tiny_gpt(n_embd=64, n_head=4, vocab_size=50, block_size=32, sharpen=4)
        idx = torch.randint(0, 50, (1, 4))
        with mock.patch.object(kernels, '_lib', False):
            reference = model.generate(idx, 10)
        out, calls = self.counted_generate(model, idx, 10)
        self.assertTrue(torch.equal(out, reference))
        self.assertEqual(calls, [True] * 18)  # 2 blocks x 9 decode steps in C
        # an adapter not merged adds a product the C step has not: its blocks run in torch
        add_lora(model, r=4, targets=('c_attn',))
        with torch.no_grad():
            for layer in model.modules():
                if hasattr(layer, 'lora_B'):
                    layer.lora_B.weight.normal_()
        with mock.patch.object(kernels, '_lib', False):
            reference = model.generate(idx, 10)
        out, calls = self.counted_generate(model, idx, 10)
        self.assertTrue(torch.equal(out, reference))
        self.assertEqual(calls, [False] * 18)
        merge(model)  # merged into the weight (changed in place): in C again, with the new weights
        out, calls = self.counted_generate(model, idx, 10)
        self.assertTrue(torch.equal(out, reference))
        self.assertEqual(calls, [True] * 18)
        # training mode (dropout) runs in torch
        model.train()
        cache = model.make_kv_cache(1)
        with torch.no_grad(), mock.patch.object(kernels, 'block_step') as step:
            model(idx, kv_cache=cache)
            model(idx[:, :1], kv_cache=cache, cache_pos=4)
        step.assert_not_called()


if __name__ == '__main__':
    unittest.main()
