"""
Tests for mingpt/loss.py, the loss without the logits (model(x, y, return_logits=False)): its loss and
every parameter's gradient equal the plain path's (lm_head's logits, then F.cross_entropy) over several
uneven chunks, with ignored targets, soft-capped logits, untied weights, bf16 autocast, a frozen lm_head
and under no_grad; a LoRA lm_head keeps its own logits; the Trainer and the evaluation take this path.
"""

import unittest
from unittest import mock

import torch

import mingpt.loss
from mingpt.lora import add_lora
from mingpt.metrics import loss_only
from mingpt.model import GPT
from mingpt.trainer import Trainer

V, T = 101, 16


def make_model(**options):
    torch.manual_seed(0)
    c = GPT.get_default_config()
    c.model_type, c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size = None, 2, 2, 16, V, T
    c.embd_pdrop = c.resid_pdrop = c.attn_pdrop = 0.0
    c.merge_from_dict(options)
    return GPT(c)


def batch():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, V, (3, T), generator=g), torch.randint(0, V, (3, T), generator=g)
    y[0, :5] = -1  # positions that do not count
    y[2, -1] = -1
    return x, y


def loss_and_grads(model, **kwargs):
    model.zero_grad(set_to_none=True)
    logits, loss = model(*batch(), **kwargs)
    (2.5 * loss).backward()  # the saved gradients scale with the incoming one
    return logits, loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class TestLinearCrossEntropy(unittest.TestCase):

    def setUp(self):
        # 7 rows a chunk: 48 rows in 7 chunks, the last one short
        patch = mock.patch.object(mingpt.loss, 'CHUNK_BYTES', 4 * V * 7)
        patch.start()
        self.addCleanup(patch.stop)

    def test_logits_that_fit_in_a_chunk_take_the_plain_way(self):
        with mock.patch.object(mingpt.loss.LinearCrossEntropy, 'apply', side_effect=AssertionError('chunked')):
            with mock.patch.object(mingpt.loss, 'CHUNK_BYTES', 4 * V * 48):
                self.assert_same_as_plain(make_model(logit_softcap=2.0))
            with mock.patch.object(mingpt.loss, 'CHUNK_BYTES', 4 * V * 47), self.assertRaisesRegex(AssertionError, 'chunked'):
                self.assert_same_as_plain(make_model())

    def assert_same_as_plain(self, model, atol=1e-6, rtol=1e-5):
        _, want, want_grads = loss_and_grads(model)
        logits, got, got_grads = loss_and_grads(model, return_logits=False)
        self.assertIsNone(logits)
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
        self.assertEqual(got_grads.keys(), want_grads.keys())
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], atol=atol, rtol=rtol, msg=name)

    def test_equals_logits_then_cross_entropy(self):
        for name, options in {'gpt-2': {}, 'softcap': dict(logit_softcap=2.0), 'untied': dict(tie_weights=False),
                              'recipe': dict(pos_emb='rope', norm='rmsnorm', mlp_act='relu2', bias=False)}.items():
            with self.subTest(name):
                self.assert_same_as_plain(make_model(**options))

    def test_bf16_autocast(self):
        model = make_model()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            self.assert_same_as_plain(model, atol=2e-2, rtol=2e-2)

    def test_frozen_lm_head_and_no_grad(self):
        model = make_model(tie_weights=False)
        model.lm_head.weight.requires_grad_(False)
        self.assert_same_as_plain(model)
        with torch.no_grad():
            want = model(*batch())[1]
            got = model(*batch(), return_logits=False)[1]
        torch.testing.assert_close(got, want)

    def test_every_target_ignored_is_nan_as_cross_entropy(self):
        model = make_model()
        x, y = batch()
        y[:] = -1
        with torch.no_grad():
            self.assertTrue(model(x, y)[1].isnan() and model(x, y, return_logits=False)[1].isnan())

    def test_lora_lm_head_keeps_its_own_logits(self):
        model = make_model(tie_weights=False)
        add_lora(model, r=2, dropout=0.0, targets=('lm_head',))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))  # B of LoRA starts at zero: make it count
            want = model(*batch())[1]
            logits, got = model(*batch(), return_logits=False)
        torch.testing.assert_close(got, want)
        self.assertIsNone(logits)

    def test_trainer_and_evaluation_skip_the_logits(self):
        model = make_model()
        self.assertEqual(loss_only(model), {'return_logits': False})
        self.assertEqual(loss_only(torch.nn.Linear(2, 2)), {})  # any other model: minGPT's forward(x, y)
        calls = []
        forward = model.forward
        model.forward = lambda *a, **k: calls.append(k.get('return_logits', True)) or forward(*a, **k)
        model.forward.__signature__ = __import__('inspect').signature(forward)
        x, y = batch()
        dataset = [(x[i], y[i]) for i in range(3)]
        config = Trainer.get_default_config()
        config.merge_from_dict(dict(max_iters=2, batch_size=3, num_workers=0, device='cpu', eval_interval=2,
                                   eval_iters=1))
        Trainer(config, model, dataset, val_dataset=dataset).run()
        self.assertTrue(calls and not any(calls), calls)


if __name__ == '__main__':
    unittest.main()
