"""
mingpt.formats.tf_bundle: the TensorFlow checkpoint reader returns exactly what TensorFlow itself
read back from the fixture (made by tests/fixtures/make_tf_checkpoint.py), CRC-32C is the standard
one, and a cut or flipped bit anywhere in the index or the data is a WeightsError, never another one.
"""

import shutil
import unittest
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file as load_numpy

from mingpt.formats.tf_bundle import crc32c, read_tf_checkpoint
from mingpt.model import GPT
from mingpt.weights import WeightsError
from tests.common import TempDirTestCase

TF_FIXTURE = Path(__file__).resolve().parent / 'fixtures' / 'tf_gpt2_tiny'


class TestTensorBundle(TempDirTestCase):

    @classmethod
    def setUpClass(cls):
        cls.expected = load_numpy(TF_FIXTURE / 'expected.safetensors')  # what TensorFlow read back

    def copy_fixture(self):
        return shutil.copytree(TF_FIXTURE, self.tmp / 'ckpt')

    def test_crc32c(self):
        self.assertEqual(crc32c(b'123456789'), 0xE3069283)  # the standard check value
        self.assertEqual(crc32c(b''), 0)
        data = np.random.default_rng(0).integers(0, 256, 70_001, dtype=np.uint8).tobytes()
        crc = 0xFFFFFFFF  # the vectorised path against the textbook bitwise definition
        for b in data:
            crc ^= b
            for _ in range(8):
                crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        self.assertEqual(crc32c(data), crc ^ 0xFFFFFFFF)

    def test_reader_returns_exactly_what_tensorflow_reads(self):
        got = read_tf_checkpoint(TF_FIXTURE)
        self.assertEqual(sorted(got), sorted(self.expected))
        self.assertEqual(len(got), 2 + 12 * 2 + 2 + 1 + 40)
        for name, want in self.expected.items():
            self.assertEqual((got[name].dtype, got[name].shape), (want.dtype, want.shape), name)
            self.assertTrue(np.array_equal(got[name], want), name)
        self.assertEqual(int(got['global_step']), 1234)

    def test_truncated_data_file(self):
        d = self.copy_fixture()
        data = d / 'model.ckpt.data-00000-of-00001'
        data.write_bytes(data.read_bytes()[:-100])
        with self.assertRaisesRegex(WeightsError, r'data-00000-of-00001: too short.*truncated'):
            GPT.from_pretrained(d)

    def test_corrupt_data_file(self):
        d = self.copy_fixture()
        data = d / 'model.ckpt.data-00000-of-00001'
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x40
        data.write_bytes(bytes(raw))
        with self.assertRaisesRegex(WeightsError, r'data-00000-of-00001: variable .* crc32c'):
            GPT.from_pretrained(d)

    def test_corrupt_and_truncated_index(self):
        d = self.copy_fixture()
        index = d / 'model.ckpt.index'
        good = index.read_bytes()
        raw = bytearray(good)
        raw[200] ^= 0x01
        for content in (bytes(raw), good[:-10], good[:30]):
            with self.subTest(len(content)):
                index.write_bytes(content)
                with self.assertRaisesRegex(WeightsError, r'model\.ckpt\.index: not a readable TensorFlow'):
                    GPT.from_pretrained(d)
        # a flipped bit anywhere in the data blocks (all but the unused metaindex and the footer's
        # padding), or a cut anywhere, is a WeightsError and never any other exception
        for pos in range(0, len(good) - 100, 23):
            for content in (good[:pos] + bytes([good[pos] ^ 0x10]) + good[pos + 1:], good[:pos]):
                index.write_bytes(content)
                with self.assertRaises(WeightsError, msg=pos):
                    read_tf_checkpoint(d)

    def test_missing_data_file(self):
        d = self.copy_fixture()
        (d / 'model.ckpt.data-00000-of-00001').unlink()
        with self.assertRaisesRegex(WeightsError, r'data-00000-of-00001: not found'):
            GPT.from_pretrained(d)


if __name__ == '__main__':
    unittest.main()
