"""
mingpt.weights: every checkpoint format loads into a GPT that computes what transformers'
GPT2LMHeadModel computes (logits, greedy text, gradients, a few optimizer steps), saves back out
in a form transformers loads, and every bad input is a clear WeightsError. All offline, tiny models.
"""

import hashlib
import json
import os
import pickle
import shutil
import tempfile
import unittest
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from mingpt.download import DownloadError
from mingpt.model import GPT
from mingpt.formats import param_names
from mingpt.formats.llmc import LLMC_MAGIC, read_llmc
from mingpt.formats.tf_bundle import crc32c, read_tf_checkpoint
from mingpt.weights import WeightsError, detect_format, load_pretrained, save_hf, save_llmc
from tests.common import RangeRequestHandler, free_port_url, local_http_server, patched_env

TF_FIXTURE = Path(__file__).resolve().parent / 'fixtures' / 'tf_gpt2_tiny'

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TINY = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100)


def make_hf(seed=0, **overrides):
    """ a small random GPT2LMHeadModel; no <|endoftext|> in a 100-token vocabulary """
    torch.manual_seed(seed)
    config = GPT2Config(**{**TINY, 'bos_token_id': 0, 'eos_token_id': None, **overrides})
    hf = GPT2LMHeadModel(config).eval()
    # random LayerNorm gains and biases too, so that a swapped weight/bias cannot go unnoticed
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if n.endswith('ln_1.weight') or n.endswith('ln_2.weight') else 0.0, 0.1)
    return hf


def save_hf_bin(hf, directory):
    """ HF's pytorch_model.bin layout, as transformers 4 wrote it (5 writes safetensors only) """
    directory = Path(directory)
    hf.config.save_pretrained(directory)
    tied = hf.config.tie_word_embeddings
    torch.save({k: v for k, v in hf.state_dict().items() if not (tied and k == 'lm_head.weight')},
               directory / 'pytorch_model.bin')


def hf_name_and_grad(hf, name):
    """ HF's parameter for one of our names, as (tensor in our layout, its grad in our layout) """
    p = dict(hf.named_parameters())[name]
    conv1d = {n for n, _, c in param_names(hf.config.n_layer) if c}
    if name in conv1d:
        return p.t(), p.grad.t()
    return p, p.grad


class TempDirTestCase(unittest.TestCase):

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = Path(self._tmp.name)
        self.addCleanup(self._tmp.cleanup)


class TestHFDirectory(TempDirTestCase):
    """ a transformers GPT2LMHeadModel saved with save_pretrained, both ways, loads exactly """

    @classmethod
    def setUpClass(cls):
        cls._cls_tmp = tempfile.TemporaryDirectory()
        root = Path(cls._cls_tmp.name)
        cls.hf = make_hf(seed=0)
        cls.hf.save_pretrained(root / 'safetensors')
        save_hf_bin(cls.hf, root / 'bin')
        cls.untied = make_hf(seed=1, tie_word_embeddings=False)
        cls.untied.save_pretrained(root / 'untied')
        cls.root = root
        torch.manual_seed(123)
        cls.idx = torch.randint(0, TINY['vocab_size'], (3, 12))
        cls.targets = torch.randint(0, TINY['vocab_size'], (3, 12))

    @classmethod
    def tearDownClass(cls):
        cls._cls_tmp.cleanup()

    def test_both_serializations_were_written(self):
        self.assertTrue((self.root / 'safetensors' / 'model.safetensors').is_file())
        self.assertTrue((self.root / 'bin' / 'pytorch_model.bin').is_file())
        self.assertFalse((self.root / 'bin' / 'model.safetensors').exists())

    def test_logits_match_transformers(self):
        expected = self.hf(self.idx).logits
        for sub in ('safetensors', 'bin'):
            with self.subTest(sub):
                model = GPT.from_pretrained(self.root / sub).eval()
                logits, _ = model(self.idx)
                torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)

    def test_sizes_dropout_and_tying_come_from_config(self):
        model = GPT.from_pretrained(str(self.root / 'safetensors'))
        C = model.config
        self.assertEqual((C.n_layer, C.n_head, C.n_embd, C.block_size, C.vocab_size), (2, 2, 32, 64, 100))
        self.assertEqual((C.embd_pdrop, C.resid_pdrop, C.attn_pdrop), (0.1, 0.1, 0.1))
        self.assertTrue(C.tie_weights)
        self.assertIs(model.lm_head.weight, model.transformer.wte.weight)
        self.assertTrue(model.training)  # like any new nn.Module; minGPT code calls .eval() itself
        self.assertEqual(model.lm_head.weight.dtype, torch.float32)

    def test_dropout_from_config_json_and_overrides(self):
        hf = make_hf(seed=2, resid_pdrop=0.05, embd_pdrop=0.0, attn_pdrop=0.2)
        hf.save_pretrained(self.tmp)
        C = GPT.from_pretrained(self.tmp).config
        self.assertEqual((C.embd_pdrop, C.resid_pdrop, C.attn_pdrop), (0.0, 0.05, 0.2))
        C = GPT.from_pretrained(self.tmp, resid_pdrop=0.3, attn_pdrop=0.0).config
        self.assertEqual((C.embd_pdrop, C.resid_pdrop, C.attn_pdrop), (0.0, 0.3, 0.0))
        with self.assertRaisesRegex(TypeError, 'n_layer'):
            GPT.from_pretrained(self.tmp, n_layer=3)

    def test_untied_checkpoint_keeps_its_own_head(self):
        model = GPT.from_pretrained(self.root / 'untied').eval()
        self.assertFalse(model.config.tie_weights)
        self.assertIsNot(model.lm_head.weight, model.transformer.wte.weight)
        torch.testing.assert_close(model.lm_head.weight, self.untied.lm_head.weight, atol=0, rtol=0)
        torch.testing.assert_close(model(self.idx)[0], self.untied(self.idx).logits, atol=1e-5, rtol=0)

    def test_untie_on_request(self):
        model = GPT.from_pretrained(self.root / 'safetensors', tie_weights=False)
        self.assertIsNot(model.lm_head.weight, model.transformer.wte.weight)
        self.assertTrue(torch.equal(model.lm_head.weight, model.transformer.wte.weight))

    def test_greedy_continuations_identical(self):
        model = GPT.from_pretrained(self.root / 'safetensors').eval()
        ours = model.generate(self.idx, 20, do_sample=False)
        theirs = self.hf.generate(self.idx, attention_mask=torch.ones_like(self.idx), max_new_tokens=20,
                                  do_sample=False, pad_token_id=0)
        self.assertEqual(ours.shape, (3, 32))
        self.assertTrue(torch.equal(ours, theirs))

    def test_gradients_match_for_every_parameter(self):
        for sub, hf in (('safetensors', self.hf), ('untied', self.untied)):
            with self.subTest(sub):
                model = GPT.from_pretrained(self.root / sub).eval()
                hf.zero_grad()
                _, loss = model(self.idx, self.targets)
                loss.backward()
                hf_loss = hf(self.idx, labels=None).logits
                hf_loss = torch.nn.functional.cross_entropy(hf_loss.flatten(0, 1), self.targets.flatten())
                hf_loss.backward()
                torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=0)
                named = dict(model.named_parameters())
                self.assertEqual(len(named), len(dict(hf.named_parameters())))
                for name, p in named.items():
                    _, hf_grad = hf_name_and_grad(hf, name)
                    torch.testing.assert_close(p.grad, hf_grad, atol=1e-5, rtol=0, msg=name)
                hf.zero_grad()

    def test_adamw_steps_give_the_same_losses(self):
        hf = make_hf(seed=0)  # a private copy: the class's model stays untouched
        hf.train()
        model = GPT.from_pretrained(self.root / 'safetensors', embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
        for m in hf.modules():  # no dropout on either side, so both are deterministic in train mode
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        hf.config.attn_pdrop = 0.0
        names = [n for n, _ in model.named_parameters()]
        hf_params = dict(hf.named_parameters())
        opt = torch.optim.AdamW([p for _, p in model.named_parameters()], lr=1e-2, weight_decay=0.0)
        hf_opt = torch.optim.AdamW([hf_params[n] for n in names], lr=1e-2, weight_decay=0.0)
        losses, hf_losses = [], []
        for _ in range(10):
            _, loss = model(self.idx, self.targets)
            logits = hf(self.idx).logits
            hf_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), self.targets.flatten())
            for o, l in ((opt, loss), (hf_opt, hf_loss)):
                o.zero_grad()
                l.backward()
                o.step()
            losses.append(loss.item())
            hf_losses.append(hf_loss.item())
        self.assertLess(losses[-1], losses[0] - 0.5)  # it did train
        for a, b in zip(losses, hf_losses):
            self.assertAlmostEqual(a, b, delta=1e-5)
        self.assertIs(model.lm_head.weight, model.transformer.wte.weight)  # still tied after training

    def test_legacy_gpt2model_keys_with_mask_buffers(self):
        # the hub's gpt2 model.safetensors: GPT2Model names (no 'transformer.' prefix), no lm_head,
        # and the old (1, 1, n_ctx, n_ctx) causal mask buffers saved as if they were weights
        sd = {k.removeprefix('transformer.'): v.clone() for k, v in self.hf.state_dict().items()
              if k != 'lm_head.weight'}
        for i in range(TINY['n_layer']):
            sd[f'h.{i}.attn.bias'] = torch.tril(torch.ones(1, 1, 64, 64))
            sd[f'h.{i}.attn.masked_bias'] = torch.tensor(-1e4)
        save_file(sd, self.tmp / 'model.safetensors', metadata={'format': 'pt'})
        (self.tmp / 'config.json').write_text((self.root / 'safetensors' / 'config.json').read_text())
        model = GPT.from_pretrained(self.tmp).eval()
        torch.testing.assert_close(model(self.idx)[0], self.hf(self.idx).logits, atol=1e-5, rtol=0)

    def test_sharded_safetensors(self):
        self.hf.save_pretrained(self.tmp, max_shard_size='20KB')
        self.assertTrue((self.tmp / 'model.safetensors.index.json').is_file())
        self.assertGreater(len(list(self.tmp.glob('model-*.safetensors'))), 1)
        model = GPT.from_pretrained(self.tmp).eval()
        torch.testing.assert_close(model(self.idx)[0], self.hf(self.idx).logits, atol=1e-5, rtol=0)

    def test_path_to_the_weights_file_itself(self):
        model = GPT.from_pretrained(self.root / 'safetensors' / 'model.safetensors').eval()
        torch.testing.assert_close(model(self.idx)[0], self.hf(self.idx).logits, atol=1e-5, rtol=0)

    def test_dtype(self):
        model = load_pretrained(self.root / 'safetensors', dtype=torch.bfloat16)
        self.assertEqual(model.transformer.h[0].attn.c_attn.weight.dtype, torch.bfloat16)
        make_hf(seed=0).to(torch.float16).save_pretrained(self.tmp)
        self.assertEqual(load_pretrained(self.tmp, dtype=None).lm_head.weight.dtype, torch.float16)
        self.assertEqual(load_pretrained(self.tmp).lm_head.weight.dtype, torch.float32)


class TestSaveHF(TempDirTestCase):
    """ save_pretrained writes what transformers loads, and what we load back """

    def setUp(self):
        super().setUp()
        torch.manual_seed(7)
        self.idx = torch.randint(0, 50, (2, 9))

    def test_hf_to_mingpt_to_hf(self):
        hf = make_hf(seed=3)
        hf.save_pretrained(self.tmp / 'a')
        GPT.from_pretrained(self.tmp / 'a').save_pretrained(self.tmp / 'b')
        config = json.loads((self.tmp / 'b' / 'config.json').read_text())
        self.assertEqual((config['model_type'], config['architectures']), ('gpt2', ['GPT2LMHeadModel']))
        self.assertTrue(config['tie_word_embeddings'])
        self.assertNotIn('lm_head.weight', load_file(self.tmp / 'b' / 'model.safetensors'))
        hf2 = GPT2LMHeadModel.from_pretrained(self.tmp / 'b').eval()
        self.assertTrue(torch.equal(hf2(self.idx).logits, hf(self.idx).logits))
        a, b = hf.state_dict(), hf2.state_dict()
        self.assertEqual(sorted(a), sorted(b))
        for k in a:
            self.assertTrue(torch.equal(a[k], b[k]), k)

    def test_fresh_mingpt_model_loads_in_transformers(self):
        # a model built the minGPT way: untied head, a preset, its own dropout
        config = GPT.get_default_config()
        config.model_type = 'gpt-nano'
        config.vocab_size, config.block_size, config.resid_pdrop = 50, 24, 0.05
        torch.manual_seed(0)
        model = GPT(config).eval()
        for safe in (True, False):
            with self.subTest(safe_serialization=safe):
                d = model.save_pretrained(self.tmp / str(safe), safe_serialization=safe)
                self.assertTrue((d / ('model.safetensors' if safe else 'pytorch_model.bin')).is_file())
                hf = GPT2LMHeadModel.from_pretrained(d).eval()
                self.assertFalse(hf.config.tie_word_embeddings)
                self.assertEqual((hf.config.n_layer, hf.config.n_embd, hf.config.resid_pdrop), (3, 48, 0.05))
                torch.testing.assert_close(hf(self.idx).logits, model(self.idx)[0], atol=1e-5, rtol=0)

    def test_mingpt_checkpoint_round_trip(self):
        # mingpt's own checkpoints are these HF directories: everything comes back exactly
        config = GPT.get_default_config()
        config.model_type = 'gpt-nano'
        config.vocab_size, config.block_size, config.attn_pdrop = 50, 24, 0.0
        model = GPT(config)
        model.save_pretrained(self.tmp)
        loaded = GPT.from_pretrained(self.tmp)
        a, b = model.state_dict(), loaded.state_dict()
        self.assertEqual(list(a), list(b))
        for k in a:
            self.assertTrue(torch.equal(a[k], b[k]), k)
        for k in ('n_layer', 'n_head', 'n_embd', 'vocab_size', 'block_size', 'tie_weights',
                  'embd_pdrop', 'resid_pdrop', 'attn_pdrop'):
            self.assertEqual(getattr(loaded.config, k), getattr(config, k), k)

    def test_saving_again_replaces_the_other_serialization(self):
        model = GPT.from_pretrained(self._hf_dir())
        model.save_pretrained(self.tmp / 'x', safe_serialization=False)
        model.save_pretrained(self.tmp / 'x')
        self.assertEqual(sorted(p.name for p in (self.tmp / 'x').iterdir()), ['config.json', 'model.safetensors'])

    def test_mingpt_config_json_and_raw_state_dict(self):
        # a directory written by hand from a mingpt run: the GPT config dumped with to_dict() (a
        # preset name, sizes filled in by the model) and the raw state_dict in nn.Linear layout
        config = GPT.get_default_config()
        config.model_type = 'gpt-nano'
        config.vocab_size, config.block_size = 50, 24
        model = GPT(config).eval()
        (self.tmp / 'config.json').write_text(json.dumps(model.config.to_dict()))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, self.tmp / 'model.safetensors')
        loaded = GPT.from_pretrained(self.tmp).eval()
        self.assertTrue(torch.equal(loaded(self.idx)[0], model(self.idx)[0]))
        # and a whole run config (setup_logging's config.json) with the model part inside it
        (self.tmp / 'config.json').write_text(json.dumps({'system': {'seed': 3}, 'model': model.config.to_dict()}))
        loaded = GPT.from_pretrained(self.tmp).eval()
        self.assertTrue(torch.equal(loaded(self.idx)[0], model(self.idx)[0]))

    def test_trainer_checkpoint_loads(self):
        # the Trainer's work_dir/ckpt: its config.json holds the model config under 'model', its
        # model.safetensors the raw state dict (tied head stored once)
        from mingpt.trainer import Trainer

        class Data(torch.utils.data.Dataset):
            def __len__(self):
                return 16

            def __getitem__(self, i):
                x = torch.arange(i, i + 9) % 50
                return x[:-1], x[1:]

        for tie in (False, True):
            with self.subTest(tie_weights=tie):
                config = GPT.get_default_config()
                config.model_type, config.vocab_size, config.block_size, config.tie_weights = 'gpt-nano', 50, 8, tie
                model = GPT(config)
                tc = Trainer.get_default_config()
                tc.max_iters, tc.batch_size, tc.num_workers, tc.device = 2, 4, 0, 'cpu'
                tc.work_dir, tc.log_interval = str(self.tmp / f'run{tie}'), None
                Trainer(tc, model, Data()).run()
                loaded = GPT.from_pretrained(self.tmp / f'run{tie}' / 'ckpt')
                self.assertEqual(loaded.lm_head.weight is loaded.transformer.wte.weight, tie)
                a, b = model.state_dict(), loaded.state_dict()
                self.assertEqual(list(a), list(b))
                for k in a:
                    self.assertTrue(torch.equal(a[k], b[k]), k)

    def _hf_dir(self):
        make_hf(seed=4).save_pretrained(self.tmp / 'hf')
        return self.tmp / 'hf'


class TestBadInput(TempDirTestCase):
    """ every way a checkpoint can be wrong is a WeightsError naming the file and the problem """

    def setUp(self):
        super().setUp()
        make_hf(seed=5).save_pretrained(self.tmp / 'ok')
        self.ok = self.tmp / 'ok'

    def copy_ok(self, name='bad'):
        d = self.tmp / name
        d.mkdir()
        for f in self.ok.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        return d

    def edit_config(self, d, **changes):
        config = json.loads((d / 'config.json').read_text())
        config.update(changes)
        (d / 'config.json').write_text(json.dumps(config))

    def test_weights_error_is_a_value_error(self):
        self.assertTrue(issubclass(WeightsError, ValueError))

    def test_missing_path(self):
        with self.assertRaisesRegex(WeightsError, 'no_such_dir'):
            GPT.from_pretrained(self.tmp / 'no_such_dir')

    def test_unknown_name(self):
        with self.assertRaisesRegex(WeightsError, "gpt5.*gpt2-medium"):
            GPT.from_pretrained('gpt5')

    def test_directory_without_config(self):
        (self.tmp / 'empty').mkdir()
        with self.assertRaisesRegex(WeightsError, 'config.json'):
            GPT.from_pretrained(self.tmp / 'empty')

    def test_config_without_weights(self):
        d = self.copy_ok()
        (d / 'model.safetensors').unlink()
        with self.assertRaisesRegex(WeightsError, 'no weights.*model.safetensors.*pytorch_model.bin'):
            GPT.from_pretrained(d)

    def test_truncated_safetensors(self):
        d = self.copy_ok()
        data = (d / 'model.safetensors').read_bytes()
        (d / 'model.safetensors').write_bytes(data[:len(data) // 2])
        with self.assertRaisesRegex(WeightsError, r'model\.safetensors.*(corrupt|truncated)'):
            GPT.from_pretrained(d)

    def test_garbage_safetensors_header(self):
        d = self.copy_ok()
        (d / 'model.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{not json at all')
        with self.assertRaisesRegex(WeightsError, r'model\.safetensors'):
            GPT.from_pretrained(d)

    def test_corrupt_config_json(self):
        d = self.copy_ok()
        (d / 'config.json').write_text('{"n_layer": 2,')
        with self.assertRaisesRegex(WeightsError, r'config\.json.*JSON'):
            GPT.from_pretrained(d)

    def test_shape_mismatch(self):
        d = self.copy_ok()
        self.edit_config(d, n_embd=48)
        with self.assertRaisesRegex(WeightsError, r'bad.*wrong shape.*transformer\.wte\.weight'):
            GPT.from_pretrained(d)

    def test_vocab_mismatch(self):
        d = self.copy_ok()
        self.edit_config(d, vocab_size=101)
        with self.assertRaisesRegex(WeightsError, r'vocab_size=101.*wte\.weight is \(100, 32\), expected \(101, 32\)'):
            GPT.from_pretrained(d)

    def test_layer_count_mismatch(self):
        d = self.copy_ok()
        self.edit_config(d, n_layer=3)
        with self.assertRaisesRegex(WeightsError, r'missing transformer\.h\.2\.'):
            GPT.from_pretrained(d)
        self.edit_config(d, n_layer=1)
        with self.assertRaisesRegex(WeightsError, r'unexpected transformer\.h\.1\.'):
            GPT.from_pretrained(d)

    def test_untied_config_but_no_head(self):
        d = self.copy_ok()
        self.edit_config(d, tie_word_embeddings=False)
        with self.assertRaisesRegex(WeightsError, r'missing lm_head\.weight'):
            GPT.from_pretrained(d)

    def test_not_gpt2(self):
        d = self.copy_ok()
        self.edit_config(d, model_type='llama')
        with self.assertRaisesRegex(WeightsError, "llama"):
            GPT.from_pretrained(d)

    def test_unsupported_gpt2_variant(self):
        d = self.copy_ok()
        self.edit_config(d, activation_function='relu', n_inner=64)
        with self.assertRaisesRegex(WeightsError, "activation_function='relu'.*|n_inner=64"):
            GPT.from_pretrained(d)

    def test_invalid_sizes(self):
        d = self.copy_ok()
        self.edit_config(d, n_head=3)
        with self.assertRaisesRegex(WeightsError, "divisible"):
            GPT.from_pretrained(d)
        self.edit_config(d, n_head=2, n_layer='2')
        with self.assertRaisesRegex(WeightsError, r"positive integers, got n_layer='2'"):
            GPT.from_pretrained(d)

    def test_pickle_with_code_is_refused_and_not_run(self):
        marker = self.tmp / 'pwned'

        class Evil:
            def __reduce__(self):
                return (os.mkdir, (str(marker),))

        d = self.copy_ok()
        (d / 'model.safetensors').unlink()
        with open(d / 'pytorch_model.bin', 'wb') as f:
            pickle.dump({'transformer.wte.weight': Evil()}, f, protocol=2)
        with self.assertRaisesRegex(WeightsError, r'pytorch_model\.bin.*refusing'):
            GPT.from_pretrained(d)
        self.assertFalse(marker.exists())

    def test_truncated_torch_bin(self):
        d = self.copy_ok()
        (d / 'model.safetensors').unlink()
        save_hf_bin(make_hf(seed=5), self.tmp / 'b')
        data = (self.tmp / 'b' / 'pytorch_model.bin').read_bytes()
        (d / 'pytorch_model.bin').write_bytes(data[:len(data) // 3])
        with self.assertRaisesRegex(WeightsError, r'pytorch_model\.bin.*(corrupt|truncated)'):
            GPT.from_pretrained(d)

    def test_missing_shard(self):
        make_hf(seed=5).save_pretrained(self.tmp / 's', max_shard_size='20KB')
        shards = sorted((self.tmp / 's').glob('model-*.safetensors'))
        shards[-1].unlink()
        with self.assertRaisesRegex(WeightsError, shards[-1].name):
            GPT.from_pretrained(self.tmp / 's')


# -----------------------------------------------------------------------------
# the hub, served from 127.0.0.1

class HubHandler(RangeRequestHandler):
    """ serves files like huggingface.co/<name>/resolve/main/..., announcing LFS sha256s as HF does """
    sha256 = {}  # URL path -> the sha256 to announce in X-Linked-Etag

    def end_headers(self):
        if self.path in self.sha256:
            self.send_header('X-Linked-Etag', f'"{self.sha256[self.path]}"')
        super().end_headers()


class TestHub(TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.hf = make_hf(seed=6)
        self.site = self.tmp / 'site'
        self.hf.save_pretrained(self.site / 'gpt2' / 'resolve' / 'main')
        self.weights = self.site / 'gpt2' / 'resolve' / 'main' / 'model.safetensors'
        self.cache = self.tmp / 'cache'
        self.idx = torch.randint(0, TINY['vocab_size'], (2, 7))

    def handler(self, sha256):
        return type('Handler', (HubHandler,), {'sha256': {'/gpt2/resolve/main/model.safetensors': sha256}})

    def test_download_checks_sha256_then_loads_from_cache_offline(self):
        sha = hashlib.sha256(self.weights.read_bytes()).hexdigest()
        log = []
        with local_http_server(self.site, self.handler(sha), log) as url, \
                patched_env(MINGPT_HF_BASE_URL=url, MINGPT_CACHE=self.cache):
            model = GPT.from_pretrained('gpt2').eval()
        torch.testing.assert_close(model(self.idx)[0], self.hf(self.idx).logits, atol=1e-5, rtol=0)
        self.assertEqual(sorted(p.name for p in (self.cache / 'hub' / 'gpt2').iterdir()
                                if not p.name.endswith('.lock')), ['config.json', 'model.safetensors'])
        requested = {(method, path) for method, path, _ in log}
        self.assertIn(('HEAD', '/gpt2/resolve/main/model.safetensors'), requested)
        self.assertIn(('GET', '/gpt2/resolve/main/model.safetensors'), requested)
        self.assertIn(('GET', '/gpt2/resolve/main/config.json'), requested)
        # the server is gone: the second load comes from the cache without any request
        with patched_env(MINGPT_HF_BASE_URL=free_port_url(), MINGPT_CACHE=self.cache):
            again = GPT.from_pretrained('gpt2').eval()
        self.assertTrue(torch.equal(again(self.idx)[0], model(self.idx)[0]))

    def test_sha256_mismatch_is_an_error_and_caches_nothing(self):
        with local_http_server(self.site, self.handler('0' * 64)) as url, \
                patched_env(MINGPT_HF_BASE_URL=url, MINGPT_CACHE=self.cache):
            with self.assertRaisesRegex(DownloadError, 'sha256'):
                GPT.from_pretrained('gpt2')
        self.assertFalse((self.cache / 'hub' / 'gpt2' / 'model.safetensors').exists())

    def test_no_sha256_announced_still_downloads(self):
        with local_http_server(self.site, self.handler(None)) as url, \
                patched_env(MINGPT_HF_BASE_URL=url, MINGPT_CACHE=self.cache):
            model = GPT.from_pretrained('gpt2').eval()
        torch.testing.assert_close(model(self.idx)[0], self.hf(self.idx).logits, atol=1e-5, rtol=0)

    def test_offline_without_cache_says_where_to_put_the_file(self):
        with patched_env(MINGPT_HF_BASE_URL=free_port_url(), MINGPT_CACHE=self.cache):
            with self.assertRaisesRegex(DownloadError, r'gpt2-medium/resolve/main/config\.json'):
                GPT.from_pretrained('gpt2-medium')

    def test_a_local_checkpoint_directory_wins_over_the_hub_name(self):
        self.hf.save_pretrained(self.tmp / 'gpt2')
        cwd = os.getcwd()
        os.chdir(self.tmp)
        try:
            self.assertEqual(detect_format('gpt2'), ('hf', Path('gpt2')))
        finally:
            os.chdir(cwd)
        self.assertEqual(detect_format('gpt2'), ('hub', 'gpt2'))
        self.assertEqual(detect_format('distilgpt2'), ('hub', 'distilgpt2'))

# -----------------------------------------------------------------------------
# llm.c

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
        self.hf = make_hf(seed=8)
        self.hf.save_pretrained(self.tmp / 'hf')
        self.model = GPT.from_pretrained(self.tmp / 'hf').eval()
        self.idx = torch.randint(0, TINY['vocab_size'], (2, 11))

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

    def test_a_file_of_something_else(self):
        (self.tmp / 'notes.bin').write_bytes(b'hello world, not weights')
        with self.assertRaisesRegex(WeightsError, r'notes\.bin.*config\.json.*hparams\.json.*llm\.c.*gpt2-xl'):
            GPT.from_pretrained(self.tmp / 'notes.bin')

# -----------------------------------------------------------------------------
# OpenAI's TensorFlow checkpoint (fixture made by tests/fixtures/make_tf_checkpoint.py with TF 2.21)

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


class TestTensorFlow(TempDirTestCase):

    @classmethod
    def setUpClass(cls):
        cls.expected = load_numpy(TF_FIXTURE / 'expected.safetensors')  # what TensorFlow read back
        cls.hparams = json.loads((TF_FIXTURE / 'hparams.json').read_text())

    def copy_fixture(self):
        d = self.tmp / 'ckpt'
        shutil.copytree(TF_FIXTURE, d)
        return d

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

    def test_hparams_that_do_not_fit(self):
        d = self.copy_fixture()
        for changes, message in (({'n_layer': 3}, r'no variable model/h2/ln_1/g'),
                                 ({'n_vocab': 12}, r'wte\.weight is \(11, 8\), expected \(12, 8\)'),
                                 ({'n_head': None}, r'hparams\.json: missing or not an integer: n_head')):
            with self.subTest(changes):
                (d / 'hparams.json').write_text(json.dumps({**self.hparams, **changes}))
                with self.assertRaisesRegex(WeightsError, message):
                    GPT.from_pretrained(d)

    def test_directory_without_checkpoint(self):
        d = self.copy_fixture()
        (d / 'model.ckpt.index').unlink()
        with self.assertRaisesRegex(WeightsError, 'not a checkpoint mingpt can read.*model.ckpt.index'):
            GPT.from_pretrained(d)


if __name__ == '__main__':
    unittest.main()
