"""
Tests for mingpt/tokenizers.py: the character tokenizer, and a model directory's tokenizer files written
(atomically, one writer for every caller) and found again; no fallback where there are files, and a
broken file is an error that names it.
"""

import json
import unittest

import torch

from mingpt.bpe import Encoder, get_encoder
from mingpt.bpe_train import train_bpe
from mingpt.errors import WeightsError
from mingpt.tokenizers import (CharTokenizer, find_tokenizer, load_tokenizer, save_tokenizer,
                               tokenizer_for_model)
from tests.common import TempDirTestCase, shakespeare

TEXT = "Whether 'tis nobler in the mind to suffer\nThe slings and arrows of outrageous fortune"


_VOCAB = []


def small_vocab():
    """ a 300-token BPEVocab trained on tiny shakespeare, with <|endoftext|> (trained once) """
    if not _VOCAB:
        _VOCAB.append(train_bpe(shakespeare(20_000), 300, special_tokens=['<|endoftext|>']))
    return _VOCAB[0]


class CharTokenizerTest(TempDirTestCase):

    def test_round_trip_and_files(self):
        tok = CharTokenizer.from_text('hello world')
        self.assertEqual(tok.chars, sorted(set('hello world')))
        ids = tok.encode('hello')
        self.assertEqual(ids, [tok.chars.index(c) for c in 'hello'])
        self.assertEqual(tok.decode(ids), 'hello')
        self.assertEqual(tok.decode(torch.tensor(ids)), 'hello')
        path = tok.save(self.tmp)
        self.assertEqual(path, self.tmp / 'chars.json')
        self.assertEqual(json.loads(path.read_text(encoding='utf-8')), tok.chars)
        self.assertEqual(CharTokenizer.load(self.tmp).chars, tok.chars)
        self.assertEqual(CharTokenizer.load(path).chars, tok.chars)

    def test_characters_missing_from_the_vocabulary(self):
        tok = CharTokenizer.from_text('abc ')
        with self.assertRaisesRegex(ValueError, r"2 character\(s\) that are not in the vocabulary: 'dé'"):
            tok.encode('a déb')

    def test_bad_char_vocabularies(self):
        for chars, message in ((['a', 'bc'], 'single characters'), (['a', 'b', 'a'], 'more than once'),
                               ({'a': 0}, 'JSON list')):
            path = self.tmp / 'chars.json'
            path.write_text(json.dumps(chars), encoding='utf-8')
            with self.subTest(chars), self.assertRaisesRegex(ValueError, message):
                load_tokenizer(path)


class SaveTokenizerTest(TempDirTestCase):

    def test_bpe_round_trip(self):
        enc = small_vocab().to_encoder()
        save_tokenizer(enc, self.tmp / 'new' / 'dir')  # the directory is created
        loaded = get_encoder(self.tmp / 'new' / 'dir')
        self.assertEqual(loaded.encoder, enc.encoder)
        self.assertEqual(loaded.merges(), enc.merges())
        self.assertEqual(loaded.special_tokens, {'<|endoftext|>': 299})
        self.assertEqual(loaded.encode(TEXT), enc.encode(TEXT))
        self.assertTrue((self.tmp / 'new' / 'dir' / 'vocab.bpe').read_text(encoding='utf-8')
                        .startswith('#version: 0.2\n'))

    def test_one_writer_for_trained_vocabularies(self):
        # BPEVocab.save writes through save_tokenizer: the same bytes, whoever writes them
        vocab = small_vocab()
        vocab.save(self.tmp / 'a')
        save_tokenizer(vocab.to_encoder(), self.tmp / 'b')
        for name in ('encoder.json', 'vocab.bpe'):
            self.assertEqual((self.tmp / 'a' / name).read_bytes(), (self.tmp / 'b' / name).read_bytes(), name)

    def test_writes_are_atomic_and_replace_old_files(self):
        (self.tmp / 'encoder.json').write_text('old', encoding='utf-8')
        save_tokenizer(small_vocab().to_encoder(), self.tmp)
        save_tokenizer(CharTokenizer('ab'), self.tmp)
        self.assertEqual(sorted(p.name for p in self.tmp.iterdir()), ['chars.json', 'encoder.json', 'vocab.bpe'])
        self.assertEqual(get_encoder(self.tmp).n_vocab, 300)

    def test_only_tokenizers(self):
        with self.assertRaisesRegex(TypeError, 'Encoder or a CharTokenizer'):
            save_tokenizer({'a': 0}, self.tmp)


class FindTokenizerTest(TempDirTestCase):

    def test_what_a_directory_holds(self):
        self.assertIsNone(find_tokenizer(self.tmp))
        self.assertIsNone(find_tokenizer(self.tmp / 'missing'))
        save_tokenizer(CharTokenizer('xyz'), self.tmp)
        self.assertIsInstance(find_tokenizer(self.tmp), CharTokenizer)
        save_tokenizer(small_vocab().to_encoder(), self.tmp)
        self.assertIsInstance(find_tokenizer(self.tmp), Encoder)  # BPE files come first

    def test_hf_file_names(self):
        vocab = small_vocab()
        vocab.save(self.tmp)
        (self.tmp / 'encoder.json').rename(self.tmp / 'vocab.json')
        (self.tmp / 'vocab.bpe').rename(self.tmp / 'merges.txt')
        tok = load_tokenizer(self.tmp)
        self.assertEqual(tok.encode(TEXT), vocab.to_encoder().encode(TEXT))

    def test_truncated_files_name_the_file_and_say_tokenizer(self):
        save_tokenizer(small_vocab().to_encoder(), self.tmp)
        whole = (self.tmp / 'encoder.json').read_text(encoding='utf-8')
        for content in (whole[:len(whole) // 2], '["a", "b"]', '\x00\x00'):
            (self.tmp / 'encoder.json').write_text(content, encoding='utf-8')
            for read in (find_tokenizer, load_tokenizer, lambda d: tokenizer_for_model(d, 50257)):
                with self.subTest(content=content[:20], read=read):
                    # never GPT-2's instead, though the size would allow it
                    with self.assertRaises(WeightsError) as cm:
                        read(self.tmp)
                    message = str(cm.exception)
                    self.assertIn(str(self.tmp / 'encoder.json'), message)
                    self.assertIn('tokenizer', message)
                    self.assertIsInstance(cm.exception, ValueError)
        (self.tmp / 'chars.json').write_text('["a", "b', encoding='utf-8')
        for name in ('encoder.json', 'vocab.bpe'):
            (self.tmp / name).unlink()
        with self.assertRaisesRegex(WeightsError, r'tokenizer.*chars\.json'):
            find_tokenizer(self.tmp)


class LoadTokenizerTest(TempDirTestCase):

    def test_sources(self):
        vocab = small_vocab()
        vocab.save(self.tmp)
        self.assertEqual(load_tokenizer(self.tmp).n_vocab, 300)
        self.assertEqual(load_tokenizer(self.tmp / 'encoder.json').n_vocab, 300)  # a file: its directory
        (self.tmp / 'vocab.json').write_text(json.dumps(['a', 'b']), encoding='utf-8')  # characters, any name
        self.assertEqual(load_tokenizer(self.tmp / 'vocab.json').chars, ['a', 'b'])
        self.assertEqual(load_tokenizer('gpt2').n_vocab, 50257)

    def test_no_fallback(self):
        with self.assertRaisesRegex(FileNotFoundError, 'no tokenizer at'):
            load_tokenizer(self.tmp)
        with self.assertRaisesRegex(FileNotFoundError, 'no tokenizer at'):
            load_tokenizer(self.tmp / 'nope')


class TokenizerForModelTest(TempDirTestCase):

    def test_gpt2_only_for_a_gpt2_sized_vocabulary(self):
        for vocab_size in (50257, 50304):
            self.assertEqual(tokenizer_for_model(self.tmp, vocab_size).n_vocab, 50257)
        self.assertEqual(tokenizer_for_model('gpt2', 50257).n_vocab, 50257)  # a hub name
        with self.assertRaisesRegex(ValueError, r'cannot tell which tokenizer.*--tokenizer'):
            tokenizer_for_model(self.tmp, 65)

    def test_a_trainer_checkpoint_looks_in_its_run_directory(self):
        ckpt = self.tmp / 'ckpt'
        ckpt.mkdir()
        (ckpt / 'trainer.pt').write_bytes(b'')
        (self.tmp / 'export').mkdir()
        save_tokenizer(CharTokenizer('abc'), self.tmp)
        self.assertEqual(tokenizer_for_model(ckpt, 3).chars, ['a', 'b', 'c'])
        self.assertEqual(tokenizer_for_model(ckpt / 'trainer.pt', 3).chars, ['a', 'b', 'c'])  # a file in it
        with self.assertRaisesRegex(ValueError, 'cannot tell which tokenizer'):
            tokenizer_for_model(self.tmp / 'export', 3)  # a plain model directory does not look above itself


if __name__ == '__main__':
    unittest.main()
