"""
mingpt.formats.llmc: llm.c's checkpoint, written here independently the way llm.c writes it, loads
into the same GPT as the transformers model it came from; save_llmc writes exactly those bytes, in
every version; short, long and corrupt files are clear WeightsErrors. All offline, tiny models.
"""

import unittest

import numpy as np
import torch
from transformers import GPT2LMHeadModel

from mingpt.formats.llmc import LLMC_MAGIC, read_llmc, save_llmc
from mingpt.model import GPT
from mingpt.weights import WeightsError
from tests.common import TINY_HF, TempDirTestCase, tiny_hf


def write_llmc_like_llmc(hf, path):
    """
    llm.c's train_gpt2.py write_model, redone independently from a transformers model: header
    [magic, 3, maxT, V, L, NH, C, Vp], then fp32 tensors grouped by kind across layers, weights in
    nn.Linear (out, in) layout (HF's Conv1D transposed), wte padded to a multiple of 128 rows.
    """
    c = hf.config
    sd = {k: v.detach() for k, v in hf.state_dict().items()}
    V, C, L = c.vocab_size, c.n_embd, c.n_layer
    Vp = (V + 127) // 128 * 128
    header = np.zeros(256, dtype='<i4')
    header[:8] = [20240326, 3, c.n_positions, V, L, c.n_head, C, Vp]
    parts = [torch.cat([sd['transformer.wte.weight'], torch.zeros(Vp - V, C)]), sd['transformer.wpe.weight']]
    for kind, transpose in (('ln_1.weight', 0), ('ln_1.bias', 0), ('attn.c_attn.weight', 1), ('attn.c_attn.bias', 0),
                            ('attn.c_proj.weight', 1), ('attn.c_proj.bias', 0), ('ln_2.weight', 0), ('ln_2.bias', 0),
                            ('mlp.c_fc.weight', 1), ('mlp.c_fc.bias', 0), ('mlp.c_proj.weight', 1), ('mlp.c_proj.bias', 0)):
        for i in range(L):
            t = sd[f'transformer.h.{i}.{kind}']
            parts.append(t.t() if transpose else t)
    parts += [sd['transformer.ln_f.weight'], sd['transformer.ln_f.bias']]
    with open(path, 'wb') as f:
        f.write(header.tobytes())
        for t in parts:
            f.write(t.contiguous().numpy().astype('<f4').tobytes())


class TestLLMC(TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.hf = tiny_hf(seed=8)
        self.hf.save_pretrained(self.tmp / 'hf')
        self.model = GPT.from_pretrained(self.tmp / 'hf').eval()
        self.idx = torch.randint(0, TINY_HF['vocab_size'], (2, 11))

    def assert_same_state(self, a, b):
        a, b = a.state_dict(), b.state_dict()
        self.assertEqual(list(a), list(b))
        for k in a:
            self.assertTrue(torch.equal(a[k], b[k]), k)

    def test_file_written_the_llmc_way_loads(self):
        write_llmc_like_llmc(self.hf, self.tmp / 'gpt2_tiny.bin')
        model = GPT.from_pretrained(self.tmp / 'gpt2_tiny.bin').eval()
        self.assertTrue(model.config.tie_weights)
        self.assertEqual(model.config.vocab_size, 100)  # the 28 padding rows are gone
        torch.testing.assert_close(model(self.idx)[0], self.hf(self.idx).logits, atol=1e-5, rtol=0)

    def test_round_trip_is_exact_and_bytes_match_llmc(self):
        path = save_llmc(self.model, self.tmp / 'ours.bin')
        write_llmc_like_llmc(self.hf, self.tmp / 'theirs.bin')
        self.assertEqual(path.read_bytes(), (self.tmp / 'theirs.bin').read_bytes())
        header = np.fromfile(path, dtype='<i4', count=8).tolist()
        self.assertEqual(header, [LLMC_MAGIC, 3, 64, 100, 2, 2, 32, 128])
        self.assert_same_state(GPT.from_pretrained(path), self.model)

    def test_llmc_to_hf_export(self):
        # the loaded tensors are views into one flat buffer: the export must still write them
        save_llmc(self.model, self.tmp / 'ours.bin')
        GPT.from_pretrained(self.tmp / 'ours.bin').save_pretrained(self.tmp / 'back')
        hf = GPT2LMHeadModel.from_pretrained(self.tmp / 'back').eval()
        self.assertTrue(torch.equal(hf(self.idx).logits, self.hf(self.idx).logits))

    def test_versions_1_and_5(self):
        save_llmc(self.model, self.tmp / 'v1.bin', version=1)
        self.assertEqual((self.tmp / 'v1.bin').stat().st_size,
                         1024 + 4 * sum(p.numel() for p in self.model.parameters()))
        self.assert_same_state(GPT.from_pretrained(self.tmp / 'v1.bin'), self.model)
        save_llmc(self.model, self.tmp / 'v5.bin', version=5)
        sizes, tensors = read_llmc(self.tmp / 'v5.bin')
        self.assertEqual(tensors['transformer.wte.weight'].dtype, torch.bfloat16)
        loaded = GPT.from_pretrained(self.tmp / 'v5.bin')
        for k, v in self.model.state_dict().items():
            self.assertTrue(torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16).float()), k)
        with self.assertRaisesRegex(ValueError, 'version'):
            save_llmc(self.model, self.tmp / 'v2.bin', version=2)

    def test_untied_model_cannot_be_saved(self):
        config = GPT.get_default_config()
        config.model_type, config.vocab_size, config.block_size = 'gpt-nano', 20, 8
        with self.assertRaisesRegex(WeightsError, 'ties lm_head'):
            save_llmc(GPT(config), self.tmp / 'x.bin')
        self.assertFalse((self.tmp / 'x.bin').exists())

    def test_truncated_and_corrupt_files(self):
        path = save_llmc(self.model, self.tmp / 'ok.bin')
        data = path.read_bytes()
        cases = {
            'short_header.bin': (data[:100], 'shorter than llm.c'),
            'truncated.bin': (data[:-8], 'truncated'),
            'longer.bin': (data + b'\0' * 8, 'extra bytes'),
            'version.bin': (data[:4] + np.int32(7).tobytes() + data[8:], 'version 7'),
            'sizes.bin': (data[:16] + np.int32(-2).tobytes() + data[20:], 'makes no sense'),
            'heads.bin': (data[:20] + np.int32(3).tobytes() + data[24:], 'divisible'),
        }
        for name, (content, message) in cases.items():
            with self.subTest(name):
                (self.tmp / name).write_bytes(content)
                if name == 'short_header.bin':
                    with self.assertRaisesRegex(WeightsError, message):
                        read_llmc(self.tmp / name)
                with self.assertRaisesRegex(WeightsError, f'{name}.*{message}'):
                    GPT.from_pretrained(self.tmp / name)


if __name__ == '__main__':
    unittest.main()
