"""
Tests for the architecture options of the modern recipe (GPT config: pos_emb, norm, qk_norm, mlp_act,
bias, zero_init_out, logit_softcap, value_embeds, token_shift): each one, and all of them together, computes
what it claims (rotary positions as transformers' LLaMA rotates, relative positions only; RMSNorm; scale-free
QK-norm; relu^2; no biases; zero output layers; capped logits; values plus each token's own embedding; each
embedding plus a share of the previous token's); decodes with the KV cache to the logits of a full forward,
generates the tokens of minGPT's recomputation, with speculative decoding the tokens of plain decoding, and
in the BatchEngine the tokens of each request alone; round-trips through a Trainer
checkpoint and a mingpt directory, and resumes bit-exact (with Muon); and is refused, by name, by the
GPT-2 formats (Hugging Face, llm.c). The default config's state dict keeps GPT-2's names.
"""

import json
import math
import unittest

import torch
from torch.nn import functional as F

from mingpt.batching import BatchEngine
from mingpt.checkpoint import trainer_state, write_checkpoint
from mingpt.errors import ConfigError
from mingpt.formats import LM_HEAD, param_names
from mingpt.generate import stream
from mingpt.model import GPT
from mingpt.weights import save_llmc

from tests.common import TempDirTestCase
from tests.test_trainer_resume import train

V, BLOCK = 23, 16

# one config per option, and the whole recipe at once
OPTIONS = {
    'rope': dict(pos_emb='rope'),
    'rmsnorm': dict(norm='rmsnorm'),
    'qk_norm': dict(qk_norm=True),
    'relu2': dict(mlp_act='relu2'),
    'no_bias': dict(bias=False),
    'zero_init_out': dict(zero_init_out=True),
    'softcap': dict(logit_softcap=3.0),
    'value_embeds': dict(value_embeds=True),
    'token_shift': dict(token_shift=True),
    'recipe': dict(pos_emb='rope', rope_base=500.0, norm='rmsnorm', qk_norm=True, mlp_act='relu2', bias=False,
                   zero_init_out=True, logit_softcap=3.0, value_embeds=True, token_shift=True),
}


def make_config(**options):
    c = GPT.get_default_config()
    c.model_type = None
    c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size = 2, 2, 32, V, BLOCK
    c.merge_from_dict(options)
    return c


def make_model(seed=0, trained=True, **options):
    """
    a small GPT with these options in eval mode. trained: the matrices scaled up 4x (zero-initialised
    ones drawn at random first, else they would hide everything after them), so that greedy decoding
    is not one token repeated and a wrong position changes the argmax; the mixing weights (v_mix, shift.mix) drawn
    in [0.5, 1.5], so that both terms of each mix count
    """
    torch.manual_seed(seed)
    model = GPT(make_config(**options)).eval()
    if trained:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2 and not p.any():
                    p.normal_(0.0, 0.02)
                p.mul_(4.0 if p.dim() >= 2 else 1.0)
                if name.endswith('mix'):
                    p.uniform_(0.5, 1.5)
    return model


class TestConfig(unittest.TestCase):

    def test_defaults_are_gpt2s_and_state_dict_keys_unchanged(self):
        c = GPT.get_default_config()
        self.assertEqual((c.pos_emb, c.norm, c.qk_norm, c.mlp_act, c.bias, c.zero_init_out, c.logit_softcap,
                          c.value_embeds, c.token_shift), ('learned', 'layernorm', False, 'gelu', True, False, None, False, False))
        model = GPT(make_config())
        expected = [name for name, _, _ in param_names(2)] + [LM_HEAD]
        self.assertEqual(sorted(model.state_dict()), sorted(expected))
        self.assertIsInstance(model.transformer.ln_f, torch.nn.LayerNorm)

    def test_a_config_without_the_options_gets_gpt2s(self):
        c = make_config()
        for k in ('pos_emb', 'norm', 'qk_norm', 'logit_softcap'):
            delattr(c, k)
        model = GPT(c)
        self.assertEqual((model.config.pos_emb, model.config.logit_softcap), ('learned', None))
        self.assertIn('transformer.wpe.weight', model.state_dict())

    def test_bad_values_are_clear_errors(self):
        bad = [(dict(pos_emb='alibi'), 'pos_emb'), (dict(norm='batchnorm'), 'norm'), (dict(mlp_act='swiglu'), 'mlp_act'),
               (dict(qk_norm=1), 'qk_norm'), (dict(bias='no'), 'bias'), (dict(logit_softcap=0), 'logit_softcap'),
               (dict(rope_base=1.0), 'rope_base'), (dict(pos_emb='rope', n_head=32, n_embd=96), 'even'),
               (dict(zero_init_out=True, tie_weights=True), 'tie_weights=False'), (dict(value_embeds=4), 'value_embeds'),
               (dict(token_shift='yes'), 'token_shift')]
        for options, message in bad:
            with self.subTest(**options), self.assertRaisesRegex(ConfigError, message):
                GPT(make_config(**options))


class TestWhatEachOptionComputes(unittest.TestCase):

    def test_rope_rotates_as_transformers_llama_and_sees_relative_positions_only(self):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        from mingpt.layers import apply_rotary, rotary_angles
        q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
        cos, sin = rotary_angles(torch.arange(5), 8, 10000.0)
        ref_q, ref_k = apply_rotary_pos_emb(q, k, torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None])
        torch.testing.assert_close(apply_rotary(q, cos, sin), ref_q)
        torch.testing.assert_close(apply_rotary(k, cos, sin), ref_k)

        # attention scores q_m . k_n depend on m - n only: shifting every position changes none of them
        def scores(start):
            cos, sin = rotary_angles(torch.arange(start, start + 5), 8, 10000.0)
            return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2)
        torch.testing.assert_close(scores(7), scores(0), rtol=1e-4, atol=1e-4)
        # a position per row, (B, T) ids, as a batched decode step has: row b turns by its own positions
        per_row = rotary_angles(torch.tensor([[3], [9]]), 8, 10000.0)
        for b, p in enumerate((3, 9)):
            torch.testing.assert_close(apply_rotary(q[:, :, :1], *per_row)[b],
                                       apply_rotary(q[b:b + 1, :, :1], *rotary_angles(torch.tensor([p]), 8, 10000.0))[0])
        self.assertNotIn('transformer.wpe.weight', make_model(pos_emb='rope').state_dict())

    def test_rmsnorm_relu2_no_bias(self):
        model = make_model(norm='rmsnorm', mlp_act='relu2', bias=False)
        x = torch.randn(2, 4, 32)
        ln = model.transformer.h[0].ln_1
        torch.testing.assert_close(ln(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * ln.weight)
        mlp = model.transformer.h[0].mlp
        torch.testing.assert_close(mlp(x), F.relu(x @ mlp.c_fc.weight.T).pow(2) @ mlp.c_proj.weight.T)
        self.assertFalse([k for k in model.state_dict() if k.endswith('.bias')])

    def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(self):
        x = torch.randint(V, (2, 9))
        for qk_norm in (True, False):
            model = make_model(qk_norm=qk_norm, bias=False)
            with torch.no_grad():
                before = model(x)[0]
                for block in model.transformer.h:
                    block.attn.c_attn.weight[:64].mul_(7.0)  # the query and key rows
                after = model(x)[0]
            with self.subTest(qk_norm=qk_norm):
                if qk_norm:
                    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
                else:
                    self.assertGreater((after - before).abs().max().item(), 1e-2)

    def test_zero_init_out_starts_uniform_and_learns(self):
        model = make_model(trained=False, zero_init_out=True).train()
        zero = [n for n, p in model.named_parameters() if n.endswith('weight') and not p.any()]
        self.assertEqual(sorted(zero), sorted([LM_HEAD] + [f'transformer.h.{i}.{m}.c_proj.weight' for i in range(2)
                                                           for m in ('attn', 'mlp')]))
        x = torch.randint(V, (2, 8))
        _, loss = model(x, x)
        self.assertAlmostEqual(loss.item(), math.log(V), places=5)  # uniform over the vocabulary
        loss.backward()
        self.assertGreater(model.lm_head.weight.grad.abs().max().item(), 0)

    def test_value_embeds_add_each_tokens_own_row_to_the_values(self):
        model = make_model(value_embeds=True, bias=False)
        x = torch.randint(V, (2, 8))
        attn, table = model.transformer.h[0].attn, model.transformer.ve[0]
        h = torch.randn(2, 8, 32)
        with torch.no_grad():
            a, b = attn.v_mix
            q, k, v = (h @ attn.c_attn.weight.T).split(32, dim=-1)
            heads = lambda t: t.view(2, 8, 2, 16).transpose(1, 2)  # (B, nh, T, hs)
            y = F.scaled_dot_product_attention(heads(q), heads(k), a * heads(v) + b * heads(table(x)), is_causal=True)
            expected = y.transpose(1, 2).reshape(2, 8, 32) @ attn.c_proj.weight.T
            torch.testing.assert_close(attn(h, ve=table(x)), expected, rtol=1e-5, atol=1e-5)
            # one table per layer, grown with the vocabulary, old tokens' logits unchanged
            self.assertEqual(len(model.transformer.ve), 2)
            before = model(x)[0]
            model.resize_token_embeddings(V + 3)
            self.assertEqual([t.weight.shape for t in model.transformer.ve], [(V + 3, 32)] * 2)
            torch.testing.assert_close(model(x)[0][..., :V], before)

    def test_token_shift_adds_a_share_of_the_previous_tokens_embedding(self):
        model = make_model(token_shift=True)
        plain = make_model()  # the same seed: the same weights, shift.mix aside
        x = torch.randint(V, (2, 8))
        e = model.transformer.wte(x)  # (B, T, C)
        seen = []
        model.transformer.drop.register_forward_hook(lambda m, args, out: seen.append(args[0]))
        mix = model.transformer.shift.mix
        with torch.no_grad():
            model(x)
            expected = e + mix * torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
            torch.testing.assert_close(seen[0] - model.transformer.wpe(torch.arange(8)), expected)
            mix.zero_()  # no share: GPT-2's model exactly
            torch.testing.assert_close(model(x)[0], plain(x)[0])
        self.assertEqual(mix.shape, (32,))
        self.assertEqual(sorted(model.state_dict()), sorted(list(plain.state_dict()) + ['transformer.shift.mix']))

    def test_softcap_bounds_the_logits(self):
        capped = make_model(logit_softcap=1.0)
        plain = make_model()
        x = torch.randint(V, (2, 8))
        with torch.no_grad():
            raw, out = plain(x)[0], capped(x)[0]
        self.assertGreater(raw.abs().max().item(), 1.0)
        self.assertLess(out.abs().max().item(), 1.0)
        torch.testing.assert_close(out, torch.tanh(raw))


class TestDecoding(unittest.TestCase):
    """ every option with the KV cache, generate (batches of prompts too) and the BatchEngine """

    def test_kv_cache_logits_equal_a_full_forward(self):
        x = torch.randint(V, (2, 12))
        for name, options in OPTIONS.items():
            model = make_model(**options)
            with torch.no_grad():
                full = model(x)[0]
                cache = model.make_kv_cache(2)
                parts = [model(x[:, :5], kv_cache=cache, cache_pos=0)[0]]
                parts += [model(x[:, t:t + 1], kv_cache=cache, cache_pos=t)[0] for t in range(5, 12)]
            with self.subTest(name):
                torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)

    def test_generate_with_cache_equals_recomputation(self):
        for name, options in OPTIONS.items():
            model = make_model(**options)
            prompts = [torch.randint(V, (n,)).tolist() for n in (3, 7)]
            with self.subTest(name):
                # past the context window too: the cached engine re-prefills as minGPT crops
                cached = model.generate(prompts, 20)
                recomputed = model.generate(prompts, 20, use_cache=False)
                self.assertTrue(torch.equal(cached, recomputed))
                sampled = [model.generate(prompts, 10, do_sample=True, seed=3, use_cache=c) for c in (True, False)]
                self.assertTrue(torch.equal(*sampled))
                # a row of a batch gets the tokens of its prompt alone (its own positions)
                alone = model.generate([prompts[0]], 20)
                self.assertEqual(cached[0, -20:].tolist(), alone[0, -20:].tolist())
                self.assertGreater(len(set(cached[0, -20:].tolist())), 1)  # not one token repeated

    def test_speculative_decoding_gives_plain_decodings_tokens(self):
        # greedy: a draft, accepted or rewound, never changes a token
        prompts = [[1, 2, 3, 4, 1, 2, 3], [5, 6, 7, 5, 6]]
        for name, options in OPTIONS.items():
            model = make_model(**options)
            plain = model.generate(prompts, 14)
            with self.subTest(name):
                self.assertTrue(torch.equal(model.generate(prompts, 14, prompt_lookup_num_tokens=3), plain))
                drafter = make_model(seed=1, **options)
                self.assertTrue(torch.equal(model.generate(prompts, 14, assistant_model=drafter), plain))

    def test_batch_engine_tokens_equal_generation_alone(self):
        for name, options in OPTIONS.items():
            model = make_model(**options)
            g = torch.Generator().manual_seed(1)
            requests = [(torch.randint(V, (n,), generator=g).tolist(), k, o) for n, k, o in
                        [(3, 9, {}), (6, 14, dict(do_sample=True, seed=1)), (1, 5, {}), (10, 8, {})]]
            with BatchEngine(model, rows=2, threaded=False) as engine:
                submitted = [engine.submit(p, k, **o) for p, k, o in requests]
                while any(r.finish_reason is None for r in submitted):
                    engine.step()
                got = [list(r) for r in submitted]
            with self.subTest(name):
                for (p, k, o), tokens in zip(requests, got):
                    self.assertEqual(tokens, [int(t) for t in stream(model, [p], k, **o)])


class TestSaving(TempDirTestCase):

    def _same_model(self, loaded, model, options):
        for k, v in options.items():
            self.assertEqual(getattr(loaded.config, k), v, k)
        x = torch.randint(V, (2, 10))
        with torch.no_grad():
            self.assertTrue(torch.equal(loaded.eval()(x)[0], model(x)[0]))

    def test_trainer_checkpoint_and_mingpt_directory_round_trip(self):
        for name, options in OPTIONS.items():
            for tie in (False, True):
                if tie and options.get('zero_init_out'):
                    continue
                model = make_model(tie_weights=tie, **options)
                with self.subTest(name, tie_weights=tie):
                    ckpt = self.tmp / f'{name}-{tie}' / 'ckpt'
                    write_checkpoint(ckpt, model, trainer_state(3, None, None, None, None, 4, 1.0))
                    self._same_model(GPT.from_pretrained(ckpt), model, options)
                    out = model.save_pretrained(self.tmp / f'{name}-{tie}' / 'model', format='mingpt')
                    loaded = GPT.from_pretrained(out)
                    self._same_model(loaded, model, options)
                    self.assertEqual(loaded.lm_head.weight is loaded.transformer.wte.weight, tie)

    def test_a_resumed_run_of_the_recipe_is_bit_exact(self):
        def model():
            torch.manual_seed(0)
            c = make_config(**OPTIONS['recipe'])
            c.vocab_size, c.block_size = 5, 8  # RepeatDataset's
            return GPT(c)
        straight = train(str(self.tmp / 'a'), 6, model=model(), optimizer='muon').model
        train(str(self.tmp / 'b'), 4, model=model(), optimizer='muon')
        resumed = train(str(self.tmp / 'b'), 6, model=model(), optimizer='muon', resume=True)
        self.assertEqual(resumed.iter_num, 6)
        for (name, a), b in zip(straight.named_parameters(), resumed.model.parameters()):
            self.assertTrue(torch.equal(a, b), name)
        self.assertTrue(straight.lm_head.weight.any())  # it trained away from its zero start

    def test_a_checkpoint_from_before_the_options_loads_as_gpt2(self):
        model = make_model()
        ckpt = self.tmp / 'ckpt'
        write_checkpoint(ckpt, model, trainer_state(1, None, None, None, None, 4, 1.0))
        info = json.loads((ckpt / 'config.json').read_text())
        for k in ('pos_emb', 'rope_base', 'norm', 'qk_norm', 'mlp_act', 'bias', 'zero_init_out', 'logit_softcap',
                  'value_embeds', 'token_shift'):
            del info['model'][k]
        (ckpt / 'config.json').write_text(json.dumps(info))
        self._same_model(GPT.from_pretrained(ckpt), model, {'pos_emb': 'learned'})

    def test_gpt2_formats_refuse_by_name(self):
        for name, options in OPTIONS.items():
            if name == 'zero_init_out':
                continue  # an initialisation: the trained model is a GPT-2
            model = make_model(tie_weights=not options.get('zero_init_out'), **options)
            first = next(iter(options))
            with self.subTest(name):
                with self.assertRaisesRegex(ConfigError, f"Hugging Face.*{first}=.*format='mingpt'"):
                    model.save_pretrained(self.tmp / name)
                with self.assertRaisesRegex(ConfigError, f"llm.c.*{first}="):
                    save_llmc(model, self.tmp / f'{name}.bin')
                self.assertFalse((self.tmp / name / 'config.json').exists())
        with self.assertRaisesRegex(ConfigError, "format is 'hf'"):
            make_model().save_pretrained(self.tmp / 'x', format='gguf')

    def test_zero_init_out_exports_to_transformers(self):
        import transformers
        model = make_model(zero_init_out=True)
        out = model.save_pretrained(self.tmp / 'hf')
        hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
        x = torch.randint(V, (2, 10))
        with torch.no_grad():
            torch.testing.assert_close(hf(x).logits, model(x)[0], rtol=1e-4, atol=1e-4)


if __name__ == '__main__':
    unittest.main()
