"""
Tests for mingpt/quantize.py and the int8 kernels of mingpt/hardware.py: a row's int8 values are within
half a step of the weight; every quantized Linear of a model, fed what it is fed in the model, stays
within the error its scales allow (the weight's half step times the input's size, plus what quantizing
the activations may add); with the exact kernel the model computes exactly what an fp32 model with the
dequantized weights computes; a product that saturates int16 is refused; save gives the same
model, bit for bit, through GPT.from_pretrained, and transformers refuses to read it; generation,
the KV cache and the BatchEngine run on it; --quantize int8 in the chat CLI.
"""

import json
import unittest

import torch
import torch.nn as nn

from mingpt import hardware
from mingpt.batching import BatchEngine
from mingpt.errors import ConfigError, WeightsError
from mingpt.generate import stream
from mingpt.model import GPT
from mingpt.quantize import CONFIG_KEY, WEIGHTS_FILE, Int8Linear, quantize, quantize_rows, read, save
from mingpt.weights import save_llmc

from tests import common

V, BLOCK = 60, 32


def tiny(tie_weights=False, seed=0):
    return common.tiny_gpt(V, BLOCK, n_layer=2, n_head=2, n_embd=64, tie_weights=tie_weights, seed=seed,
                           sharpen=4)


class kernel:
    """ with kernel('dequantize'): Int8Linears multiply with that kernel inside the block """

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.saved = hardware._int8_kernel
        hardware._int8_kernel = hardware.INT8_KERNELS[self.name]

    def __exit__(self, *exc):
        hardware._int8_kernel = self.saved


def activation_step(x):
    """ the coarsest step a kernel may quantize x to: 7 bits over x's range, zero included """
    return (x.max().clamp_min(0) - x.min().clamp_max(0)) / 127


def allowed_error(layer, x):
    """
    (..., out) bound on |int8 layer(x) - fp32 layer(x)|: y - y' = (w - w_hat) x + w_hat (x - x_hat),
    with |w - w_hat| <= scale / 2 per weight and |x - x_hat| <= step / 2 per input
    """
    weight_term = layer.weight_scale / 2 * x.abs().sum(-1, keepdim=True)
    if hardware.int8_kernel().name == 'dequantize':
        return weight_term + 1e-5
    act_term = activation_step(x) / 2 * layer.dequantized().abs().sum(1)
    return weight_term + act_term + 1e-4


class TestQuantizeRows(unittest.TestCase):

    def test_within_half_a_step(self):
        w = torch.randn(40, 70) * torch.logspace(-3, 1, 40)[:, None]
        w[3] = 0  # an all-zero row stays zeros
        q, scale = quantize_rows(w)
        self.assertEqual(q.dtype, torch.int8)
        self.assertLessEqual(int(q.abs().max()), 127)
        self.assertTrue(torch.equal(q.abs().amax(1)[torch.arange(40) != 3], torch.full((39,), 127, dtype=torch.int8)))
        err = (q.float() * scale[:, None] - w).abs()
        self.assertTrue((err <= scale[:, None] / 2 * (1 + 1e-6)).all())
        self.assertTrue(torch.equal(q[3], torch.zeros(70, dtype=torch.int8)))


class TestKernels(unittest.TestCase):

    def test_chosen_kernel_passes_the_saturation_probe(self):
        chosen = hardware.int8_kernel()
        self.assertTrue(hardware._probe_int8_kernel(chosen))
        self.assertTrue(hardware._probe_int8_kernel(hardware.INT8_KERNELS['dequantize']))  # the fallback

    def test_a_saturating_kernel_is_refused(self):
        # int16 pair sums, as vpmaddubsw adds them without VNNI: 255 * 127 * 2 does not fit
        def saturating(x, prepared, bias):
            weight, scale = prepared
            step = x.max() / 255
            xq = torch.round(x / step)
            pairs = (xq[:, None, :] * weight.float()).view(x.size(0), weight.size(0), -1, 2).sum(-1)
            return pairs.clamp(-32768, 32767).sum(-1) * step * scale
        bad = hardware.Int8Kernel('bad', lambda w, s: (w, s), saturating)
        self.assertFalse(hardware._probe_int8_kernel(bad))

    def test_unknown_kernel_name_is_a_config_error(self):
        saved = hardware._int8_kernel
        try:
            hardware._int8_kernel = None
            with common.patched_env(MINGPT_INT8_KERNEL='avx9000'):
                with self.assertRaisesRegex(ConfigError, 'avx9000.*dequantize'):
                    hardware.int8_kernel()
            with common.patched_env(MINGPT_INT8_KERNEL='dequantize'):
                self.assertEqual(hardware.int8_kernel().name, 'dequantize')
        finally:
            hardware._int8_kernel = saved

    def test_every_working_kernel_is_within_the_bound(self):
        torch.manual_seed(1)
        linear = nn.Linear(96, 40)
        layer = Int8Linear.from_linear(linear)
        x = torch.randn(5, 96) * 3
        for name, k in hardware.INT8_KERNELS.items():
            if not hardware._probe_int8_kernel(k):
                continue
            with self.subTest(kernel=name), kernel(name), torch.no_grad():
                y = layer(x)
                self.assertTrue(((y - linear(x)).abs() <= allowed_error(layer, x)).all())
                self.assertEqual(y.shape, (5, 40))


class TestQuantizedModel(common.TempDirTestCase):

    def test_every_linear_within_its_bound_in_the_model(self):
        for tied in (False, True):
            fp32 = tiny(tie_weights=tied)
            model = quantize(tiny(tie_weights=tied))
            linears = {n: m for n, m in fp32.named_modules() if isinstance(m, nn.Linear)}
            int8 = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
            self.assertEqual(set(int8), set(linears))  # lm_head included
            self.assertIn('lm_head', int8)
            self.assertFalse(any(isinstance(m, nn.Linear) for m in model.modules()))
            checked = []

            def check(name):
                def hook(layer, inputs, output):
                    x = inputs[0]
                    ok = (output - linears[name](x)).abs() <= allowed_error(layer, x)
                    checked.append((name, bool(ok.all())))
                return hook
            for n, m in int8.items():
                m.register_forward_hook(check(n))
            idx = torch.randint(0, V, (3, 20))
            with torch.no_grad():
                model(idx)
            self.assertEqual(len(checked), len(int8))
            self.assertEqual([n for n, ok in checked if not ok], [], f'tied={tied}')

    def test_exact_kernel_computes_the_dequantized_model(self):
        model = quantize(tiny(tie_weights=True))
        reference = tiny(tie_weights=True)
        with torch.no_grad():
            reference.lm_head = nn.Linear(64, V, bias=False)  # the int8 copy of wte, apart from wte
            for name, m in model.named_modules():
                if isinstance(m, Int8Linear):
                    reference.get_submodule(name).weight.copy_(m.dequantized())
        idx = torch.randint(0, V, (2, 24))
        with kernel('dequantize'), torch.no_grad():
            torch.testing.assert_close(model(idx)[0], reference(idx)[0], atol=1e-5, rtol=1e-5)
        # wte itself is untouched: the embedding gathers fp32 rows
        self.assertEqual(model.transformer.wte.weight.dtype, torch.float32)

    def test_save_load_round_trip_is_exact(self):
        for tied in (False, True):
            with self.subTest(tied=tied):
                model = quantize(tiny(tie_weights=tied))
                d = self.tmp / f'q{tied}'
                save(model, d)
                self.assertTrue((d / WEIGHTS_FILE).is_file())
                self.assertFalse((d / 'model.safetensors').exists())
                config = json.loads((d / 'config.json').read_text())
                self.assertEqual(config[CONFIG_KEY]['method'], 'int8')
                self.assertEqual(config['tie_word_embeddings'], tied)
                for again in (GPT.from_pretrained(d), GPT.from_pretrained(str(d), tie_weights=tied)):
                    again.eval()
                    self.assertIsInstance(again.lm_head, Int8Linear)
                    self.assertEqual(again.quantization, 'int8')
                    sd, sd2 = model.state_dict(), again.state_dict()
                    self.assertEqual(set(sd), set(sd2))
                    for k in sd:
                        self.assertEqual(sd[k].dtype, sd2[k].dtype, k)
                        self.assertTrue(torch.equal(sd[k], sd2[k]), k)
                    idx = torch.randint(0, V, (1, 12))
                    self.assertTrue(torch.equal(model.generate(idx, 10), again.generate(idx, 10)))

    def test_formats_that_cannot_hold_int8_refuse(self):
        import transformers
        model = quantize(tiny(tie_weights=True))
        save(model, self.tmp / 'q')
        with self.assertRaises(OSError):  # no model.safetensors: transformers does not misread int8
            transformers.GPT2LMHeadModel.from_pretrained(self.tmp / 'q')
        with self.assertRaisesRegex(ConfigError, 'int8.*llm.c'):
            save_llmc(model, self.tmp / 'm.bin')
        with self.assertRaisesRegex(ConfigError, 'quantize'):
            save(tiny(), self.tmp / 'fp32')
        with self.assertRaisesRegex(WeightsError, 'not a quantized'):
            read(self.tmp)
        with self.assertRaisesRegex(ConfigError, 'int8.*mingpt.quantize.save'):
            model.save_pretrained(self.tmp / 'hf')
        with self.assertRaisesRegex(ConfigError, 'int4'):
            quantize(tiny(), 'int4')
        self.assertIs(quantize(model, 'int8'), model)  # already int8: as it is
        self.assertIs(quantize(tiny(), None).lm_head.__class__, hardware.Linear)

    def test_kv_cache_and_no_cache_agree_with_the_exact_kernel(self):
        model = quantize(tiny())
        idx = torch.randint(0, V, (2, 6))
        with kernel('dequantize'):
            cached = model.generate(idx, 12)
            self.assertTrue(torch.equal(cached, model.generate(idx, 12, use_cache=False)))
        # the chosen kernel decodes too, to the same length, and not one token repeated
        out = model.generate(idx, 12)
        self.assertEqual(out.shape, (2, 18))
        self.assertGreater(len(set(out[0, 6:].tolist())), 1)

    def test_batch_engine(self):
        model = quantize(tiny())
        prompts = [torch.randint(0, V, (n,)).tolist() for n in (3, 7, 5)]
        for name in ('dequantize', hardware.int8_kernel().name):
            with self.subTest(kernel=name), kernel(name):
                engine = BatchEngine(model, rows=2, threaded=False)
                reqs = [engine.submit(p, 8) for p in prompts]
                for _ in range(40):
                    engine.step()
                self.assertTrue(all(r.finish_reason == 'length' for r in reqs))
                tokens = [list(r) for r in reqs]
                self.assertTrue(all(len(t) == 8 for t in tokens))
                if name == 'dequantize':  # exact: each request as generated alone
                    for p, t in zip(prompts, tokens):
                        self.assertEqual(t, [int(x) for x in stream(model, [p], 8)])


class TestChatFlag(unittest.TestCase):

    @common.slow
    def test_chat_quantize_flag(self):
        import tempfile
        from pathlib import Path
        from tests.test_chat import load_chat_model, make_chat_model_dir, run_cli, stream_reply
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = make_chat_model_dir(Path(tmp) / 'model', never_stop=True)
            model, tok = load_chat_model(model_dir)
            quantize(model, 'int8')
            proc = run_cli(model_dir, 'Hello there\n', '--quantize', 'int8', '--temperature', '0',
                           '--max-new-tokens', '10')
            self.assertEqual(proc.returncode, 0, proc.stderr)
            reply = ''.join(stream_reply(model, tok, [{'role': 'user', 'content': 'Hello there'}], 10,
                                         temperature=0))
            self.assertEqual(proc.stdout, reply + '\n')
            bad = run_cli(model_dir, 'hi\n', '--quantize', 'int3')
            self.assertEqual(bad.returncode, 2)
            self.assertIn('--quantize', bad.stderr)


if __name__ == '__main__':
    unittest.main()
