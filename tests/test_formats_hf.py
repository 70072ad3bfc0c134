"""
mingpt.formats.hf: a Hugging Face GPT-2 directory, either serialization, sharded or not, loads into
a GPT that computes what transformers' GPT2LMHeadModel computes (logits, greedy text, gradients, a
few optimizer steps); save_hf writes what transformers loads; hub names download once, checked,
then load from the cache; every bad directory is a clear WeightsError. All offline, tiny models.
"""

import hashlib
import json
import os
import pickle
import shutil
import tempfile
import unittest
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

from mingpt.download import DownloadError
from mingpt.formats import param_names
from mingpt.model import GPT
from mingpt.weights import WeightsError
from tests.common import (TINY_HF, RangeRequestHandler, TempDirTestCase, edit_json, free_port_url,
                          local_http_server, patched_env, tiny_hf)


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


class TestHFDirectory(TempDirTestCase):
    """ a transformers GPT2LMHeadModel saved with save_pretrained, both ways, loads exactly """

    @classmethod
    def setUpClass(cls):
        cls._cls_tmp = tempfile.TemporaryDirectory()
        root = Path(cls._cls_tmp.name)
        cls.hf = tiny_hf(seed=0)
        cls.hf.save_pretrained(root / 'safetensors')
        save_hf_bin(cls.hf, root / 'bin')
        cls.untied = tiny_hf(seed=1, tie_word_embeddings=False)
        cls.untied.save_pretrained(root / 'untied')
        cls.root = root
        torch.manual_seed(123)
        cls.idx = torch.randint(0, TINY_HF['vocab_size'], (3, 12))
        cls.targets = torch.randint(0, TINY_HF['vocab_size'], (3, 12))

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
        hf = tiny_hf(seed=2, resid_pdrop=0.05, embd_pdrop=0.0, attn_pdrop=0.2)
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
        hf = tiny_hf(seed=0)  # a private copy: the class's model stays untouched
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
        for i in range(TINY_HF['n_layer']):
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
class TestSaveHF(TempDirTestCase):
    """ save_pretrained writes what transformers loads, and what we load back """

    def setUp(self):
        super().setUp()
        torch.manual_seed(7)
        self.idx = torch.randint(0, 50, (2, 9))

    def test_hf_to_mingpt_to_hf(self):
        hf = tiny_hf(seed=3)
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
        tiny_hf(seed=4).save_pretrained(self.tmp / 'hf')
        return self.tmp / 'hf'


class TestBadInput(TempDirTestCase):
    """ every way an HF directory can be wrong is a WeightsError naming the file and the problem """

    def setUp(self):
        super().setUp()
        tiny_hf(seed=5).save_pretrained(self.tmp / 'ok')
        self.ok = self.tmp / 'ok'

    def copy_ok(self):
        return shutil.copytree(self.ok, self.tmp / 'bad')

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

    def test_not_gpt2(self):
        d = self.copy_ok()
        edit_json(d / 'config.json', model_type='llama')
        with self.assertRaisesRegex(WeightsError, "llama"):
            GPT.from_pretrained(d)

    def test_unsupported_gpt2_variant(self):
        d = self.copy_ok()
        edit_json(d / 'config.json', activation_function='relu', n_inner=64)
        with self.assertRaisesRegex(WeightsError, "activation_function='relu'.*|n_inner=64"):
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
        save_hf_bin(tiny_hf(seed=5), self.tmp / 'b')
        data = (self.tmp / 'b' / 'pytorch_model.bin').read_bytes()
        (d / 'pytorch_model.bin').write_bytes(data[:len(data) // 3])
        with self.assertRaisesRegex(WeightsError, r'pytorch_model\.bin.*(corrupt|truncated)'):
            GPT.from_pretrained(d)

    def test_missing_shard(self):
        tiny_hf(seed=5).save_pretrained(self.tmp / 's', max_shard_size='20KB')
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
        self.hf = tiny_hf(seed=6)
        self.site = self.tmp / 'site'
        self.hf.save_pretrained(self.site / 'gpt2' / 'resolve' / 'main')
        self.weights = self.site / 'gpt2' / 'resolve' / 'main' / 'model.safetensors'
        self.cache = self.tmp / 'cache'
        self.idx = torch.randint(0, TINY_HF['vocab_size'], (2, 7))

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


if __name__ == '__main__':
    unittest.main()
