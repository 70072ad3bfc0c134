"""Tests for mingpt/bpe_train.py: training a byte-level BPE vocabulary that mingpt.bpe's Encoder reads."""

import contextlib
import io
import json
import logging
import random
import tempfile
import time
import unittest
from collections import Counter

import tests.test_bpe as test_bpe  # its SAMPLES and random_text (imported as a module: no test collected twice)
from mingpt.bpe import BPETokenizer, get_encoder
from mingpt.bpe_train import _learn_merges, count_words, main, make_vocab, train_bpe
from mingpt.data import read_text_file
from tests.common import TempDirTestCase, english_text, shakespeare


def shakespeare_split():
    """tiny shakespeare: the first 90% (train) and the last 10% (held out), as chargpt splits it."""
    text = shakespeare()
    n = int(len(text) * 0.9)
    return text[:n], text[n:]


def naive_bpe(word_counts: dict, n_merges: int) -> list:
    """The textbook trainer, as a reference: recount every pair after every merge, merge the most frequent
    (ties: smallest (left bytes, right bytes)) everywhere, left to right. Returns the merges as bytes pairs."""
    words = {w: [bytes([b]) for b in w] for w in word_counts}
    merges = []
    for _ in range(n_merges):
        counts = Counter()
        for w, parts in words.items():
            for pair in zip(parts, parts[1:]):
                counts[pair] += word_counts[w]
        if not counts:
            break
        a, b = min(counts, key=lambda p: (-counts[p], p))
        merges.append((a, b))
        for w, parts in words.items():
            new, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    new.append(a + b)
                    i += 2
                else:
                    new.append(parts[i])
                    i += 1
            words[w] = new
    return merges


class HandExampleTest(unittest.TestCase):

    def test_aaabdaaabac(self):
        # Wikipedia's example, one pre-token. Pair counts: aa 4 (overlapping), ab 2, the rest 1.
        #   merge 1: a a   -> "aa a b d aa a b a c"; now (aa, a) and (a, b) both occur twice: the tie goes to
        #   merge 2: a b      the smaller bytes, b'a' < b'aa'     -> "aa ab d aa ab a c"
        #   merge 3: aa ab    (twice)                             -> "aaab d aaab a c"
        #   merge 4: a c      every pair occurs once; (b'a', b'c') is the smallest -> "aaab d aaab ac"
        vocab = train_bpe('aaabdaaabac', 256 + 4)
        self.assertEqual(vocab.merges, [('a', 'a'), ('a', 'b'), ('aa', 'ab'), ('a', 'c')])
        self.assertEqual(vocab.train_tokens, 4)
        self.assertEqual(vocab.train_bytes, 11)
        enc = vocab.to_encoder()
        ids = enc.encode('aaabdaaabac')
        self.assertEqual([enc.decoder[i] for i in ids], ['aaab', 'd', 'aaab', 'ac'])
        self.assertEqual(ids, [258, ord('d'), 258, 259])  # ids 0-255 are the bytes, merges follow

    def test_pieces_are_never_merged_across(self):
        # " ab" is one piece and "ab" another: the space stays on its word, as in GPT-2
        vocab = train_bpe('ab ab ab ab', 256 + 2)
        self.assertEqual(vocab.merges, [('a', 'b'), ('Ġ', 'ab')])
        self.assertEqual(vocab.train_tokens, 4)


class TrainerTest(unittest.TestCase):

    def test_matches_the_textbook_algorithm(self):
        # the incremental counts, the index and the lazy heap must pick exactly the merges of a full recount
        train, _ = shakespeare_split()
        rng = random.Random(0)
        text = train[:10_000] + ' '.join(test_bpe.random_text(rng, 30) for _ in range(50))
        word_counts = count_words(text)
        merges, token_bytes, _, _ = _learn_merges(word_counts, 256 + 200)
        self.assertEqual([(token_bytes[a], token_bytes[b]) for a, b in merges], naive_bpe(word_counts, 200))

    def test_ties_do_not_depend_on_the_order_of_the_text(self):
        word_counts = count_words(shakespeare_split()[0][:100_000])
        merges, token_bytes, _, _ = _learn_merges(word_counts, 1000)
        backwards = dict(reversed(list(word_counts.items())))
        merges2, token_bytes2, _, _ = _learn_merges(backwards, 1000)
        self.assertEqual(token_bytes, token_bytes2)
        self.assertEqual(merges, merges2)
        # and there were ties to break: many merges had the same count as the next one

    def test_more_merges_fewer_tokens(self):
        train, held_out = shakespeare_split()
        train, held_out = train[:100_000], held_out[:30_000]
        train_counts, held_out_counts = [], []
        for vocab_size in (256, 300, 600, 1200):
            enc = train_bpe(train, vocab_size).to_encoder()
            train_counts.append(len(enc.encode(train)))
            held_out_counts.append(len(enc.encode(held_out)))
        self.assertEqual(train_counts[0], len(train.encode('utf-8')))  # no merges: one token per byte
        for counts in (train_counts, held_out_counts):
            self.assertEqual(counts, sorted(counts, reverse=True), counts)
            self.assertEqual(len(set(counts)), len(counts), counts)  # strictly fewer

    def test_roundtrip_on_any_unicode(self):
        rng = random.Random(5)
        text = shakespeare_split()[0][:50_000] + ''.join(test_bpe.random_text(rng, 200) for _ in range(50))
        enc = train_bpe(text, 800).to_encoder()
        texts = test_bpe.SAMPLES + [test_bpe.random_text(rng, rng.randint(1, 300)) for _ in range(300)]
        texts += [''.join(map(chr, rng.sample(range(0xD800), 50))) + chr(0x10FFFF)]
        for t in texts:
            self.assertEqual(enc.decode(enc.encode(t)), t, repr(t[:60]))

    def test_special_tokens_are_cut_out_before_training(self):
        text = 'hello world<|endoftext|>' * 200
        vocab = train_bpe(text, 256 + 5 + 1, special_tokens=['<|endoftext|>'])
        self.assertEqual(vocab.special_tokens, {'<|endoftext|>': 261})
        self.assertFalse([t for t in vocab.encoder if 'endoftext' in t and t != '<|endoftext|>'])
        self.assertEqual(vocab.train_bytes, len('hello world') * 200)
        without = train_bpe(text, 300)  # as plain text it is merged like any other
        self.assertTrue([t for t in without.encoder if 'endoftext' in t])

    def test_long_text_is_pretokenized_in_chunks_exactly(self):
        import mingpt.bpe_train as bpe_train
        text = shakespeare_split()[1][:20_000] + ' déjà vu\n\n  ' * 50
        whole = count_words(text)
        old, bpe_train.CHUNK_CHARS = bpe_train.CHUNK_CHARS, 97
        try:
            self.assertEqual(count_words(text), whole)
        finally:
            bpe_train.CHUNK_CHARS = old

    def test_runs_out_of_pairs(self):
        with self.assertLogs('mingpt.bpe_train', logging.WARNING) as logs:
            vocab = train_bpe('ab ab', 1000, special_tokens=['<|endoftext|>'])
        self.assertIn('ran out of pairs', logs.output[0])
        self.assertEqual(vocab.vocab_size, 256 + 2 + 1)
        self.assertEqual(vocab.special_tokens, {'<|endoftext|>': 258})
        self.assertEqual(vocab.to_encoder().encode('ab ab'), [256, 257])

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, 'at least 257'):
            train_bpe('abc', 256, special_tokens=['<|endoftext|>'])
        with self.assertRaisesRegex(ValueError, 'too small'):
            train_bpe('abc', 100)
        with self.assertRaisesRegex(ValueError, 'non-empty'):
            train_bpe('abc', 300, special_tokens=[''])
        # the text is cut at special tokens, but token strings show a space as 'Ġ': ' the' is 'Ġthe'
        with self.assertRaisesRegex(ValueError, "'Ġthe' is also an ordinary token"):
            train_bpe('the the the the', 300, special_tokens=['Ġthe'])
        with self.assertRaisesRegex(ValueError, 'ordinary token'):
            train_bpe('abc', 300, special_tokens=['a'])  # every single byte is a token


class OneMegabyteTest(unittest.TestCase):
    """The issue's speed target, and the Encoder reproducing training's segmentation, on 1 MB of prose."""

    @classmethod
    def setUpClass(cls):
        cls.text = english_text(1_000_000)
        t0 = time.perf_counter()
        cls.word_counts = count_words(cls.text)
        merges, token_bytes, cls.words, cls.freqs = _learn_merges(cls.word_counts, 4096)
        cls.vocab = make_vocab(token_bytes, merges)
        cls.seconds = time.perf_counter() - t0
        cls.enc = cls.vocab.to_encoder()

    def test_under_a_minute(self):
        self.assertEqual(self.vocab.vocab_size, 4096)
        self.assertLess(self.seconds, 60)  # about 3 s on one busy core

    def test_encoder_reproduces_training_segmentation(self):
        # every distinct piece, encoded by the Encoder, is exactly what training made of it ...
        for w, segmentation in zip(self.word_counts, self.words):
            self.assertEqual(self.enc.encode(w.decode('utf-8')), segmentation, w)
        # ... so the whole training text encodes to the training-time token count
        train_tokens = sum(len(w) * f for w, f in zip(self.words, self.freqs))
        self.assertEqual(len(self.enc.encode(self.text)), train_tokens)
        self.assertLess(train_tokens, len(self.text.encode('utf-8')) / 3.3)  # ~3.7 bytes/token on War and Peace

    def test_train_bpe_reports_the_same_count(self):
        vocab = train_bpe(self.text[:300_000], 1024)
        self.assertEqual(len(vocab.to_encoder().encode(self.text[:300_000])), vocab.train_tokens)


class HuggingFaceReferenceTest(unittest.TestCase):
    """Hugging Face `tokenizers` (Rust) trains the same algorithm; it breaks ties by its own token ids, so the
    merges agree until the first tie and the token counts stay within a fraction of a percent."""

    @classmethod
    def setUpClass(cls):
        try:
            from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        except ImportError:
            raise unittest.SkipTest('tokenizers is not installed (pip install tokenizers)')
        train, held_out = shakespeare_split()
        cls.train, cls.held_out = train[:300_000], held_out
        cls.ours = train_bpe(cls.train, 1024)
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's pattern
        trainer = trainers.BpeTrainer(vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        hf.train_from_iterator([cls.train], trainer=trainer)
        cls.hf = hf
        model = json.loads(hf.to_str())['model']
        cls.hf_vocab = model['vocab']
        cls.hf_merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m) for m in model['merges']]
        cls.Tokenizer, cls.models, cls.pre_tokenizers = Tokenizer, models, pre_tokenizers

    def test_token_counts_agree(self):
        self.assertEqual(len(self.hf_vocab), 1024)
        enc = self.ours.to_encoder()
        for text in (self.train, self.held_out):
            ours, theirs = len(enc.encode(text)), len(self.hf.encode(text).ids)
            self.assertLess(abs(ours - theirs) / theirs, 0.01, (ours, theirs))

    def test_same_merges_up_to_ties(self):
        ours = self.ours.merges
        k = next(i for i, (a, b) in enumerate(zip(ours, self.hf_merges)) if a != b)  # the first difference
        self.assertGreater(k, 20)
        # it is a tie: after the k common merges, both candidates occur equally often
        word_counts = count_words(self.train)
        _, _, words, freqs = _learn_merges(word_counts, 256 + k)
        pair_counts = Counter()
        for w, f in zip(words, freqs):
            for pair in zip(w, w[1:]):
                pair_counts[pair] += f
        ids = self.ours.encoder
        ours_k, theirs_k = [(ids[a], ids[b]) for a, b in (ours[k], self.hf_merges[k])]
        self.assertEqual(pair_counts[ours_k], pair_counts[theirs_k])
        self.assertEqual(pair_counts[ours_k], max(pair_counts.values()))
        self.assertGreater(len(set(ours) & set(self.hf_merges)), 0.9 * len(ours))

    def test_files_are_interchangeable(self):
        # HF's vocabulary through our Encoder gives HF's ids ...
        from mingpt.bpe import Encoder
        text = self.held_out[:30_000]
        self.assertEqual(Encoder(self.hf_vocab, self.hf_merges).encode(text), self.hf.encode(text).ids)
        # ... and ours, read by HF's BPE model from the files we write, gives our ids
        with tempfile.TemporaryDirectory() as tmp:
            self.ours.save(tmp)
            theirs = self.Tokenizer(self.models.BPE.from_file(f'{tmp}/encoder.json', f'{tmp}/vocab.bpe'))
            theirs.pre_tokenizer = self.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            self.assertEqual(theirs.encode(text).ids, get_encoder(tmp).encode(text))


class FilesAndCLITest(TempDirTestCase):

    def test_save_and_load_with_special_tokens(self):
        train, held_out = shakespeare_split()
        vocab = train_bpe(train[:100_000], 600, special_tokens=['<|endoftext|>', '<|pad|>'])
        vocab.save(self.tmp)
        self.assertTrue((self.tmp / 'vocab.bpe').read_text(encoding='utf-8').startswith('#version: 0.2\n'))
        enc = get_encoder(self.tmp)
        self.assertEqual(enc.n_vocab, 600)
        self.assertEqual(sorted(enc.encoder.values()), list(range(600)))  # ids 0..599, no gaps
        self.assertEqual(enc.special_tokens, {'<|endoftext|>': 598, '<|pad|>': 599})
        text = held_out[:5000]
        self.assertEqual(enc.encode(text), vocab.to_encoder().encode(text))
        doc = 'First doc.<|endoftext|>Second<|pad|>'
        ids = enc.encode(doc, allowed_special='all')
        self.assertEqual(ids[-1], 599)
        self.assertIn(598, ids)
        self.assertEqual(enc.decode(ids), doc)
        self.assertNotIn(598, enc.encode(doc))  # by default special tokens are plain text
        self.assertEqual(enc.decode(enc.encode(doc)), doc)
        self.assertEqual(BPETokenizer(self.tmp).pad_token_id, 598)

    def test_cli(self):
        train, _ = shakespeare_split()
        src = self.tmp / 'input.txt'
        src.write_text(train[:50_000], encoding='utf-8')
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            main(['--input', str(src), '--vocab-size', '512', '--out', str(self.tmp / 'tok'),
                  '--special', '<|endoftext|>'])
        self.assertIn('512 tokens', out.getvalue())
        enc = get_encoder(self.tmp / 'tok')
        self.assertEqual(enc.n_vocab, 512)
        self.assertEqual(enc.special_tokens, {'<|endoftext|>': 511})
        self.assertEqual(enc.decode(enc.encode(train[:1000])), train[:1000])

    def test_cli_bad_input(self):
        cases = {'empty.txt': (b'', 'is empty'), 'bin.dat': (b'abc\x00\x01', 'NUL bytes'),
                 'latin1.txt': ('café'.encode('latin-1'), 'not valid UTF-8')}
        for name, (data, message) in cases.items():
            (self.tmp / name).write_bytes(data)
            err = io.StringIO()
            with self.subTest(name), contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as cm:
                main(['--input', str(self.tmp / name), '--vocab-size', '300', '--out', str(self.tmp / 'o')])
            self.assertEqual(cm.exception.code, 2)
            self.assertIn(message, err.getvalue())
        self.assertFalse((self.tmp / 'o').exists())
        with self.assertRaisesRegex(FileNotFoundError, 'no such file'):
            read_text_file(self.tmp / 'missing.txt')


if __name__ == '__main__':
    unittest.main()
