"""
The GPT model's contract: minGPT's config and presets, GPT-2's architecture and parameter names,
its initialisation, forward/loss, generate and the optimizer groups.
"""

import math
import unittest

import torch
import torch.nn as nn
from torch.nn import functional as F

from mingpt.errors import MinGPTError
from mingpt.model import GPT, PRESETS
from mingpt.utils import set_seed


def make_config(**overrides):
    config = GPT.get_default_config()
    config.model_type = 'gpt-nano'
    config.vocab_size = 11
    config.block_size = 16
    config.merge_from_dict(overrides)
    return config


class TestConfig(unittest.TestCase):

    def test_defaults_are_mingpts(self):
        C = GPT.get_default_config()
        self.assertEqual(C.model_type, 'gpt')
        for k in ('n_layer', 'n_head', 'n_embd', 'vocab_size', 'block_size'):
            self.assertIsNone(getattr(C, k))
        for k in ('embd_pdrop', 'resid_pdrop', 'attn_pdrop'):
            self.assertEqual(getattr(C, k), 0.1)

    def test_presets_have_mingpts_sizes(self):
        expected = {
            'openai-gpt': (12, 12, 768), 'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024),
            'gpt2-large': (36, 20, 1280), 'gpt2-xl': (48, 25, 1600), 'gopher-44m': (8, 16, 512),
            'gpt-mini': (6, 6, 192), 'gpt-micro': (4, 4, 128), 'gpt-nano': (3, 3, 48),
        }
        self.assertEqual({k: (v['n_layer'], v['n_head'], v['n_embd']) for k, v in PRESETS.items()}, expected)
        model = GPT(make_config(model_type='gpt-micro'))
        self.assertEqual((model.config.n_layer, model.config.n_head, model.config.n_embd), (4, 4, 128))
        self.assertEqual(len(model.transformer.h), 4)

    def test_explicit_sizes(self):
        model = GPT(make_config(model_type=None, n_layer=2, n_head=2, n_embd=8))
        self.assertEqual(model.transformer.wte.weight.shape, (11, 8))

    def test_bad_configs_are_clear_errors(self):
        cases = [
            (dict(n_layer=2), 'not both'),                                        # preset and sizes
            (dict(model_type=None), 'must all be set'),                           # neither
            (dict(model_type=None, n_layer=2, n_head=2), 'n_embd'),               # partly
            (dict(model_type='gpt-huge'), 'gpt-nano'),                            # unknown: names presets
            (dict(model_type='gpt'), 'presets'),                                  # minGPT's placeholder
            (dict(model_type=None, n_layer=2, n_head=3, n_embd=8), 'divisible'),  # heads don't divide
            (dict(vocab_size=None), 'vocab_size'),
            (dict(block_size=None), 'block_size'),
        ]
        for overrides, message in cases:
            with self.subTest(overrides=overrides):
                with self.assertRaisesRegex(ValueError, message):
                    GPT(make_config(**overrides))


class TestArchitecture(unittest.TestCase):

    def test_gpt2_parameter_count_and_names(self):
        config = make_config(model_type='gpt2', vocab_size=50257, block_size=1024)
        with torch.device('meta'):  # shapes only: no need to allocate 500 MB
            model = GPT(config)
        self.assertEqual(sum(p.numel() for p in model.transformer.parameters()), 124_439_808)
        names = set(model.state_dict())
        expected = {'transformer.wte.weight', 'transformer.wpe.weight', 'transformer.ln_f.weight',
                    'transformer.ln_f.bias', 'lm_head.weight'}
        for i in range(12):
            for sub in ('ln_1', 'attn.c_attn', 'attn.c_proj', 'ln_2', 'mlp.c_fc', 'mlp.c_proj'):
                expected |= {f'transformer.h.{i}.{sub}.weight', f'transformer.h.{i}.{sub}.bias'}
        self.assertEqual(names, expected)  # in particular: no attention mask buffer
        self.assertIsNone(model.lm_head.bias)

    def test_initialisation(self):
        set_seed(0)
        model = GPT(make_config(model_type=None, n_layer=4, n_head=4, n_embd=256, vocab_size=512, block_size=128))
        std = lambda name: dict(model.named_parameters())[name].std().item()
        self.assertAlmostEqual(std('transformer.wte.weight'), 0.02, delta=0.001)
        self.assertAlmostEqual(std('transformer.h.0.attn.c_attn.weight'), 0.02, delta=0.001)
        self.assertAlmostEqual(std('transformer.h.0.mlp.c_fc.weight'), 0.02, delta=0.001)
        residual = 0.02 / math.sqrt(2 * 4)
        self.assertAlmostEqual(std('transformer.h.1.attn.c_proj.weight'), residual, delta=0.0005)
        self.assertAlmostEqual(std('transformer.h.1.mlp.c_proj.weight'), residual, delta=0.0005)
        self.assertTrue(torch.all(model.transformer.h[0].attn.c_attn.bias == 0))
        self.assertTrue(torch.all(model.transformer.ln_f.weight == 1))

    def test_gelu_is_tanh_approximation(self):
        model = GPT(make_config())
        x = torch.linspace(-4, 4, 101)
        exact_tanh = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
        torch.testing.assert_close(model.transformer.h[0].mlp.act(x), exact_tanh)

    def test_attention_is_causal(self):
        # changing a future token must not change the logits of earlier positions
        set_seed(0)
        model = GPT(make_config()).eval()
        idx = torch.randint(0, 11, (2, 10))
        changed = idx.clone()
        changed[:, 6:] = (changed[:, 6:] + 1) % 11
        a, _ = model(idx)
        b, _ = model(changed)
        torch.testing.assert_close(a[:, :6], b[:, :6])
        self.assertFalse(torch.allclose(a[:, 6:], b[:, 6:]))

    def test_tied_weights_option(self):
        model = GPT(make_config(tie_weights=True))
        self.assertIs(model.lm_head.weight, model.transformer.wte.weight)
        self.assertIsNot(GPT(make_config()).lm_head.weight, GPT(make_config()).transformer.wte.weight)


class TestForward(unittest.TestCase):

    def setUp(self):
        set_seed(0)
        self.model = GPT(make_config()).eval()

    def test_logits_and_loss(self):
        idx = torch.randint(0, 11, (3, 7))
        targets = torch.randint(0, 11, (3, 7))
        logits, loss = self.model(idx)
        self.assertEqual(logits.shape, (3, 7, 11))
        self.assertIsNone(loss)
        logits, loss = self.model(idx, targets)
        expected = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))
        torch.testing.assert_close(loss, expected)

    def test_targets_minus_one_are_ignored(self):
        idx = torch.randint(0, 11, (2, 8))
        targets = torch.randint(0, 11, (2, 8))
        targets[:, :5] = -1
        logits, loss = self.model(idx, targets)
        expected = F.cross_entropy(logits[:, 5:].reshape(-1, 11), targets[:, 5:].reshape(-1))
        torch.testing.assert_close(loss, expected)

    def test_sequence_longer_than_block_size_is_a_clear_error(self):
        with self.assertRaisesRegex(ValueError, 'block_size'):
            self.model(torch.zeros(1, 17, dtype=torch.long))

    def test_ids_outside_the_vocabulary_are_a_clear_error(self):
        ok = torch.randint(0, 11, (2, 8))
        for idx, targets, name in ((torch.full((2, 8), 11), None, 'idx'), (ok.neg() - 1, None, 'idx'),
                                   (ok, torch.full((2, 8), 11), 'targets'), (ok, torch.full((2, 8), -2), 'targets')):
            with self.subTest(name=name, value=int(idx.view(-1)[0] if name == 'idx' else targets.view(-1)[0])):
                with self.assertRaisesRegex(ValueError, f'{name} holds token ids .* ids 0 to 10') as cm:
                    self.model(idx, targets)
                self.assertIsInstance(cm.exception, MinGPTError)
        targets = ok.clone()
        targets[:, :3] = -1  # -1 is the ignore index, not an error
        self.assertTrue(torch.isfinite(self.model(ok, targets)[1]))

    def test_dropout_only_in_training(self):
        idx = torch.randint(0, 11, (2, 8))
        self.model.eval()
        torch.testing.assert_close(self.model(idx)[0], self.model(idx)[0])
        self.model.train()
        self.assertFalse(torch.allclose(self.model(idx)[0], self.model(idx)[0]))


class TestGenerate(unittest.TestCase):

    def setUp(self):
        set_seed(0)
        self.model = GPT(make_config()).eval()

    def test_greedy_shape_and_determinism(self):
        idx = torch.randint(0, 11, (2, 3))
        out = self.model.generate(idx, 20)  # goes past block_size 16: the context is cropped
        self.assertEqual(out.shape, (2, 23))
        self.assertTrue(torch.equal(out[:, :3], idx))
        self.assertTrue(torch.equal(out, self.model.generate(idx, 20)))
        # greedy means each new token is the argmax of the model's prediction on what came before
        for t in range(3, 16):
            logits, _ = self.model(out[:, :t])
            self.assertTrue(torch.equal(logits[:, -1].argmax(-1), out[:, t]))

    def test_sampling_stays_in_vocab_and_top_k_one_is_greedy(self):
        idx = torch.randint(0, 11, (2, 3))
        out = self.model.generate(idx, 10, do_sample=True, temperature=1.5)
        self.assertTrue(((out >= 0) & (out < 11)).all())
        greedy = self.model.generate(idx, 10)
        self.assertTrue(torch.equal(self.model.generate(idx, 10, do_sample=True, top_k=1), greedy))


class TestOptimizer(unittest.TestCase):

    def test_groups_cover_every_parameter_once(self):
        from mingpt.trainer import Trainer
        train_config = Trainer.get_default_config()
        for tie in (False, True):
            with self.subTest(tie_weights=tie):
                model = GPT(make_config(tie_weights=tie))
                opt = model.configure_optimizers(train_config)
                self.assertIsInstance(opt, torch.optim.AdamW)
                groups = {g['weight_decay']: g['params'] for g in opt.param_groups}
                decay, no_decay = groups[0.1], groups[0.0]
                ids = [id(p) for p in decay + no_decay]
                self.assertEqual(len(ids), len(set(ids)))
                self.assertEqual(set(ids), {id(p) for p in model.parameters()})
                linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
                embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
                self.assertEqual({id(p) for p in decay}, linear_weights - embeddings)
                self.assertEqual(opt.defaults['lr'], 3e-4)
                self.assertEqual(opt.defaults['betas'], (0.9, 0.95))
                self.assertTrue(opt.defaults.get('fused') or opt.defaults.get('foreach'))


if __name__ == '__main__':
    unittest.main()
