"""
Tests for mingpt/speculative.py through the one decode step: greedy speculative decoding (prompt
lookup, an assistant model) gives exactly the tokens of plain decoding, in fewer forwards of the
model when drafts are kept; sampled speculative decoding follows the model's own distribution (the
joint distribution of three tokens over 6,000 rows against the exact one, computed by enumeration);
the BatchEngine takes drafts too; bad arguments are clear errors.
"""

import copy
import itertools
import unittest
from unittest import mock

import torch

from mingpt.batching import BatchEngine
from mingpt.errors import ConfigError
from mingpt.generate import stream

from tests import common

BLOCK = 32


def setUpModule():
    global _threads
    _threads = torch.get_num_threads()
    torch.set_num_threads(1)


def tearDownModule():
    torch.set_num_threads(_threads)


def tiny(vocab_size=13, seed=0, sharpen=3.0, n_layer=2):
    return common.tiny_gpt(vocab_size, BLOCK, n_layer=n_layer, n_head=2, n_embd=32, seed=seed, sharpen=sharpen)


class Forwards:
    """ counts the model's forwards and the positions they compute """

    def __init__(self, model):
        self.calls = 0
        self.hook = model.register_forward_pre_hook(lambda m, args: setattr(self, 'calls', self.calls + 1))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.hook.remove()


def tokens(model, prompt, n, **kw):
    with Forwards(model) as f:
        out = [int(t) for t in stream(model, [prompt], n, **kw)]
    return out, f.calls


class TestGreedy(unittest.TestCase):

    def test_prompt_lookup_gives_the_same_tokens_in_fewer_forwards(self):
        model = tiny()
        plain, plain_calls = tokens(model, [1, 2, 3], 24)
        # a prompt that repeats what the model writes: the drafts copied from it are right
        prompt = [1, 2, 3] + plain[:20] + [1, 2, 3]
        plain, plain_calls = tokens(model, prompt, 20)
        for k in (1, 4, 10):
            with self.subTest(prompt_lookup_num_tokens=k):
                fast, calls = tokens(model, prompt, 20, prompt_lookup_num_tokens=k)
                self.assertEqual(fast, plain)
                self.assertLess(calls, plain_calls)

    def test_an_assistant_gives_the_same_tokens(self):
        model = tiny()
        # a copy of the model drafts what the model says (the forwards counted are the model's alone)
        for name, assistant, fewer in [('a copy', copy.deepcopy(model), True),
                                       ('another model', tiny(seed=5, n_layer=1), False)]:
            for prompt in ([4], [1, 7, 2, 9, 3]):
                with self.subTest(assistant=name, prompt=prompt):
                    plain, plain_calls = tokens(model, prompt, 25)
                    fast, calls = tokens(model, prompt, 25, assistant_model=assistant, num_assistant_tokens=4)
                    self.assertEqual(fast, plain)
                    if fewer:  # the model's own drafts are always kept: 5 tokens a forward
                        self.assertLessEqual(calls, 1 + -(-24 // 5))

    def test_batches_stop_tokens_and_the_end_of_the_context(self):
        model = tiny()
        prompts = [[1, 2, 3, 1, 2], [5], [7, 7, 7, 7, 7, 7]]
        plain = model.generate(prompts, BLOCK + 5)  # slides past the context
        for kw in (dict(prompt_lookup_num_tokens=3), dict(assistant_model=tiny(seed=2, n_layer=1))):
            with self.subTest(**{k: str(v)[:20] for k, v in kw.items()}):
                self.assertTrue(torch.equal(model.generate(prompts, BLOCK + 5, **kw), plain))
        # a stop token in the middle of a kept draft ends the row there
        eos = int(plain[0, 6 + 4])
        stopped = model.generate(prompts, 20, eos_token_id=eos, pad_token_id=0)
        fast = model.generate(prompts, 20, eos_token_id=eos, pad_token_id=0, assistant_model=model)
        self.assertTrue(torch.equal(fast, stopped))

    def test_the_batch_engine_takes_drafts(self):
        model = tiny()
        engine = BatchEngine(model, rows=2, threaded=False)
        reqs = [engine.submit([1, 2, 3, 1, 2], 15, prompt_lookup_num_tokens=4),
                engine.submit([6, 2], 12, assistant_model=copy.deepcopy(model)),
                engine.submit([9], 10)]
        while any(r.finish_reason is None for r in reqs):
            engine.step()
        for req, (p, n) in zip(reqs, [([1, 2, 3, 1, 2], 15), ([6, 2], 12), ([9], 10)]):
            self.assertEqual(list(req), tokens(model, p, n)[0])


class TestSampling(unittest.TestCase):
    """ speculative sampling draws from the model's distribution, whatever the drafts """

    def exact(self, model, prompt, n, options):
        """ {tuple of n tokens: its probability} under the model with these options, by enumeration """
        from mingpt.speculative import probabilities
        V = model.config.vocab_size
        seqs = list(itertools.product(range(V), repeat=n))
        x = torch.tensor([prompt + list(s) for s in seqs])
        with torch.no_grad():
            logits = model(x)[0][:, len(prompt) - 1:-1]  # (V^n, n, V): the logits of each of the n tokens
        p = probabilities(logits.reshape(-1, V), options).view(len(seqs), n, V)
        chosen = torch.tensor(seqs)[:, :, None]
        return dict(zip(seqs, p.gather(2, chosen)[..., 0].prod(dim=1).tolist()))

    def check(self, model, prompt, rows, **kw):
        """ the largest gap, in standard errors, between a cell's frequency and its probability """
        from mingpt.sampling import SamplingOptions
        options = SamplingOptions(do_sample=True, temperature=kw.pop('temperature', 1.0), top_k=kw.pop('top_k', None),
                                  seed=0)
        out = model.generate([prompt] * rows, 3, options=options, **kw)
        counts = {}
        for row in out[:, -3:].tolist():
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
        exact = self.exact(model, prompt, 3, options)
        return max(abs(counts.get(s, 0) / rows - p) / ((p * (1 - p) / rows) ** 0.5 + 1e-3) for s, p in exact.items())

    def test_draws_follow_the_model(self):
        model = tiny(vocab_size=6, sharpen=1.5)
        assistant = tiny(vocab_size=6, seed=9, sharpen=8.0, n_layer=1)  # peaked: far from the model
        prompt, rows = [1, 2, 3, 1, 2, 3, 1, 2], 6000
        cases = [('assistant', dict(assistant_model=assistant, num_assistant_tokens=2)),
                 ('assistant, top_k', dict(assistant_model=assistant, num_assistant_tokens=2, top_k=3, temperature=0.7)),
                 ('prompt lookup', dict(prompt_lookup_num_tokens=2))]
        for name, kw in cases:
            with self.subTest(drafts=name):
                # within 5 standard errors in every one of the 216 cells
                self.assertLess(self.check(model, prompt, rows, **dict(kw)), 5.0)
        # and the check can fail: keeping every draft gives a distribution it tells apart
        from mingpt import decoder, speculative

        def keep_all(logits, draft, q, options, generator):
            p = speculative.probabilities(logits[len(draft):len(draft) + 1], options)
            return draft + [int(torch.multinomial(p[0], 1, generator=generator))]
        with mock.patch.object(decoder, 'verify', keep_all):  # where the decode step looks it up
            for name, kw in cases[::2]:
                with self.subTest(wrong_rule=name):
                    self.assertGreater(self.check(model, prompt, rows, **dict(kw)), 5.0)


class TestArguments(unittest.TestCase):

    def test_bad_arguments_are_clear_errors(self):
        model = tiny()
        cases = [(dict(prompt_lookup_num_tokens=0), 'prompt_lookup_num_tokens must be an int >= 1'),
                 (dict(assistant_model=model, num_assistant_tokens=1.5), 'num_assistant_tokens'),
                 (dict(assistant_model=model, prompt_lookup_num_tokens=3), 'not both'),
                 (dict(assistant_model=tiny(vocab_size=14)), 'vocabulary of 14 tokens and the model 13')]
        for kw, pattern in cases:
            with self.subTest(pattern=pattern):
                with self.assertRaisesRegex(ConfigError, pattern):
                    model.generate([[1, 2]], 5, **kw)


if __name__ == '__main__':
    unittest.main()
