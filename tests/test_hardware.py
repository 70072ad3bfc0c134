"""
mingpt.hardware: the oneDNN linear (taken exactly when it should be, equal to F.linear, with a fallback
and an opt-out; packed weights for products of many rows, kept in step with the weight), and the
machine-dependent training defaults.
"""

import copy
import os
import subprocess
import sys
import unittest
from unittest import mock

import torch
import torch.nn as nn
from torch.nn import functional as F

from mingpt import hardware
from mingpt.errors import ConfigError
from mingpt.batching import BatchEngine
from mingpt.hardware import ONEDNN_MIN_WEIGHT, Linear, default_num_workers, fast_dtype, training_device

from tests.common import REPO, slow, tiny_gpt


def counting():
    """ patch the oneDNN op with a wrapper that counts its calls; returns (patcher, the weights it was given) """
    calls = []
    op = hardware._onednn_linear

    def counted(*args):
        calls.append(args[1])
        return op(*args)
    return mock.patch.object(hardware, '_onednn_linear', counted if op else None), calls


def onednn_gpt(vocab_size=700, tie_weights=True):
    """ a GPT whose c_attn, c_fc, mlp.c_proj and head (>= ONEDNN_MIN_WEIGHT) take the oneDNN path """
    return tiny_gpt(n_layer=2, n_head=4, n_embd=384, vocab_size=vocab_size, block_size=24,
                    tie_weights=tie_weights)


class TestLinear(unittest.TestCase):

    def test_gpt_uses_it_with_nn_linear_weights(self):
        for tie in (False, True):
            model = tiny_gpt(tie_weights=tie)
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            self.assertEqual(len(linears), 4 * model.config.n_layer + 1)
            for m in linears:
                self.assertIsInstance(m, Linear)
                self.assertEqual(m.weight.shape, (m.out_features, m.in_features))
                self.assertTrue(m.weight.is_contiguous())

    def test_inference_path_agrees_with_f_linear(self):
        torch.manual_seed(0)
        big = Linear(512, 1024)  # 524,288 weights: over ONEDNN_MIN_WEIGHT
        head = Linear(512, 600, bias=False)
        self.assertGreaterEqual(big.weight.numel(), ONEDNN_MIN_WEIGHT)
        patch, calls = counting()
        with patch:
            for layer in (big, head):
                # the last one is a non-contiguous slice, as the last position of a batch is
                for x in (torch.randn(1, 1, 512), torch.randn(3, 7, 512), torch.randn(5, 512),
                          torch.randn(3, 7, 512)[:, -1:, :]):
                    with torch.no_grad():
                        y = layer(x)
                    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        self.assertEqual(len(calls), 8 if hardware._onednn_linear is not None else 0)

    def test_training_autocast_and_small_weights_take_f_linear(self):
        torch.manual_seed(0)
        big, small = Linear(512, 1024), Linear(16, 16)
        patch, calls = counting()
        with patch:
            x = torch.randn(2, 3, 512, requires_grad=True)
            big(x).sum().backward()  # grad enabled: autograd's path, gradients flow
            torch.testing.assert_close(x.grad, big.weight.sum(0).expand(2, 3, 512))
            self.assertIsNotNone(big.weight.grad)
            with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
                self.assertEqual(big(torch.randn(2, 512)).dtype, torch.bfloat16)
            with torch.no_grad():
                small(torch.randn(2, 16))
                big.double()(torch.randn(2, 512, dtype=torch.float64))
        self.assertEqual(calls, [])

    def test_training_gradients_equal_nn_linear(self):
        # a down-projection (768 -> 192) takes the transposed weight gradient; its gradients are nn.Linear's,
        # with and without a bias, 2-D and 3-D inputs, a frozen weight, eager and compiled
        self.assertTrue(hardware.transposed_weight_grad(192, 768))
        self.assertFalse(hardware.transposed_weight_grad(768, 192))  # an up-projection keeps autograd's
        self.assertFalse(hardware.transposed_weight_grad(65, 192))
        backwards = []
        backward = hardware._LinearTransposedGrad.backward
        counted = staticmethod(lambda ctx, dy: backwards.append(1) or backward(ctx, dy))
        with mock.patch.object(hardware._LinearTransposedGrad, 'backward', counted):
            for bias, shape, frozen in ((True, (3, 5, 768), False), (False, (7, 768), False),
                                        (True, (3, 5, 768), True)):
                torch.manual_seed(0)
                layer = Linear(768, 192, bias=bias)
                ref = nn.Linear(768, 192, bias=bias)
                ref.load_state_dict(layer.state_dict())
                layer.weight.requires_grad_(not frozen)
                ref.weight.requires_grad_(not frozen)
                x = torch.randn(*shape, requires_grad=True)
                x_ref = x.detach().clone().requires_grad_()
                dy = torch.randn(*shape[:-1], 192)
                (layer(x) * dy).sum().backward()
                (ref(x_ref) * dy).sum().backward()
                torch.testing.assert_close(x.grad, x_ref.grad)
                for p, p_ref in zip(layer.parameters(), ref.parameters()):
                    if p_ref.requires_grad:
                        torch.testing.assert_close(p.grad, p_ref.grad)
                        self.assertTrue(p.grad.is_contiguous())
                    else:
                        self.assertIsNone(p.grad)
        self.assertEqual(len(backwards), 2)  # the frozen weight keeps F.linear
        layer.weight.requires_grad_(True)
        layer.weight.grad = x.grad = None
        torch.compile(layer, backend='aot_eager')(x).sum().backward()  # traced through, as the Trainer compiles it
        torch.testing.assert_close(layer.weight.grad, x.reshape(-1, 768).sum(0).expand(192, 768))

    def test_gpt_logits_same_with_and_without_grad(self):
        model = onednn_gpt()
        idx = torch.randint(0, 700, (2, 16))
        patch, calls = counting()
        with patch:
            with torch.no_grad():
                fast, _ = model(idx)
            slow, _ = model(idx)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
        if hardware._onednn_linear is not None:
            # c_attn (1152 x 384), c_fc, mlp.c_proj and the head are big enough; attn.c_proj is not
            self.assertEqual(len(calls), 2 * 3 + 1)

    def test_batched_decoding_through_a_onednn_head(self):
        # B > 1 decoding feeds the head the last position of every row, a non-contiguous (B, 1, C)
        # slice: prompts of three lengths, batched, give each prompt's tokens generated alone, and the
        # same tokens (and logits) as with the oneDNN path off
        model = onednn_gpt(tie_weights=False)
        self.assertGreaterEqual(model.lm_head.weight.numel(), ONEDNN_MIN_WEIGHT)
        prompts = [torch.randint(0, 700, (n,)) for n in (3, 9, 1)]
        patch, calls = counting()
        with patch:
            batched = model.generate(prompts, 10)[:, -10:]
            alone = torch.cat([model.generate(p[None], 10)[:, -10:] for p in prompts])
            with torch.no_grad():
                logits_fast = model(batched)[0]
        with mock.patch.object(hardware, '_onednn_linear', None):
            reference = model.generate(prompts, 10)[:, -10:]
            with torch.no_grad():
                logits_slow = model(batched)[0]
        self.assertTrue(torch.equal(batched, alone))
        self.assertTrue(torch.equal(batched, reference))
        torch.testing.assert_close(logits_fast, logits_slow, rtol=1e-5, atol=1e-5)
        if hardware._onednn_linear is not None:
            self.assertIn(model.lm_head.weight.shape, [w.shape for w in calls])

    def test_a_failing_kernel_falls_back_to_f_linear_once(self):
        torch.manual_seed(0)
        big = Linear(512, 1024)
        x = torch.randn(2, 512)
        calls = []

        def wrong_signature(*args):  # what a torch whose private op takes other arguments does
            calls.append(1)
            raise RuntimeError("_linear_pointwise() expected at most 5 argument(s) but received 6")
        with mock.patch.object(hardware, '_onednn_linear', wrong_signature), torch.no_grad():
            with self.assertLogs('mingpt.hardware', level='DEBUG') as logs:
                first = big(x)
            second = big(x)
            self.assertIsNone(hardware._onednn_linear)  # off for the rest of the process
        torch.testing.assert_close(first, F.linear(x, big.weight, big.bias))
        torch.testing.assert_close(second, first)
        self.assertEqual(len(calls), 1)
        self.assertIn('F.linear', '\n'.join(logs.output))

    @unittest.skipIf(hardware._onednn_pack is None, "this torch has no oneDNN weight packing op")
    def test_packed_weights_for_many_rows(self):
        torch.manual_seed(0)
        layer = Linear(512, 1024)
        layer.pack()
        self.assertTrue(layer._packed[1].is_mkldnn)  # made at once: the first batch does not wait for it
        patch, calls = counting()
        with patch, torch.no_grad():
            for x in (torch.randn(1, 1, 512), torch.randn(16, 1, 512), torch.randn(3, 7, 512)[:, -1:, :],
                      torch.randn(1, 64, 512)):
                torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
            # one row reads the weight as it is; two rows or more, the blocked copy
            self.assertEqual([w.is_mkldnn for w in calls], [False, True, True, True])
            packed = layer._packed[1]
            layer.weight.mul_(-2)  # an in-place change (an optimizer step): the copy is made anew
            x = torch.randn(4, 512)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
            self.assertIsNot(layer._packed[1], packed)
        # the copy is no parameter or buffer, and a copy of the layer makes its own
        self.assertEqual(set(layer.state_dict()), {'weight', 'bias'})
        twin = copy.deepcopy(layer)
        with torch.no_grad():
            torch.testing.assert_close(twin(x), layer(x))
        self.assertTrue(twin.packs)

    def test_batch_engine_on_packed_weights_gives_each_request_its_tokens_alone(self):
        # the engine packs the model's weights: its batched steps (and prefills) read the blocked
        # copies, a request generated alone reads the weights as they are, and the two agree
        model = onednn_gpt(vocab_size=700)
        prompts = [torch.randint(0, 700, (n,)).tolist() for n in (3, 9, 1, 12)]
        alone = [model.generate(torch.tensor(p)[None], 8)[0, len(p):].tolist() for p in prompts]
        logits = [[] for _ in prompts]
        with BatchEngine(model, rows=4) as engine:
            requests = [engine.submit(p, 8, on_logits=lambda x, i=i: logits[i].append(x.clone()))
                        for i, p in enumerate(prompts)]
            batched = [list(r) for r in requests]
        self.assertEqual(batched, alone)
        if hardware._onednn_pack is not None:
            self.assertTrue(model.lm_head._packed[1].is_mkldnn)
        # and the logits of every token within 1e-4 of a full forward on the plain F.linear path
        with mock.patch.object(hardware, '_onednn_linear', None), torch.no_grad():
            for p, toks, got in zip(prompts, batched, logits):
                full, _ = model(torch.tensor(p + toks)[None])
                torch.testing.assert_close(torch.stack(got), full[0, len(p) - 1:-1], rtol=0, atol=1e-4)

    @slow
    def test_env_var_turns_it_off(self):
        code = "import mingpt.hardware as h; print(h._onednn_linear is None)"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        for value, expected in (('0', 'True'), ('1', str(hardware._onednn_linear is None))):
            with self.subTest(MINGPT_ONEDNN=value):
                out = subprocess.run([sys.executable, '-c', code], env=dict(env, MINGPT_ONEDNN=value),
                                     capture_output=True, text=True, check=True)
                self.assertEqual(out.stdout.strip(), expected)


class TestTrainingDefaults(unittest.TestCase):

    def test_fast_dtype_is_float32_without_bf16_hardware(self):
        self.assertIn(fast_dtype('cpu'), ('float32', 'bfloat16'))
        self.assertEqual(fast_dtype('mps'), 'float32')
        with mock.patch.object(torch.cpu, '_is_avx512_bf16_supported', lambda: False, create=True), \
                mock.patch.object(torch.cpu, '_is_amx_tile_supported', lambda: False, create=True):
            self.assertEqual(fast_dtype('cpu'), 'float32')
        with mock.patch.object(torch.cpu, '_is_amx_tile_supported', lambda: True, create=True):
            self.assertEqual(fast_dtype('cpu'), 'bfloat16')

    def test_training_device(self):
        with mock.patch.object(torch.cuda, 'is_available', lambda: False):
            self.assertEqual(training_device('auto'), 'cpu')
        self.assertEqual(training_device('cpu', local_rank=1, world_size=2), 'cpu')  # only CUDA is split
        with self.assertRaisesRegex(ConfigError, "device='gpu' is not a device torch knows: use 'auto'"):
            training_device('gpu')

    def test_workers_leave_cores_for_training(self):
        for cores, expected in ((1, 0), (2, 0), (3, 1), (6, 4), (64, 4)):
            with mock.patch.object(os, 'sched_getaffinity', lambda pid, n=cores: set(range(n)), create=True):
                self.assertEqual(default_num_workers(), expected)


if __name__ == '__main__':
    unittest.main()
