"""
mingpt.data: reading the training text (a file, ./input.txt, or tiny shakespeare through the
download code) and the windows of tokens a language model trains on.
"""

import os
import unittest

import torch

from mingpt.data import TokenWindows, read_text_file, split_windows, training_text
from mingpt.download import DownloadError
from tests.common import (TempDirTestCase, data_file, free_port_url, local_http_server, needs_shared_data,
                          patched_env)


class TestTrainingText(TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.tmp)

    def test_a_path_then_input_txt(self):
        (self.tmp / 'mine.txt').write_text('héllo', encoding='utf-8')
        self.assertEqual(training_text(self.tmp / 'mine.txt'), 'héllo')
        (self.tmp / 'input.txt').write_text('from input.txt', encoding='utf-8')
        self.assertEqual(training_text(), 'from input.txt')
        self.assertEqual(training_text(self.tmp / 'mine.txt'), 'héllo')  # a path wins

    @needs_shared_data('tinyshakespeare.txt')
    def test_tiny_shakespeare_downloaded_once_when_there_is_nothing_else(self):
        served = self.tmp / 'served'
        served.mkdir()
        (served / 'input.txt').write_bytes(data_file('tinyshakespeare.txt').read_bytes())
        log = []
        with local_http_server(served, requests_log=log) as url, \
                patched_env(MINGPT_CACHE=str(self.tmp / 'cache'), MINGPT_TINYSHAKESPEARE_URL=f'{url}/input.txt'):
            text = training_text()
            self.assertEqual(training_text(), text)  # the second time from the cache
        self.assertEqual(len(text), 1115394)
        self.assertTrue(text.startswith('First Citizen:'))
        self.assertEqual(len(log), 1)

    def test_offline_says_to_give_a_file(self):
        with patched_env(MINGPT_CACHE=str(self.tmp / 'cache'), MINGPT_TINYSHAKESPEARE_URL=free_port_url()):
            with self.assertRaises(DownloadError) as cm:
                training_text()
        message = str(cm.exception)
        self.assertIn('no input.txt here', message)
        self.assertIn('could not download', message)
        self.assertIn('--data.path', message)

    def test_bad_files_are_clear_errors(self):
        for name, content, message in [('empty.txt', b'', 'is empty'),
                                       ('binary.bin', b'ab\x00cd', 'NUL bytes'),
                                       ('latin1.txt', 'café'.encode('latin-1'), 'not valid UTF-8')]:
            (self.tmp / name).write_bytes(content)
            with self.subTest(name), self.assertRaisesRegex(ValueError, message):
                training_text(self.tmp / name)
        with self.assertRaisesRegex(FileNotFoundError, 'no such file'):
            read_text_file(self.tmp / 'missing.txt')


class TestWindows(unittest.TestCase):

    def test_every_window_shifted_by_one(self):
        ids = torch.arange(100, 110)
        ds = TokenWindows(ids, block_size=4, vocab_size=200)
        self.assertEqual(len(ds), 6)  # windows of 5 tokens start at 0..5
        self.assertEqual((ds.get_block_size(), ds.get_vocab_size()), (4, 200))
        x, y = ds[0]
        self.assertEqual(x.tolist(), [100, 101, 102, 103])
        self.assertEqual(y.tolist(), [101, 102, 103, 104])
        x, y = ds[len(ds) - 1]
        self.assertEqual(y.tolist(), [106, 107, 108, 109])  # the last token is a target once
        with self.assertRaisesRegex(ValueError, 'too few'):
            TokenWindows(ids, block_size=10)

    def test_split_is_the_end_of_the_text(self):
        ids = torch.arange(1000)
        train, val = split_windows(ids, block_size=8, val_fraction=0.1)
        self.assertEqual(train.ids.tolist(), list(range(900)))
        self.assertEqual(val.ids.tolist(), list(range(900, 1000)))
        # no training window reaches into the validation tokens
        self.assertEqual(int(train[len(train) - 1][1][-1]), 899)
        train, val = split_windows(ids, block_size=8, val_fraction=0.0)
        self.assertIsNone(val)
        self.assertEqual(len(train.ids), 1000)


if __name__ == '__main__':
    unittest.main()
