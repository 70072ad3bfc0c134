"""
mingpt/pretokenize.py: the pieces are OpenAI's pattern's (tests/test_bpe.py checks that on many texts, fast
path and plain), chunks cut at safe places give the pieces of the whole, special tokens match longest first,
lone surrogates are repaired as tiktoken does.
"""

import random
import unittest

from mingpt.pretokenize import PAT, pretokenize, safe_chunks, special_tokens_regex, without_lone_surrogates

from tests.common import shakespeare


class TestPretokenize(unittest.TestCase):

    def test_chunks_give_the_pieces_of_the_whole(self):
        rng = random.Random(0)
        text = shakespeare(20_000) + ' é  日本\n\n' + ''.join(rng.choice('ab \n\t.é') for _ in range(5000))
        for n_chars in (1, 7, 100, 4096, 10 ** 6):
            with self.subTest(n_chars=n_chars):
                chunks = list(safe_chunks(text, n_chars))
                self.assertEqual(''.join(chunks), text)
                self.assertTrue(all(len(c) >= n_chars for c in chunks[:-1]))
                self.assertEqual([p for c in chunks for p in pretokenize(c)], PAT.findall(text))
        self.assertEqual(list(safe_chunks('', 10)), [])

    def test_special_tokens_match_longest_first(self):
        pattern = special_tokens_regex(['<|end|>', '<|end|><|more|>', '<|e'])
        self.assertEqual(pattern.findall('a<|end|><|more|>b<|end|>c<|e'), ['<|end|><|more|>', '<|end|>', '<|e'])
        self.assertEqual(pattern.split('x<|end|>y'), ['x', 'y'])

    def test_lone_surrogates_become_replacement_characters(self):
        self.assertEqual(without_lone_surrogates('a\ud800b'), 'a\ufffdb')
        self.assertEqual(without_lone_surrogates('\ud83d\ude00'), '\U0001f600')  # a pair is one character
        self.assertEqual(without_lone_surrogates('plain é'), 'plain é')


if __name__ == '__main__':
    unittest.main()
