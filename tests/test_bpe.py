"""Tests for mingpt/bpe.py: ids identical to tiktoken's gpt2 encoding, minGPT's API, vocabulary files."""

import heapq
import json
import random
import shutil
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import regex
import torch

from mingpt import bpe, bpe_merge, download
from mingpt.bpe import BPETokenizer, Encoder, bytes_to_unicode, get_encoder
from mingpt.download import GPT2_VOCAB_FILES, sha256sum
from mingpt.errors import DownloadError
from tests.common import (TempDirTestCase, data_file, english_text, free_port_url, local_http_server, patched_env,
                          needs_shared_data, shakespeare, tiktoken_gpt2)

# OpenAI's pattern exactly as published in gpt-2/src/encoder.py; ours is reordered for speed
OPENAI_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

SAMPLES = [
    '', ' ', 'Hello world', 'hello world  ', 'a  b   c\t\td', '   leading and trailing   ', '\t\n \r\n\r\n  x',
    'line one\r\nline two\r\n', 'trailing tab\t', '\n\n\n', ' \n \n', 'x \u00a0y\u3000z\u2003w',
    "I'm sure you'll see they've said it's what we'd do, don't you? I'M SURE YOU'LL SEE THEY'VE SAID IT'S",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE ''s", "rock'n'roll o'clock",
    '1 12 123 1234 12345 3.14159 -42 1,000,000 0x1F 1e-9 ٣٤٥ १२३ ½ Ⅻ ²',
    'def f(x):\n    return {"a": [1, 2]} # ok\n\tif x != y && z >= 3: pass\n',
    '<div class="x">&amp;</div> https://example.com/a?b=c&d=e#f',
    '日本語のテキストです。中文文本，还有标点！한국어 텍스트', 'مرحبا بالعالم، كيف حالك؟', 'नमस्ते दुनिया, यह हिन्दी है।',
    'Привет, мир! Ёжик в тумане.', 'Ελληνικά κείμενα', 'שלום עולם', 'ภาษาไทย ไม่มีช่องว่าง',
    '😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷 ❤️ 🧑🏿‍💻', 'e\u0301 a\u0308\u0323 Z\u0351\u0352\u0353 ñ vs n\u0303',
    'café naïve Zürich façade résumé', '\u200b\u200c\u200d\ufeff zero width', '\x00\x01\x1c\x1f\x7f control',
    '<|endoftext|> is plain text here', 'ends with newline\n', '...!!!??? --- ***',
    'Mixed ascii and ünïcödé words, with\u00a0nbsp and a tab\tand más.',
    "Don't stop 'til you get enough; y'all're 'bout done",
]


def random_text(rng: random.Random, length: int) -> str:
    """Random text from a mix of the character classes the pre-tokenizer distinguishes, in runs."""
    pools = [
        'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ', '0123456789', '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~',
        "'", "'sdmtlver", ' ', '  \t\n\r\x0b\x0c', '\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2028\u2029\u202f\u3000\u180e',
        'éüñçøßåæœÉÜÑ', '日本語中文漢字한국어', 'ابتثجحخ', 'अआइईउ्ािी', 'абвгдеёжАБВГ', '\u0300\u0301\u0308\u0323\u0351',
        '😀👍🏽👨\u200d👩\ufe0f🇫🇷', '٣٤५१२½Ⅻ²',
    ]
    out = []
    while len(out) < length:
        pool = rng.choice(pools)
        out.extend(rng.choice(pool) for _ in range(rng.randint(1, 6)))
        if rng.random() < 0.15:  # now and then any code point at all (surrogates excluded: not valid UTF-8)
            c = rng.randrange(0x110000 - 0x800)
            out.append(chr(c if c < 0xD800 else c + 0x800))
    return ''.join(out[:length])


# letters only, so that a text of them is one pre-token however long: frequent Chinese characters, kana,
# Hangul, and the whole CJK Unified Ideographs block (most of them are 2 or 3 tokens in GPT-2)
CJK_POOLS = ['的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年', 'のにはをたがでてとしれさあいうアイウエオカキクケコー',
             '한국어텍스트입니다', ''.join(map(chr, range(0x4E00, 0x9FA6)))]


def cjk_text(rng: random.Random, length: int) -> str:
    """length characters of CJK letters with no space or punctuation (3 UTF-8 bytes each): one pre-token."""
    return ''.join(rng.choice(rng.choice(CJK_POOLS)) for _ in range(length))


class GPT2EncoderTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.e = get_encoder()
        cls.tik = tiktoken_gpt2()

    def assertExact(self, text):
        ids = self.e.encode(text)
        self.assertEqual(ids, self.tik.encode_ordinary(text), f'ids differ from tiktoken for {text[:80]!r}')
        self.assertEqual(self.e.decode(ids), text)

    def test_hello_world(self):
        self.assertEqual(self.e.encode('Hello world'), [15496, 995])
        self.assertEqual(self.e.decode([15496, 995]), 'Hello world')
        self.assertEqual(self.e.n_vocab, 50257)
        self.assertEqual(self.e.special_tokens, {'<|endoftext|>': 50256})

    def test_varied_text_matches_tiktoken(self):
        for text in SAMPLES:
            with self.subTest(text=text):
                self.assertExact(text)

    def test_random_unicode_matches_tiktoken(self):
        rng = random.Random(1234)
        for _ in range(300):
            self.assertExact(random_text(rng, rng.randint(1, 300)))

    def test_code_points_in_context(self):
        # code points as a word, after a letter, a digit, punctuation and whitespace: catches disagreements
        # between the `regex` module's Unicode tables and tiktoken's on \p{L}, \p{N}, \s. All of them
        # agree (checked once, 32 s); here Latin-1, General Punctuation and a random sample of the rest.
        rng = random.Random(3)
        cps = list(range(0x2070)) + rng.sample(range(0x2070, 0x10000), 3000)
        cps += rng.sample(range(0x10000, 0x110000), 1000)
        text = ''.join(f'a{c}a 1{c}1 !{c}! {c}{c}\n{c} ' for c in map(chr, cps) if not 0xD800 <= ord(c) < 0xE000)
        self.assertEqual(self.e.encode(text), self.tik.encode_ordinary(text))

    @needs_shared_data('warpeace.txt')
    def test_1mb_of_english_matches_tiktoken(self):
        text = english_text(1_000_000)  # War and Peace
        self.assertGreater(len(text), 900_000)
        self.e.clear_cache()
        self.assertExact(text)
        self.assertExact(text)  # second pass runs from the piece cache

    def test_pretokenizer_fast_path_is_exact(self):
        # mostly-ASCII text goes through the ASCII pattern between "safe cuts" (see Encoder.pretokenize);
        # that must give exactly the pieces of OpenAI's pattern, wherever the rare non-ASCII characters fall
        rng = random.Random(7)
        ascii_pools = ['abcXYZ', '0123', '.,!?-(\'"', "'", "'sdmtlver", ' ', '  \t\n\r\x0b\x0c', '\x1c\x1f\x00']
        rare = 'é\xa0\u3000\x85\u2028٣½😀\u0301日Ж'
        texts = ['word ' * 20 + 'é' + ' word' * 20, 'é' + 'x ' * 50, 'x ' * 50 + 'é', 'ab\n\n é\n\nc  ',
                 'a\xa0 b  ' * 40]
        for _ in range(60):
            chars = []
            while len(chars) < 3000:
                pool = rng.choice(ascii_pools)
                chars.extend(rng.choice(pool) for _ in range(rng.randint(1, 6)))
            for _ in range(rng.randint(1, 3)):  # sparse enough for the fast path (< 1 in 300 bytes)
                chars.insert(rng.randrange(len(chars) + 1), rng.choice(rare))
            texts.append(''.join(chars))
        texts += SAMPLES + [random_text(rng, rng.randint(1, 200)) for _ in range(100)]  # dense: the plain path
        for i, text in enumerate(texts):
            self.assertEqual(self.e.pretokenize(text), OPENAI_PATTERN.findall(text), repr(text[:80]))
            if i % 4 == 0:  # and the ids (random letters make many new pieces: slow, so only some)
                self.assertEqual(self.e.encode(text), self.tik.encode_ordinary(text))

    def test_lone_surrogates_like_tiktoken(self):
        # the last text has enough new pieces to take the batched BPE path, the others not
        many_new_words = ' '.join(f'qz{chr(97 + i % 26)}{chr(97 + i // 26)}xv' for i in range(200))  # 200 new
        for text in ['a\ud800b', 'x \udfff', '\ud83d\ude00 paired', 'ok ' * 10 + '\udc80',
                     many_new_words + ' \udc80 ' + many_new_words]:
            self.e.clear_cache()
            self.assertEqual(self.e.encode(text), self.tik.encode_ordinary(text))
            self.assertNotIn(None, self.e._cache.values())  # no piece left half-done by the retry

    def test_concurrent_encodes_share_the_cache_safely(self):
        # a server encodes in threads: each lookup pass must see its own new pieces merged, never another
        # thread's half-done ones
        from concurrent.futures import ThreadPoolExecutor
        text = english_text(400_000)
        chunks = [text[i:i + 50_000] for i in range(0, len(text), 50_000)]
        expected = [self.tik.encode_ordinary(c) for c in chunks]
        self.e.clear_cache()
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(self.e.encode, chunks))
        self.assertEqual(got, expected)

    def test_batched_bpe_equals_one_piece_at_a_time(self):
        # encode() merges the pieces new to the cache all at once (numpy) when there are many of them,
        # one by one when there are few: the two must agree on any bytes, not only on regex pieces
        rng = random.Random(5)
        pieces = [bytes(rng.randrange(256) for _ in range(rng.randint(1, 24))) for _ in range(2000)]
        pieces += [p.encode('utf-8') for p in dict.fromkeys(self.e.pretokenize(english_text(100_000)))]
        merger = self.e._pair_merger()
        parts, counts = merger.merge_many(pieces)
        one_by_one = [merger.merge(p) for p in pieces]
        self.assertLessEqual(max(map(len, pieces)), bpe_merge.LONG_PIECE)  # all through merge's own loop
        self.assertEqual(counts, list(map(len, one_by_one)))
        self.assertEqual(parts.tolist(), [r for merged in one_by_one for r in merged])

    def test_endoftext_is_plain_text_by_default(self):
        text = 'one<|endoftext|>two <|endoftext|>'
        self.assertEqual(self.e.encode(text), self.tik.encode_ordinary(text))
        self.assertNotIn(50256, self.e.encode(text))
        self.assertEqual(self.e.encode_ordinary(text), self.e.encode(text))

    def test_allowed_special(self):
        text = 'one<|endoftext|>two <|endoftext|><|endoftext|>'
        for allowed in ({'<|endoftext|>'}, 'all'):
            ids = self.e.encode(text, allowed_special=allowed)
            self.assertEqual(ids, self.tik.encode(text, allowed_special=allowed))
            self.assertEqual(ids.count(50256), 3)
            self.assertEqual(self.e.decode(ids), text)
        with self.assertRaises(ValueError) as cm:
            self.e.encode(text, allowed_special={'<|startoftext|>'})
        self.assertIn('<|endoftext|>', str(cm.exception))  # lists the ones that exist

    def test_encode_and_show_work(self):
        text = "Hello Bolkonski's world!!"
        out = self.e.encode_and_show_work(text)
        self.assertEqual(set(out), {'bpe_idx', 'tokens', 'parts'})
        self.assertEqual(out['bpe_idx'], self.e.encode(text))
        self.assertEqual(out['tokens'], ['Hello', ' Bolkonski', "'s", ' world', '!!'])
        part = out['parts'][1]
        self.assertEqual(part['token_bytes'], b' Bolkonski')
        self.assertEqual(part['token_translated'], '\u0120Bolkonski')  # the space shows as Ġ
        self.assertGreater(len(part['token_merged']), 1)
        self.assertEqual(''.join(part['token_merged']), part['token_translated'])
        self.assertEqual(part['token_ix'], [self.e.encoder[t] for t in part['token_merged']])
        self.assertEqual(sum((p['token_ix'] for p in out['parts']), []), out['bpe_idx'])

    def test_minGPT_attributes(self):
        self.assertEqual(len(self.e.byte_encoder), 256)
        self.assertEqual(self.e.byte_encoder[ord(' ')], 'Ġ')
        self.assertEqual(self.e.bpe('Ġhello'), 'Ġhello')
        self.assertEqual(self.e.bpe('ĠBolkonski').replace(' ', ''), 'ĠBolkonski')
        self.assertEqual(len(self.e.bpe_ranks), 50000)
        self.assertEqual(self.e.decoder[15496], 'Hello')

    def test_decode(self):
        euro = self.e.encode('𝕏')  # one character, several tokens
        self.assertGreater(len(euro), 1)
        self.assertEqual(self.e.decode(euro[:1]), self.tik.decode(euro[:1]))  # half a character: U+FFFD
        self.assertIn('\ufffd', self.e.decode(euro[:1]))
        self.assertEqual(self.e.decode(torch.tensor([15496, 995])), 'Hello world')
        self.assertEqual(self.e.decode([50256]), '<|endoftext|>')
        with self.assertRaises(ValueError):
            self.e.decode([50257])
        with self.assertRaises(ValueError):
            self.e.decode([-1])


class LongPieceTest(unittest.TestCase):
    """A pre-token can be as long as the text (CJK without spaces, a run of one character): BPE on it must
    give tiktoken's ids and take O(n log n) work, not O(n^2)."""

    @classmethod
    def setUpClass(cls):
        cls.e = get_encoder()
        cls.tik = tiktoken_gpt2()
        cls.merger = cls.e._pair_merger()

    def assertExactPiece(self, text):
        self.assertEqual(len(self.e.pretokenize(text)), 1, 'the test text must be one pre-token')
        ids = self.e.encode(text)
        self.assertEqual(ids, self.tik.encode_ordinary(text), f'ids differ from tiktoken for {text[:20]!r}...')
        self.assertEqual(self.e.decode(ids), text)
        return ids

    def heap_operations(self, text) -> int:
        """The heap pushes and pops of encoding text, from a cold cache: merge_long's loop pops one entry
        per iteration and does O(1) more work, pushes included, so this counts its work."""
        counts = []

        def counting(op):
            def counted(*args):
                counts.append(1)
                return op(*args)
            return counted
        self.e.clear_cache()
        with mock.patch.object(bpe_merge, 'heappop', counting(heapq.heappop)), \
                mock.patch.object(bpe_merge, 'heappush', counting(heapq.heappush)):
            ids = self.e.encode(text)
        n_bytes = len(text.encode('utf-8'))
        self.assertGreaterEqual(len(counts), n_bytes - len(ids))  # one pop at least per merge: the heap merged it
        return len(counts)

    def test_300kb_of_cjk_matches_tiktoken(self):
        text = cjk_text(random.Random(0), 100_000)
        self.assertEqual(len(text.encode('utf-8')), 300_000)
        self.e.clear_cache()
        ids = self.assertExactPiece(text)
        self.assertEqual(self.e.encode(text), ids)  # again, from the cache

    def test_work_grows_linearly(self):
        # a deterministic count instead of a time: twice the text takes twice the heap operations (O(n^2)
        # work would be four times), and a byte costs at most 5 (its initial entry, 2 pushes a merge, their pops)
        rng = random.Random(1)
        for make in (lambda n: cjk_text(rng, n), lambda n: 'a' * n, lambda n: '😀' * n):
            work = [self.heap_operations(make(n)) for n in (20_000, 40_000)]
            self.assertTrue(1.8 < work[1] / work[0] < 2.2, work)
            self.assertLessEqual(work[1], 5 * len(make(40_000).encode('utf-8')), work)

    def test_long_runs_match_tiktoken(self):
        # runs of one character (every pair ties with every other: the leftmost must merge first), of a
        # few, emoji with modifiers and joiners, digits, Devanagari consonants, letters from any script
        rng = random.Random(2)
        letters = [c for c in map(chr, range(0x30000)) if regex.fullmatch(r'\p{L}', c)]
        for text in ['a' * 100_000, 'ab' * 30_000, ' ' * 50_000, '!' * 50_000, '1234567890' * 5_000,
                     ''.join(rng.choice('aab') for _ in range(60_000)), '👨\u200d👩\u200d👧🏽😀🇫🇷\ufe0f' * 4_000,
                     ''.join(rng.choice('कखगघङचछजझञटठडढणतथदधनपफबभमयरलवशषसह') for _ in range(30_000)),
                     ''.join(rng.choice(letters) for _ in range(30_000))]:
            with self.subTest(text=text[:20]):
                self.assertExactPiece(text)

    def test_long_random_bytes_match_tiktoken(self):
        # any bytes at all, as one piece (text cannot make such a piece: the pre-tokenizer splits it)
        rng = random.Random(3)
        for data in [rng.randbytes(100_000), bytes(rng.choice(b'\xe4\xb8\x80 a') for _ in range(100_000))]:
            ids = self.e._rank_id_to_id[self.merger.merge(data)].tolist()
            self.assertEqual(ids, self.tik._encode_single_piece(data))
            self.assertEqual(b''.join(map(self.e._id_to_bytes.__getitem__, ids)), data)

    def test_long_pieces_among_many_new_ones(self):
        # a corpus's new pieces are merged together with numpy, in as many rounds as the longest needs:
        # two long pieces among them (in the first chunk, with thousands of new pieces) are merged alone instead
        text = 'a' * 5_000 + ' ' + cjk_text(random.Random(5), 3_000) + ' ' + english_text(100_000)
        self.e.clear_cache()
        with mock.patch.object(self.merger, 'merge_many', wraps=self.merger.merge_many) as many:
            self.assertEqual(self.e.encode(text), self.tik.encode_ordinary(text))
        batched = [len(piece) for call in many.call_args_list for piece in call.args[0]]
        self.assertGreater(len(batched), 500)
        self.assertLess(max(batched), 100)

    def test_heap_merge_equals_scanning_merge(self):
        # merge_long against merge's own loop (LONG_PIECE lifted), on pieces with many equal-rank pairs
        rng = random.Random(4)
        pieces = [bytes(rng.choice(alphabet) for _ in range(rng.randint(2, 400)))
                  for alphabet in (b'a', b'ab', b'ab ', b'\xe4\xb8\x80\xe3', bytes(range(256))) for _ in range(40)]
        with mock.patch.object(bpe_merge, 'LONG_PIECE', 1 << 30):
            scanned = [self.merger.merge(p) for p in pieces]
        self.assertEqual([self.merger.merge_long(p) for p in pieces], scanned)

    def test_cached_long_pieces_are_bounded(self):
        self.e.clear_cache()
        with mock.patch.object(bpe, 'MAX_CACHED_LONG_BYTES', 1_000):
            for c in 'abc':
                self.assertExactPiece(c * 700)
        self.assertEqual(self.e._cache.long_bytes, 700)  # 'a' and 'b' made 1,400 bytes: emptied before 'c'
        self.assertNotIn('a' * 700, self.e._cache)
        self.assertIn('c' * 700, self.e._cache)


class BPETokenizerTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tok = BPETokenizer()

    def test_single_text(self):
        idx = self.tok('Hello world')
        self.assertEqual(idx.dtype, torch.long)
        self.assertEqual(idx.tolist(), [[15496, 995]])
        self.assertEqual(self.tok.decode(idx[0]), 'Hello world')
        self.assertEqual(self.tok('').shape, (1, 0))

    def test_batch_is_left_padded(self):
        texts = ['Hello world, how are you?', 'Hi', '']
        idx, mask = self.tok(texts)
        self.assertEqual(idx.shape, mask.shape)
        self.assertEqual((idx.dtype, mask.dtype), (torch.long, torch.long))
        lengths = [len(self.tok.encoder.encode(t)) for t in texts]
        self.assertEqual(idx.shape, (3, max(lengths)))
        self.assertEqual(mask.sum(1).tolist(), lengths)
        for row, text, n in zip(range(3), texts, lengths):
            T = idx.shape[1]
            self.assertTrue((idx[row, :T - n] == 50256).all())  # pad on the left
            self.assertTrue((mask[row, :T - n] == 0).all())
            self.assertEqual(idx[row, T - n:].tolist(), self.tok.encoder.encode(text))
            self.assertTrue((mask[row, T - n:] == 1).all())
        self.assertEqual(self.tok.pad_token_id, 50256)
        self.assertEqual(self.tok.decode(idx, attention_mask=mask), texts)
        self.assertEqual(self.tok.decode(idx)[1], '<|endoftext|>' * (max(lengths) - 1) + 'Hi')

    def test_allowed_special_and_errors(self):
        self.assertEqual(self.tok('a<|endoftext|>', allowed_special='all').tolist(), [[64, 50256]])
        self.assertNotIn(50256, self.tok('a<|endoftext|>').tolist()[0])
        with self.assertRaises(TypeError):
            self.tok(42)
        with self.assertRaises(TypeError):
            self.tok([])
        with self.assertRaises(ValueError):
            self.tok('x', return_tensors='np')
        with self.assertRaises(ValueError):
            self.tok.decode(torch.zeros(1, 1, 1, dtype=torch.long))


class VocabularyFilesTest(TempDirTestCase):

    def without_shipped_copy(self):
        """ as if the package had no copy of GPT-2's files: the caches and the download are used """
        return mock.patch.object(download, 'GPT2_VOCAB_DIR', self.tmp / 'not-shipped')

    def test_shipped_files_are_gpt2s_and_need_no_network_or_cache(self):
        for name, sha in GPT2_VOCAB_FILES.items():
            self.assertEqual(sha256sum(download.GPT2_VOCAB_DIR / name), sha)
        cache = self.tmp / 'cache'
        with patched_env(MINGPT_CACHE=cache, MINGPT_GPT2_BASE_URL=free_port_url()):
            self.assertEqual(BPETokenizer()('Hello world').tolist(), [[15496, 995]])
        self.assertFalse(cache.exists())  # nothing looked up, created or downloaded

    def test_reads_mingpts_cache(self):
        # minGPT keeps encoder.json and vocab.bpe directly in ~/.cache/mingpt
        cache = self.tmp / 'cache'
        cache.mkdir()
        for name in GPT2_VOCAB_FILES:
            shutil.copy(data_file(name), cache / name)
        with self.without_shipped_copy(), patched_env(MINGPT_CACHE=cache, MINGPT_GPT2_BASE_URL=free_port_url()):
            self.assertEqual(get_encoder().encode('Hello world'), [15496, 995])
        self.assertEqual(sorted(p.name for p in cache.iterdir()), sorted(GPT2_VOCAB_FILES))

    def test_downloads_and_checks_gpt2_files(self):
        # the real download path, from a local server laid out like OpenAI's bucket
        models = self.tmp / 'served' / 'models' / '124M'
        models.mkdir(parents=True)
        for name in GPT2_VOCAB_FILES:
            shutil.copy(data_file(name), models / name)
        cache = self.tmp / 'cache'
        with self.without_shipped_copy(), local_http_server(self.tmp / 'served') as url, \
                patched_env(MINGPT_CACHE=cache, MINGPT_GPT2_BASE_URL=url):
            e = get_encoder()
        self.assertEqual(e.encode('Hello world'), [15496, 995])
        for name, sha in GPT2_VOCAB_FILES.items():
            self.assertEqual(sha256sum(cache / 'gpt2' / name), sha)

        # a server handing out a different file is refused, and nothing is left in the cache
        (models / 'vocab.bpe').write_text('#version: 0.2\nĠ t\n', encoding='utf-8')
        (cache / 'gpt2' / 'vocab.bpe').unlink()
        with self.without_shipped_copy(), local_http_server(self.tmp / 'served') as url, \
                patched_env(MINGPT_CACHE=cache, MINGPT_GPT2_BASE_URL=url), self.assertRaises(DownloadError) as cm:
            get_encoder()
        self.assertIn('sha256 mismatch', str(cm.exception))
        self.assertFalse((cache / 'gpt2' / 'vocab.bpe').exists())

    def test_offline_error_says_which_files_where(self):
        cache = self.tmp / 'cache'
        with self.without_shipped_copy(), patched_env(MINGPT_CACHE=cache, MINGPT_GPT2_BASE_URL=free_port_url()), \
                self.assertRaises(DownloadError) as cm:
            BPETokenizer()
        msg = str(cm.exception)
        for needle in ('encoder.json', 'vocab.bpe', str(cache / 'gpt2'), 'path='):
            self.assertIn(needle, msg)

    def test_directory_path(self):
        for name in GPT2_VOCAB_FILES:
            shutil.copy(data_file(name), self.tmp / name)
        with patched_env(MINGPT_CACHE=self.tmp / 'unused', MINGPT_GPT2_BASE_URL=free_port_url()):
            self.assertEqual(BPETokenizer(self.tmp)('Hello world').tolist(), [[15496, 995]])
        (self.tmp / 'vocab.bpe').unlink()
        with self.assertRaises(FileNotFoundError) as cm:
            get_encoder(self.tmp)
        self.assertIn('vocab.bpe', str(cm.exception))

    def test_malformed_vocab(self):
        encoder = {c: i for i, c in enumerate(bytes_to_unicode().values())}
        with self.assertRaises(ValueError):  # a merge whose result encoder.json lacks
            Encoder(encoder, [('a', 'b')])
        del encoder['a']
        with self.assertRaises(ValueError):  # a byte with no token
            Encoder(encoder, [])


class CustomVocabularyTest(unittest.TestCase):
    """A vocabulary that is not GPT-2's: GPT-2's first 2,000 merges, with ids shuffled away from merge order
    and an extra special token. Checked against a tiktoken Encoding built from the same ranks."""

    @classmethod
    def setUpClass(cls):
        import tiktoken
        tiktoken_gpt2()  # sets up tiktoken's offline cache when ../shared is there
        byte_encoder = bytes_to_unicode()
        byte_decoder = {v: k for k, v in byte_encoder.items()}
        lines = data_file('vocab.bpe').read_text(encoding='utf-8').split('\n')[1:2001]
        merges = [tuple(line.split(' ')) for line in lines]
        tokens = [byte_encoder[b] for b in range(256)] + [a + b for a, b in merges]
        ids = list(range(len(tokens)))
        random.Random(0).shuffle(ids)  # ids no longer equal ranks
        encoder = dict(zip(tokens, ids))
        encoder['<|endoftext|>'] = len(tokens)
        encoder['<|pad|>'] = len(tokens) + 1
        cls.dir = tempfile.TemporaryDirectory()
        (Path(cls.dir.name) / 'encoder.json').write_text(json.dumps(encoder), encoding='utf-8')
        (Path(cls.dir.name) / 'vocab.bpe').write_text('#version: 0.2\n' + '\n'.join(lines) + '\n', encoding='utf-8')
        cls.e = get_encoder(cls.dir.name)
        to_bytes = lambda t: bytes(byte_decoder[c] for c in t)
        cls.ref = tiktoken.Encoding(
            name='custom', pat_str=cls.e.pat.pattern,
            mergeable_ranks={to_bytes(t): rank for rank, t in enumerate(tokens)}, special_tokens={})
        cls.rank_to_id = [encoder[t] for t in tokens]

    @classmethod
    def tearDownClass(cls):
        cls.dir.cleanup()

    def test_matches_tiktoken_with_same_ranks(self):
        rng = random.Random(99)
        long_pieces = ['ab' * 5_000, cjk_text(rng, 5_000), ''.join(rng.choice('then') for _ in range(10_000))]
        for text in SAMPLES + [shakespeare(50_000)] + [random_text(rng, 200) for _ in range(100)] + long_pieces:
            expected = [self.rank_to_id[r] for r in self.ref.encode_ordinary(text)]
            self.assertEqual(self.e.encode(text), expected, repr(text[:80]))
            self.assertEqual(self.e.decode(self.e.encode(text)), text)

    def test_special_tokens_and_size(self):
        self.assertEqual(self.e.n_vocab, 2258)
        self.assertEqual(self.e.special_tokens, {'<|endoftext|>': 2256, '<|pad|>': 2257})
        self.assertEqual(self.e.encode('x<|pad|>', allowed_special={'<|pad|>'})[-1], 2257)
        tok = BPETokenizer(self.dir.name)
        self.assertEqual(tok.pad_token_id, 2256)
        idx, mask = tok(['a', 'a b c'])
        self.assertEqual(idx[0, 0].item(), 2256)
        self.assertEqual(tok.decode(idx, mask), ['a', 'a b c'])


class MergeRuleTest(unittest.TestCase):
    """Two adjacent parts merge whenever their concatenation is a token (tiktoken's rule), not only when
    they are the pair vocab.bpe lists for it: 'abc' is made from 'ab' + 'c', but in 'abcabca' the pairs
    'bc' merge first (lower rank), and each 'a' + 'bc' must still become 'abc'."""

    def test_a_token_is_made_from_any_two_parts(self):
        import tiktoken
        byte_encoder = bytes_to_unicode()
        merges = [('b', 'c'), ('a', 'b'), ('ab', 'c'), ('c', 'a')]
        tokens = [byte_encoder[b] for b in range(256)] + [a + b for a, b in merges]
        e = Encoder(dict(zip(tokens, range(len(tokens)))), merges)
        ranks = {bytes([b]): b for b in range(256)}
        ranks.update({(a + b).encode(): 256 + r for r, (a, b) in enumerate(merges)})
        ref = tiktoken.Encoding(name='abc', pat_str=e.pat.pattern, special_tokens={}, mergeable_ranks=ranks)
        abc, bc = 256 + 2, 256
        self.assertEqual(e.encode('abc'), [abc])
        self.assertEqual(e.encode('abcabca'), [abc, abc, ord('a')])  # 'ca' (rank 3) loses to 'bc', 'ab'
        self.assertEqual(e.encode('bcab'), [bc, 256 + 1])
        rng = random.Random(6)
        long_pieces = ['abcabca' * 100, ''.join(rng.choice('abc') for _ in range(3_000))]  # through merge_long
        for text in ['abc', 'abcabca', 'bcab', 'cabc', 'aabbcc', 'cbacba', 'abcbca', 'x abc abcab cabca'] + long_pieces:
            self.assertEqual(e.encode(text), ref.encode_ordinary(text), text[:20])
        self.assertEqual(e.bpe('abcabca'), 'abc abc a')


if __name__ == '__main__':
    unittest.main()
