"""
Tests for mingpt/generate.py, the generation engine behind GPT.generate: the KV cache gives the
tokens of minGPT's recompute-everything loop (also past block_size), batched prompts give the
tokens of each prompt alone, the sampling filters match transformers', seeds reproduce, eos
stops, streaming gives generate's tokens, bad arguments are clear errors, and greedy decoding of
a transformers GPT2LMHeadModel's weights gives hf.generate's tokens.
"""

import tempfile
import unittest

import torch

from mingpt.sampling import MIN_TEMPERATURE, SamplingOptions, filter_logits, sample
from mingpt.generate import checked_options, stream, stream_text, decode_text
from mingpt.hardware import ONEDNN_MIN_WEIGHT
from mingpt.model import GPT

from tests import common

def tiny_gpt(n_layer=2, n_head=2, n_embd=16, vocab_size=13, block_size=8, seed=0):
    return common.tiny_gpt(vocab_size, block_size, n_layer, n_head, n_embd, seed=seed, sharpen=8)


def mingpt_reference(model, idx, max_new_tokens):
    """ minGPT's own greedy generate, verbatim in spirit: crop to block_size, full forward, argmax """
    with torch.no_grad():
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= model.block_size else idx[:, -model.block_size:]
            logits, _ = model(idx_cond)
            idx_next = logits[:, -1, :].argmax(dim=-1, keepdim=True)
            idx = torch.cat((idx, idx_next), dim=1)
    return idx


class TestCacheMatchesRecompute(unittest.TestCase):

    def test_cached_equals_uncached_and_mingpt(self):
        # sizes, prompt lengths (1, middle, block_size - 1, block_size), batch 1 and 3, and enough
        # new tokens to slide past block_size (every step past it crops)
        for sizes in [dict(n_layer=1, n_head=1, n_embd=8, block_size=8),
                      dict(n_layer=3, n_head=4, n_embd=32, block_size=6)]:
            model = tiny_gpt(**sizes)
            bs = model.block_size
            for T, B in ((1, 1), (3, 3), (bs - 1, 1), (bs, 2)):
                with self.subTest(sizes=sizes, T=T, B=B):
                    idx = torch.randint(0, 13, (B, T))
                    n = bs + 3
                    ref = mingpt_reference(model, idx, n)
                    cached = model.generate(idx, n)
                    self.assertEqual(cached.shape, (B, T + n))
                    self.assertTrue(torch.equal(cached, ref))
                    self.assertTrue(torch.equal(model.generate(idx, n, use_cache=False), ref))

    def test_cached_equals_uncached_with_onednn_sized_layers(self):
        # n_embd 384: most products are big enough for the oneDNN kernel (model.Linear), the
        # attention output projection is not, so decode steps and prefills mix both kernels
        model = tiny_gpt(n_layer=2, n_head=4, n_embd=384, vocab_size=13, block_size=12)
        self.assertGreaterEqual(model.transformer.h[0].mlp.c_fc.weight.numel(), ONEDNN_MIN_WEIGHT)
        for T, B in ((1, 1), (5, 2)):
            with self.subTest(T=T, B=B):
                idx = torch.randint(0, 13, (B, T))
                ref = mingpt_reference(model, idx, 15)
                self.assertTrue(torch.equal(model.generate(idx, 15), ref))
                self.assertTrue(torch.equal(model.generate(idx, 15, use_cache=False), ref))

    def test_cache_logits_match_full_forward(self):
        # the decode path itself (prefill + one step) against a full forward, not just argmaxes
        model = tiny_gpt()
        idx = torch.randint(0, 13, (2, 7))
        with torch.no_grad():
            full, _ = model(idx)
            cache = model.make_kv_cache(2)
            pre, _ = model(idx[:, :5], kv_cache=cache)
            step, _ = model(idx[:, 5:6], kv_cache=cache, cache_pos=5, last_only=True)
            two, _ = model(idx[:, 6:7], kv_cache=cache, cache_pos=6)
        torch.testing.assert_close(pre, full[:, :5], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step[:, 0], full[:, 5], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(two[:, 0], full[:, 6], rtol=1e-5, atol=1e-5)

    def test_window_keep_re_prefills_the_last_tokens(self):
        model = tiny_gpt(block_size=8)
        idx = torch.randint(0, 13, (2, 3))
        default = model.generate(idx, 20)
        for keep in (1, 4, 7):
            with self.subTest(keep=keep):
                out = model.generate(idx, 20, window_keep=keep)
                self.assertEqual(out.shape, (2, 23))
                # identical while the context has room: the prompt and 6 new tokens fill all 8
                # positions of the cache, and the 6th new token (column 8) still saw them all...
                self.assertTrue(torch.equal(out[:, :9], default[:, :9]))
                # ...then the next token is predicted from the last `keep` tokens only
                with torch.no_grad():
                    logits, _ = model(out[:, 9 - keep:9])
                self.assertTrue(torch.equal(out[:, 9], logits[:, -1].argmax(-1)))
                # and the following one reuses that shorter window through the cache
                with torch.no_grad():
                    logits, _ = model(out[:, 9 - keep:10])
                self.assertTrue(torch.equal(out[:, 10], logits[:, -1].argmax(-1)))

    def test_output_is_an_ordinary_tensor(self):
        # decoding runs under inference_mode; what it hands out must still work in place and in
        # autograd, as minGPT's no_grad output did (e.g. to train on generated sequences)
        model = tiny_gpt()
        out = model.generate(torch.randint(0, 13, (2, 3)), 4)
        out[:, 0] = 1
        tok = next(iter(stream(model, out, 1)))
        tok += 1
        model.train()
        _, loss = model(out[:, :-1], out[:, 1:])
        loss.backward()
        model.eval()

    def test_zero_new_tokens_returns_the_prompt(self):
        model = tiny_gpt()
        idx = torch.randint(0, 13, (2, 3))
        self.assertTrue(torch.equal(model.generate(idx, 0), idx))
        self.assertEqual(list(stream(model, idx, 0)), [])


class TestBatchedPrompts(unittest.TestCase):

    def setUp(self):
        self.model = tiny_gpt(block_size=10)
        g = torch.Generator().manual_seed(1)
        self.prompts = [torch.randint(0, 13, (n,), generator=g) for n in (3, 1, 7, 10)]

    def alone(self, p, n, **kw):
        return self.model.generate(p[None], n, **kw)[0, -n:]

    def test_list_of_prompts_equals_one_by_one(self):
        for use_cache in (True, False):
            for n in (3, 14):  # 14 slides past block_size 10 for every row
                with self.subTest(use_cache=use_cache, n=n):
                    out = self.model.generate(self.prompts, n, use_cache=use_cache)
                    self.assertEqual(out.shape, (4, 10 + n))
                    for i, p in enumerate(self.prompts):
                        self.assertTrue(torch.equal(out[i, -n:], self.alone(p, n)), f"row {i}")
                        self.assertTrue(torch.equal(out[i, 10 - len(p):10], p))  # left padded

    def test_left_padded_tensor_and_mask_equals_one_by_one(self):
        pad = 12
        T = max(len(p) for p in self.prompts)
        idx = torch.full((4, T), pad)
        mask = torch.zeros(4, T, dtype=torch.long)
        for i, p in enumerate(self.prompts):
            idx[i, T - len(p):] = p
            mask[i, T - len(p):] = 1
        out = self.model.generate(idx, 6, attention_mask=mask)
        for i, p in enumerate(self.prompts):
            self.assertTrue(torch.equal(out[i, -6:], self.alone(p, 6)), f"row {i}")
        # the pad id does not matter, it is masked
        idx2 = idx.masked_fill(mask == 0, 0)
        self.assertTrue(torch.equal(self.model.generate(idx2, 6, attention_mask=mask)[:, T:], out[:, T:]))

    def test_sampling_in_a_batch_is_per_row(self):
        # same seed, same prompt in every row: rows still draw their own samples
        out = self.model.generate([self.prompts[0]] * 8, 10, do_sample=True, seed=0)
        self.assertGreater(len({tuple(r.tolist()) for r in out}), 1)


class TestSampling(unittest.TestCase):

    def setUp(self):
        self.model = tiny_gpt()
        self.idx = torch.randint(0, 13, (2, 4))
        self.greedy = self.model.generate(self.idx, 12)

    def test_greedy_ways(self):
        g = self.greedy
        self.assertTrue(torch.equal(self.model.generate(self.idx, 12, do_sample=True, top_k=1, seed=3), g))
        self.assertTrue(torch.equal(self.model.generate(self.idx, 12, do_sample=True, top_p=1e-9, seed=3), g))
        self.assertTrue(torch.equal(self.model.generate(self.idx, 12, do_sample=True, temperature=0), g))
        # minGPT's do_sample=False ignores temperature and top_k
        self.assertTrue(torch.equal(self.model.generate(self.idx, 12, temperature=0.3, top_k=5), g))

    def test_seed_reproduces_and_differs(self):
        kw = dict(do_sample=True, temperature=2.0)
        a = self.model.generate(self.idx, 30, seed=1, **kw)
        self.assertTrue(torch.equal(a, self.model.generate(self.idx, 30, seed=1, **kw)))
        self.assertFalse(torch.equal(a, self.model.generate(self.idx, 30, seed=2, **kw)))
        # a generator seeded alike draws alike; the global RNG is left alone
        state = torch.get_rng_state()
        b = self.model.generate(self.idx, 30, generator=torch.Generator().manual_seed(1), **kw)
        self.assertTrue(torch.equal(a, b))
        self.assertTrue(torch.equal(state, torch.get_rng_state()))
        # without either, torch's global RNG is used, like minGPT: torch.manual_seed reproduces
        torch.manual_seed(5)
        c = self.model.generate(self.idx, 30, **kw)
        torch.manual_seed(5)
        self.assertTrue(torch.equal(c, self.model.generate(self.idx, 30, **kw)))

    def test_sampled_cached_equals_uncached(self):
        kw = dict(do_sample=True, top_k=5, top_p=0.9, temperature=1.3, seed=7)
        self.assertTrue(torch.equal(self.model.generate(self.idx, 20, **kw),
                                    self.model.generate(self.idx, 20, use_cache=False, **kw)))

    def test_filters_match_transformers(self):
        from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
        torch.manual_seed(0)
        logits = torch.randn(4, 100) * 3
        for k in (1, 5, 50, 100, 500):
            ours = filter_logits(logits, top_k=k)
            hf = TopKLogitsWarper(top_k=k)(None, logits.clone())
            self.assertTrue(torch.equal(torch.isinf(ours), torch.isinf(hf)), f"top_k={k}")
        for p in (0.01, 0.3, 0.9, 0.999, 1.0):
            ours = filter_logits(logits, top_p=p)
            hf = TopPLogitsWarper(top_p=p)(None, logits.clone())
            self.assertTrue(torch.equal(torch.isinf(ours), torch.isinf(hf)), f"top_p={p}")
            self.assertTrue(torch.equal(ours[~torch.isinf(ours)], logits[~torch.isinf(ours)]))

    def test_draws_stay_in_the_kept_set(self):
        probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
        logits = probs.log().repeat(2000, 1)

        g = torch.Generator().manual_seed(0)
        drawn = sample(logits, SamplingOptions(do_sample=True, top_p=0.7), g)
        self.assertEqual(set(drawn.tolist()), {0, 1})  # 0.5 < 0.7 so token 1 is still needed
        drawn = sample(logits, SamplingOptions(do_sample=True, top_k=3), g)
        self.assertEqual(set(drawn.tolist()), {0, 1, 2})
        drawn = sample(logits, SamplingOptions(do_sample=True), g)
        self.assertEqual(set(drawn.tolist()), {0, 1, 2, 3})
        # frequencies follow the distribution (2000 draws: 3 sigma is about 0.035)
        freq = torch.bincount(drawn, minlength=4).float() / len(drawn)
        self.assertTrue(torch.allclose(freq, probs[0], atol=0.04), freq)


class TestEosAndStreaming(unittest.TestCase):

    def setUp(self):
        self.model = tiny_gpt()
        self.idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
        self.free = self.model.generate(self.idx, 15)[:, 3:]  # no eos: all 15 steps

    def test_eos_stops_each_row(self):
        eos = int(self.free[0, 2])  # row 0 emits this at its third step
        out = self.model.generate(self.idx, 15, eos_token_id=eos, pad_token_id=0)[:, 3:]
        first = [(r == eos).nonzero()[0, 0].item() if (r == eos).any() else None for r in self.free]
        steps = max(15 if f is None else f + 1 for f in first)
        self.assertEqual(out.shape, (2, steps))  # stops when every row has finished
        for r, f in enumerate(first):
            stop = steps if f is None else f + 1
            self.assertTrue(torch.equal(out[r, :stop], self.free[r, :stop]))
            self.assertTrue((out[r, stop:] == 0).all())  # then pad_token_id

    def test_eos_single_row_returns_shorter(self):
        eos = int(self.free[1, 4])
        first = (self.free[1] == eos).nonzero()[0, 0].item()
        out = self.model.generate(self.idx[1:], 15, eos_token_id=eos)
        self.assertEqual(out.shape, (1, 3 + first + 1))
        self.assertEqual(int(out[0, -1]), eos)

    def test_stream_yields_generates_tokens(self):
        for kw in (dict(), dict(do_sample=True, top_p=0.8, seed=3)):
            steps = list(stream(self.model, self.idx, 15, **kw))
            self.assertEqual(len(steps), 15)
            self.assertTrue(all(s.shape == (2,) and s.dtype == torch.long for s in steps))
            self.assertTrue(torch.equal(torch.stack(steps, 1), self.model.generate(self.idx, 15, **kw)[:, 3:]))

    def test_stream_checks_arguments_at_call_time(self):
        with self.assertRaises(ValueError):
            stream(self.model, self.idx, 5, top_p=0)  # no next() needed

    def test_stream_text_equals_decoding_everything(self):
        decode = lambda ids: ''.join(chr(ord('a') + i) for i in ids)
        pieces = list(stream_text(self.model, self.idx[:1], 12, decode))
        self.assertEqual(''.join(pieces), decode(self.free[0, :12].tolist()))
        eos = int(self.free[0, 5])
        first = (self.free[0] == eos).nonzero()[0, 0].item()
        text = ''.join(stream_text(self.model, self.idx[:1], 12, decode, eos_token_id=eos))
        self.assertEqual(text, decode(self.free[0, :first].tolist()))  # eos itself is not text
        with self.assertRaises(ValueError):
            list(stream_text(self.model, self.idx, 3, decode))  # a batch

    def test_decode_text_holds_split_utf8_characters(self):
        # byte-level tokens, as GPT-2's BPE can produce: 'é' is c3 a9, '😀' is f0 9f 98 80
        decode = lambda ids: bytes(ids).decode('utf-8', errors='replace')
        ids = list('hé😀!'.encode('utf-8'))
        pieces = list(decode_text(ids, decode))
        self.assertEqual(''.join(pieces), 'hé😀!')
        self.assertEqual(pieces, ['h', 'é', '😀', '!'])  # never a half character
        # a dangling partial character at the end is still flushed
        self.assertEqual(list(decode_text([104, 0xc3], decode)), ['h', '\ufffd'])

    def test_decode_text_does_not_wait_behind_tokens_that_straddle_characters(self):
        # every token ends inside the next character: all but that last character is yielded at once
        table = {0: b'a\xc3', 1: b'\xa9b\xc3', 2: b'\xa9c\xc3', 3: b'\xa9', 4: b'\xff'}
        decode = lambda ids: b''.join(table[i] for i in ids).decode('utf-8', errors='replace')
        pieces = list(decode_text([0, 1, 2, 3], decode))
        self.assertEqual(pieces, ['a', '\u00e9b', '\u00e9c', '\u00e9'])
        # invalid bytes are text of their own (U+FFFD), not a reason to hold the rest back
        pieces = list(decode_text([4, 4, 0, 3], decode))
        self.assertEqual(''.join(pieces), decode([4, 4, 0, 3]))
        self.assertEqual(pieces, ['\ufffd', '\ufffda', '\u00e9'])


class TestErrors(unittest.TestCase):

    def setUp(self):
        self.model = tiny_gpt(block_size=8)
        self.idx = torch.randint(0, 13, (1, 3))

    def test_bad_prompts(self):
        m = self.model
        with self.assertRaisesRegex(ValueError, 'empty'):
            m.generate(torch.zeros(1, 0, dtype=torch.long), 3)
        with self.assertRaisesRegex(ValueError, 'empty'):
            m.generate([[1, 2], []], 3)
        with self.assertRaisesRegex(ValueError, 'empty'):
            m.generate([], 3)
        with self.assertRaisesRegex(ValueError, r'9 tokens.*block_size\) is 8.*idx\[:, -8:\]'):
            m.generate(torch.zeros(1, 9, dtype=torch.long), 3)
        with self.assertRaisesRegex(ValueError, 'block_size'):
            m.generate([[1] * 9, [1]], 3)
        with self.assertRaisesRegex(ValueError, r'\[0, 13\)'):
            m.generate(torch.tensor([[1, 13]]), 3)
        with self.assertRaisesRegex(ValueError, r'p\[None\]'):
            m.generate(torch.tensor([1, 2]), 3)
        with self.assertRaisesRegex(ValueError, 'LEFT'):
            m.generate(torch.tensor([[1, 2, 3]]), 3, attention_mask=torch.tensor([[1, 1, 0]]))
        with self.assertRaisesRegex(ValueError, 'shape'):
            m.generate(torch.tensor([[1, 2, 3]]), 3, attention_mask=torch.tensor([[1, 1]]))

    def test_bad_sampling_arguments(self):
        for kw, pattern in [(dict(top_p=0.0), 'top_p'), (dict(top_p=1.5), 'top_p'),
                            (dict(temperature=-0.1), 'temperature'), (dict(temperature=float('nan')), 'temperature'),
                            (dict(top_k=0), 'top_k'), (dict(top_k=2.5), 'top_k'),
                            (dict(temperature=float('inf')), 'temperature'), (dict(temperature='hot'), 'temperature'),
                            (dict(top_p='0.9'), 'top_p'), (dict(seed=2 ** 64), 'seed'), (dict(seed=1.5), 'seed'),
                            (dict(eos_token_id=-1), 'eos_token_id'), (dict(eos_token_id=[1, 'x']), 'eos_token_id'),
                            (dict(seed=1, generator=torch.Generator()), 'seed'),
                            (dict(window_keep=0), 'window_keep'), (dict(window_keep=9), 'window_keep')]:
            with self.subTest(**{k: str(v) for k, v in kw.items()}):
                with self.assertRaisesRegex(ValueError, pattern):
                    self.model.generate(self.idx, 3, do_sample=True, **kw)
        with self.assertRaisesRegex(ValueError, 'max_new_tokens'):
            self.model.generate(self.idx, -1)
        with self.assertRaisesRegex(TypeError, 'the sampling options are temperature, do_sample'):
            self.model.generate(self.idx, 3, temprature=0.5)
        with self.assertRaisesRegex(ValueError, 'not both'):
            self.model.generate(self.idx, 3, options=SamplingOptions(), top_k=3)
        checked_options(0, temperature=0.0, top_k=1, top_p=1.0, seed=2 ** 64 - 1)  # the edges of the ranges are fine

    def test_tiny_temperatures_are_greedy(self):
        # logits / 1e-300 would be inf, and torch's sampling raises on the NaN probabilities that follow
        greedy = self.model.generate(self.idx, 5)
        for t in (1e-300, 5e-324, MIN_TEMPERATURE / 2):
            with self.subTest(temperature=t):
                self.assertTrue(torch.equal(self.model.generate(self.idx, 5, do_sample=True, temperature=t), greedy))

    def test_options_object_equals_keywords(self):
        kw = dict(do_sample=True, top_k=4, temperature=1.5, seed=3)
        self.assertTrue(torch.equal(self.model.generate(self.idx, 8, options=SamplingOptions(**kw)),
                                    self.model.generate(self.idx, 8, **kw)))

    def test_a_list_of_stop_ids_stops_at_any(self):
        greedy = self.model.generate(self.idx, 8)[0, 3:].tolist()
        out = list(stream(self.model, self.idx, 8, eos_token_id=[100, greedy[2]], pad_token_id=0))
        self.assertEqual(len(out), 3)


class TestAgainstTransformers(unittest.TestCase):
    """ greedy decoding of the same weights gives transformers' generate tokens """

    @classmethod
    def setUpClass(cls):
        import transformers
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=24,
                                      bos_token_id=96, eos_token_id=96, pad_token_id=96)
        cls.hf = transformers.GPT2LMHeadModel(cfg).eval()
        with torch.no_grad():  # sharper distributions than the init, so argmaxes are telling
            for p in cls.hf.parameters():
                if p.dim() >= 2:
                    p.mul_(6)
        with tempfile.TemporaryDirectory() as d:
            cls.hf.save_pretrained(d)
            cls.model = GPT.from_pretrained(d).eval()

    def hf_generate(self, idx, n, **kw):
        with torch.no_grad():
            return self.hf.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    pad_token_id=96, **kw)

    def test_greedy_equals_hf_generate(self):
        torch.manual_seed(1)
        for B, T in ((1, 1), (1, 5), (3, 9)):
            idx = torch.randint(0, 96, (B, T))
            ours = self.model.generate(idx, 15)
            self.assertTrue(torch.equal(ours, self.hf_generate(idx, 15, attention_mask=torch.ones_like(idx))))

    def test_left_padded_batch_equals_hf(self):
        torch.manual_seed(2)
        prompts = [torch.randint(0, 96, (n,)) for n in (2, 8, 5)]
        ours = self.model.generate(prompts, 10, pad_token_id=96)
        idx = ours[:, :8]
        mask = torch.zeros_like(idx)
        for i, p in enumerate(prompts):
            mask[i, 8 - len(p):] = 1
        self.assertTrue(torch.equal(ours, self.hf_generate(idx, 10, attention_mask=mask)))

    def test_eos_like_hf(self):
        torch.manual_seed(3)
        idx = torch.randint(0, 96, (2, 4))
        free = self.model.generate(idx, 12)
        eos = int(free[0, 6])  # row 0 emits it at its third new token
        ours = self.model.generate(idx, 12, eos_token_id=eos)
        with torch.no_grad():
            hf = self.hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=12,
                                  do_sample=False, eos_token_id=eos, pad_token_id=eos)
        self.assertTrue(torch.equal(ours, hf))


if __name__ == '__main__':
    unittest.main()
