"""
mingpt.formats.tf: OpenAI's GPT-2 TensorFlow release (hparams.json + a TF checkpoint; the fixture
was made by tests/fixtures/make_tf_checkpoint.py with TensorFlow 2.21) loads into a GPT that computes what
transformers computes from the same variables, and hparams that do not fit are clear WeightsErrors.
"""

import json
import shutil
import unittest
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file as load_numpy
from transformers import GPT2Config, GPT2LMHeadModel

from mingpt.model import GPT
from mingpt.weights import WeightsError
from tests.common import TempDirTestCase

TF_FIXTURE = Path(__file__).resolve().parent / 'fixtures' / 'tf_gpt2_tiny'

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def hf_from_openai_variables(v, hparams):
    """ a transformers GPT-2 holding OpenAI-named TF variables, mapped here independently of mingpt """
    config = GPT2Config(n_layer=hparams['n_layer'], n_head=hparams['n_head'], n_embd=hparams['n_embd'],
                        n_positions=hparams['n_ctx'], vocab_size=hparams['n_vocab'], bos_token_id=0, eos_token_id=None)
    hf = GPT2LMHeadModel(config).eval()
    sd = {'transformer.wte.weight': v['model/wte'], 'transformer.wpe.weight': v['model/wpe'],
          'transformer.ln_f.weight': v['model/ln_f/g'], 'transformer.ln_f.bias': v['model/ln_f/b']}
    for i in range(hparams['n_layer']):
        for ours, theirs in (('ln_1', 'ln_1'), ('ln_2', 'ln_2')):
            sd[f'transformer.h.{i}.{ours}.weight'] = v[f'model/h{i}/{theirs}/g']
            sd[f'transformer.h.{i}.{ours}.bias'] = v[f'model/h{i}/{theirs}/b']
        for module in ('attn/c_attn', 'attn/c_proj', 'mlp/c_fc', 'mlp/c_proj'):
            name = f'transformer.h.{i}.' + module.replace('/', '.')
            sd[name + '.weight'] = v[f'model/h{i}/{module}/w'][0]  # Conv1D [1, nx, nf] -> HF's (nx, nf)
            sd[name + '.bias'] = v[f'model/h{i}/{module}/b']
    sd['lm_head.weight'] = sd['transformer.wte.weight']
    hf.load_state_dict({k: torch.from_numpy(np.array(x)) for k, x in sd.items()}, strict=True)
    return hf


class TestOpenAICheckpoint(TempDirTestCase):

    @classmethod
    def setUpClass(cls):
        cls.expected = load_numpy(TF_FIXTURE / 'expected.safetensors')  # what TensorFlow read back
        cls.hparams = json.loads((TF_FIXTURE / 'hparams.json').read_text())

    def test_loaded_model_matches_transformers_built_from_the_same_values(self):
        hf = hf_from_openai_variables(self.expected, self.hparams)
        idx = torch.randint(0, 11, (2, 16))
        for source in (TF_FIXTURE, TF_FIXTURE / 'model.ckpt', TF_FIXTURE / 'model.ckpt.index', str(TF_FIXTURE)):
            with self.subTest(str(source)):
                model = GPT.from_pretrained(source).eval()
                C = model.config
                self.assertEqual((C.n_layer, C.n_head, C.n_embd, C.vocab_size, C.block_size), (2, 2, 8, 11, 16))
                self.assertIs(model.lm_head.weight, model.transformer.wte.weight)
                torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)

    def test_tf_to_hf_export(self):
        GPT.from_pretrained(TF_FIXTURE).save_pretrained(self.tmp / 'hf')
        hf = GPT2LMHeadModel.from_pretrained(self.tmp / 'hf').eval()
        idx = torch.randint(0, 11, (1, 9))
        torch.testing.assert_close(hf(idx).logits, hf_from_openai_variables(self.expected, self.hparams)(idx).logits,
                                   atol=1e-6, rtol=0)

    def test_hparams_that_do_not_fit(self):
        d = shutil.copytree(TF_FIXTURE, self.tmp / 'ckpt')
        for changes, message in (({'n_layer': 3}, r'no variable model/h2/ln_1/g'),
                                 ({'n_vocab': 12}, r'wte\.weight is \(11, 8\), expected \(12, 8\)'),
                                 ({'n_head': None}, r'hparams\.json: missing or not an integer: n_head')):
            with self.subTest(changes):
                (d / 'hparams.json').write_text(json.dumps({**self.hparams, **changes}))
                with self.assertRaisesRegex(WeightsError, message):
                    GPT.from_pretrained(d)


if __name__ == '__main__':
    unittest.main()
