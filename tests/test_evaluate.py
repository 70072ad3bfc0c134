"""Tests for mingpt/evaluate.py: sliding-window loss, bits per byte, the command line finding a model's
tokenizer, bad input."""

import contextlib
import io
import itertools
import json
import logging
import math
import shutil
import tempfile
import types
import unittest
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from mingpt import metrics
from mingpt.bpe_train import train_bpe
from mingpt.evaluate import evaluate_text, main, windows
from mingpt.tokenizers import CharTokenizer, load_tokenizer, tokenizer_for_model
from tests.common import TempDirTestCase, shakespeare, tiktoken_gpt2, tiny_gpt


def run_cli(argv):
    """main(argv) -> (stdout, stderr, exit code or None)."""
    out, err = io.StringIO(), io.StringIO()
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code
    return out.getvalue(), err.getvalue(), code


class SlidingWindowTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.text = shakespeare(150)
        cls.tok = CharTokenizer.from_text(shakespeare(10_000))
        cls.model = tiny_gpt(cls.tok.n_vocab, block_size=16)

    def direct_nats(self, ids, block_size, stride):
        """The definition, one token at a time: target j is predicted from ids[s:j], where s is the start of
        the first window (starts 0, stride, 2*stride, ...) whose block_size inputs reach position j - 1."""
        total = 0.0
        for j in range(1, len(ids)):
            k = max(0, math.ceil((j - block_size) / stride))
            s = k * stride
            self.assertLessEqual(j - s, block_size)
            logits, _ = self.model(torch.tensor([ids[s:j]]))
            total -= F.log_softmax(logits[0, -1].double(), -1)[ids[j]].item()
        return total

    def test_equals_direct_computation(self):
        self.model.eval()
        ids = self.tok.encode(self.text)
        n_bytes = len(self.text.encode('utf-8')) - len(self.text[0].encode('utf-8'))
        with torch.no_grad():
            for block_size, stride in ((16, 16), (16, 5), (16, 1), (7, 3)):
                direct = self.direct_nats(ids, block_size, stride)
                for batch_size in (1, 3, 64):
                    with self.subTest(block_size=block_size, stride=stride, batch_size=batch_size):
                        r = evaluate_text(self.model, self.tok, self.text, block_size=block_size, stride=stride,
                                     batch_size=batch_size)
                        self.assertEqual(r['tokens'], len(ids) - 1)
                        self.assertEqual(r['bytes'], n_bytes)
                        self.assertAlmostEqual(r['loss'] * r['tokens'], direct, delta=1e-4 * direct)
                        self.assertAlmostEqual(r['bits_per_byte'], direct / math.log(2) / n_bytes, delta=1e-5)

    def test_stride_changes_the_context(self):
        # the stride changes which context each token sees, so the loss changes (a little, for a random model)
        a = evaluate_text(self.model, self.tok, self.text, stride=16)['loss']
        b = evaluate_text(self.model, self.tok, self.text, stride=1)['loss']
        self.assertNotEqual(a, b)
        self.assertAlmostEqual(a, b, delta=0.2)

    def test_windows_score_every_target_once(self):
        for n, block, stride in ((2, 1, 1), (10, 4, 2), (100, 16, 16), (100, 16, 7), (17, 16, 16), (5, 64, 32)):
            scored = []
            for start, end, first in windows(n, block, stride):
                self.assertLessEqual(end - start, block)
                self.assertTrue(start < first <= end)
                scored += range(first, end + 1)
            self.assertEqual(scored, list(range(1, n)), (n, block, stride))

    def test_model_mode_is_restored(self):
        self.model.train()
        evaluate_text(self.model, self.tok, self.text)
        self.assertTrue(self.model.training)
        self.model.eval()

    def test_progress_lines_when_stderr_is_not_a_terminal(self):
        # a clock on which every batch takes 11 s: each one is worth a line (one every 10 s)
        clock = itertools.count(0, 11)
        with mock.patch.object(metrics, 'time', types.SimpleNamespace(monotonic=lambda: next(clock))), \
                mock.patch('sys.stderr', io.StringIO()):
            with self.assertLogs('mingpt.metrics', logging.INFO) as logs:
                evaluate_text(self.model, self.tok, self.text, block_size=16, stride=16, batch_size=4,
                              progress=True)
            with self.assertNoLogs('mingpt.metrics', logging.INFO):
                evaluate_text(self.model, self.tok, self.text, block_size=16, stride=16, batch_size=4)
        n = math.ceil(math.ceil((len(self.tok.encode(self.text)) - 1) / 16) / 4)  # batches of 4 windows
        self.assertEqual([r.getMessage() for r in logs.records],
                         [f'evaluating: batch {i}/{n}, ETA {11 * (n - i)}s' for i in range(1, n + 1)])

    def test_argument_errors(self):
        for kwargs, message in (({'block_size': 17}, 'block_size=17'), ({'block_size': 0}, 'block_size=0'),
                                ({'stride': 17}, 'stride=17'), ({'stride': 0}, 'stride=0'),
                                ({'batch_size': 0}, 'batch_size=0')):
            with self.subTest(kwargs), self.assertRaisesRegex(ValueError, message):
                evaluate_text(self.model, self.tok, self.text, **kwargs)
        with self.assertRaisesRegex(ValueError, 'empty'):
            evaluate_text(self.model, self.tok, '')
        with self.assertRaisesRegex(ValueError, 'at least 2'):
            evaluate_text(self.model, self.tok, 'a')


class GPT2BitsPerByteTest(unittest.TestCase):
    """A tiny random model over GPT-2's vocabulary: evaluate's bits per byte against the formula, computed
    with tiktoken's ids and transformers' GPT2LMHeadModel loaded from the same directory."""

    def test_matches_formula_with_tiktoken_and_transformers(self):
        from transformers import GPT2LMHeadModel
        model = tiny_gpt(50257, block_size=64, n_layer=1, n_embd=16)
        text = '😀 Bits per byte: ' + shakespeare(150)  # starts with a character split across tokens
        tik = tiktoken_gpt2()
        ids = tik.encode_ordinary(text)
        self.assertLess(len(ids), 64)
        first_bytes = len(tik.decode_single_token_bytes(ids[0]))
        self.assertLess(first_bytes, 4)  # part of the emoji
        n_bytes = len(text.encode('utf-8')) - first_bytes
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            hf = GPT2LMHeadModel.from_pretrained(tmp).eval()
            x = torch.tensor([ids])
            with torch.no_grad():
                nats = hf(x, labels=x).loss.item() * (len(ids) - 1)  # HF shifts the labels itself
            expected = nats / math.log(2) / n_bytes

            tokenizer = tokenizer_for_model(tmp, 50257)  # no tokenizer files, 50257 tokens: GPT-2's BPE
            r = evaluate_text(model, tokenizer, text)
            self.assertEqual((r['tokens'], r['bytes']), (len(ids) - 1, n_bytes))
            self.assertAlmostEqual(r['bits_per_byte'], expected, delta=1e-5 * expected)
            self.assertAlmostEqual(r['loss'], nats / (len(ids) - 1), delta=1e-5)

            # bos_token_id: <|endoftext|> first, and then every token and byte counts
            r = evaluate_text(model, tokenizer, text, bos_token_id=50256)
            self.assertEqual((r['tokens'], r['bytes']), (len(ids), len(text.encode('utf-8'))))
            x = torch.tensor([[50256] + ids])
            with torch.no_grad():
                nats = hf(x, labels=x).loss.item() * len(ids)
            self.assertAlmostEqual(r['bits_per_byte'], nats / math.log(2) / len(text.encode('utf-8')), delta=1e-5)

            # and the command line, which finds the same tokenizer by itself
            data = Path(tmp) / 'text.txt'
            data.write_text(text, encoding='utf-8')
            with self.assertLogs('mingpt.tokenizers', 'INFO') as logs:
                out, err, code = run_cli(['--model', tmp, '--data', str(data), '--device', 'cpu'])
            self.assertIsNone(code, err)
            self.assertIn(f'| {expected:.4f} |', out)
            self.assertIn('GPT-2 BPE', '\n'.join(logs.output))


class TokenBytesTest(unittest.TestCase):
    """token_byte_lengths: the bytes of text a stretch of ids stands for, as in prepare's shards."""

    def test_bytes_of_ids_are_the_bytes_of_their_text(self):
        from mingpt.bpe import get_encoder
        from mingpt.evaluate import token_byte_lengths
        text = '😀 naïve café, 日本語 ' + shakespeare(500)
        cases = [(get_encoder(), tiktoken_gpt2().encode_ordinary(text)), (CharTokenizer.from_text(text), None)]
        for tokenizer, ids in cases:
            ids = tokenizer.encode(text) if ids is None else ids
            lengths = token_byte_lengths(tokenizer)
            self.assertEqual(len(lengths), tokenizer.n_vocab)
            self.assertEqual(int(lengths[ids].sum()), len(text.encode('utf-8')))
        self.assertEqual(token_byte_lengths(get_encoder())[50256], 0)  # <|endoftext|> stands for no text


class ModelTokenizerTest(TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.data = self.tmp / 'held_out.txt'
        self.data.write_text(shakespeare(3000, start=150_000), encoding='utf-8')

    def test_char_model_directory(self):
        tok = CharTokenizer.from_text(shakespeare())
        self.assertEqual(tok.n_vocab, 65)
        model = tiny_gpt(tok.n_vocab, block_size=32)
        d = self.tmp / 'char_model'
        model.save_pretrained(d)
        tok.save(d)
        self.assertEqual(json.loads((d / 'chars.json').read_text(encoding='utf-8')), tok.chars)
        out, err, code = run_cli(['--model', str(d), '--data', str(self.data), '--batch-size', '4'])
        self.assertIsNone(code, err)
        expected = evaluate_text(model, tok, self.data.read_text(encoding='utf-8'))
        self.assertIn(f'| {expected["bits_per_byte"]:.4f} |', out)
        self.assertIn(f'| {expected["tokens"]:,} |', out)
        self.assertEqual(expected['tokens'], 2999)
        self.assertEqual(expected['bytes'], 2999)  # one byte per character in tiny shakespeare
        # an untrained model is near uniform: loss ~ ln 65 nats per character
        self.assertAlmostEqual(expected['loss'], math.log(65), delta=0.5)

    def test_bpe_model_directory_with_trained_vocabulary(self):
        vocab = train_bpe(shakespeare(100_000), 512, special_tokens=['<|endoftext|>'])
        model = tiny_gpt(512, block_size=32)
        d = self.tmp / 'bpe_model'
        model.save_pretrained(d)
        vocab.save(d)
        tok = tokenizer_for_model(d, 512)
        self.assertEqual(tok.n_vocab, 512)
        text = self.data.read_text(encoding='utf-8')
        r = evaluate_text(model, tok, text)
        self.assertEqual(r['tokens'], len(tok.encode(text)) - 1)
        self.assertEqual(r['bytes'], len(text.encode('utf-8')) - len(tok.decode(tok.encode(text)[:1]).encode()))
        out, err, code = run_cli(['--model', str(d), '--data', str(self.data)])
        self.assertIsNone(code, err)
        self.assertIn(f'| {r["bits_per_byte"]:.4f} |', out)
        # --tokenizer overrides what the directory holds; a bad one is a clear error
        self.assertEqual(load_tokenizer(d / 'encoder.json').n_vocab, 512)
        self.assertEqual(load_tokenizer(d).n_vocab, 512)
        _, err, code = run_cli(['--model', str(d), '--data', str(self.data), '--tokenizer', str(self.tmp / 'nope')])
        self.assertEqual(code, 2)
        self.assertIn('no tokenizer at', err)

    def test_trainer_checkpoint_finds_the_tokenizer_of_its_run(self):
        # a trainer checkpoint is work_dir/ckpt, rewritten whole at each save: chars.json lives in work_dir
        from mingpt.checkpoint import write_checkpoint
        tok = CharTokenizer.from_text(shakespeare())
        model = tiny_gpt(tok.n_vocab, block_size=32)
        work_dir = self.tmp / 'run'
        work_dir.mkdir()
        write_checkpoint(str(work_dir / 'ckpt'), model, {'iter_num': 7})
        _, err, code = run_cli(['--model', str(work_dir / 'ckpt'), '--data', str(self.data)])
        self.assertEqual(code, 2)
        self.assertIn('cannot tell which tokenizer', err)
        tok.save(work_dir)
        out, err, code = run_cli(['--model', str(work_dir / 'ckpt'), '--data', str(self.data)])
        self.assertIsNone(code, err)
        expected = evaluate_text(model, tok, self.data.read_text(encoding='utf-8'))
        self.assertIn(f'| {expected["bits_per_byte"]:.4f} |', out)
        # a plain model directory does not look above itself
        model.save_pretrained(work_dir / 'export')
        with self.assertRaisesRegex(ValueError, 'cannot tell which tokenizer'):
            tokenizer_for_model(work_dir / 'export', tok.n_vocab)
        # --tokenizer takes a JSON list of characters under any name (chargpt's vocab.json, say)
        (work_dir / 'vocab.json').write_text(json.dumps(tok.chars), encoding='utf-8')
        out, err, code = run_cli(['--model', str(work_dir / 'export'), '--data', str(self.data),
                                  '--tokenizer', str(work_dir / 'vocab.json')])
        self.assertIsNone(code, err)
        self.assertIn(f'| {expected["bits_per_byte"]:.4f} |', out)


class BadInputTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp())
        cls.tok = CharTokenizer.from_text(shakespeare())
        cls.char_dir = cls.tmp / 'char_model'
        tiny_gpt(cls.tok.n_vocab).save_pretrained(cls.char_dir)
        cls.tok.save(cls.char_dir)
        cls.good = cls.tmp / 'good.txt'
        cls.good.write_text(shakespeare(500), encoding='utf-8')

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)

    def assertCliError(self, argv, *messages):
        out, err, code = run_cli(argv)
        self.assertEqual(code, 2, err)
        self.assertEqual(out, '')
        for message in messages:
            self.assertIn(message, err)

    def test_bad_data_files(self):
        for name, data, message in (('empty.txt', b'', 'is empty'), ('zeros.bin', b'text\x00\x00\x01', 'NUL bytes'),
                                    ('latin1.txt', 'First Citizen: café'.encode('latin-1'), 'not valid UTF-8'),
                                    ('one.txt', b'F', 'at least 2')):
            path = self.tmp / name
            path.write_bytes(data)
            with self.subTest(name):
                self.assertCliError(['--model', str(self.char_dir), '--data', str(path)], message)
        self.assertCliError(['--model', str(self.char_dir), '--data', str(self.tmp / 'missing.txt')], 'no such file')

    def test_characters_missing_from_the_vocabulary(self):
        path = self.tmp / 'unicode.txt'
        path.write_text('First Citizen: café ½\n', encoding='utf-8')
        self.assertCliError(['--model', str(self.char_dir), '--data', str(path)], 'not in the vocabulary', "'é'",
                            "'½'")
        with self.assertRaisesRegex(ValueError, 'not in the vocabulary'):
            self.tok.encode('😀')

    def test_vocabulary_mismatch(self):
        # a 65-token model with GPT-2's 50257-token BPE
        self.assertCliError(['--model', str(self.char_dir), '--data', str(self.good), '--tokenizer', 'gpt2'],
                            '50257 tokens but the model only 65')
        # a tokenizer without n_vocab is still caught by the ids it produces
        class Bytes:
            def encode(self, text):
                return list(text.encode('utf-8'))

            def decode(self, ids):
                return bytes(ids).decode('utf-8', errors='replace')
        with self.assertRaisesRegex(ValueError, 'id 1.. but the model has only 65'):
            evaluate_text(tiny_gpt(65), Bytes(), 'zzzz')

    def test_no_tokenizer_to_be_found(self):
        d = self.tmp / 'bare'
        tiny_gpt(100).save_pretrained(d)
        self.assertCliError(['--model', str(d), '--data', str(self.good)], 'cannot tell which tokenizer',
                            '--tokenizer')

    def test_bad_model(self):
        self.assertCliError(['--model', str(self.tmp / 'no_model'), '--data', str(self.good)],
                            'no such file or directory')


if __name__ == '__main__':
    unittest.main()
