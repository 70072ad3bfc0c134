"""
mingpt.weights: detecting a checkpoint's format, and build_model, the one place where a reader's
(sizes, tensors) become a GPT: sizes and shapes checked before any weight is copied, overrides,
tying, dtype. The formats themselves are tested in tests/test_formats_*.py. All offline, tiny models.
"""

import ast
import os
import shutil
import unittest
from pathlib import Path

import torch

import mingpt.errors
from mingpt.model import GPT
from mingpt.weights import WeightsError, detect_format, load_pretrained
from tests.common import REPO, TempDirTestCase, edit_json, tiny_hf

TF_FIXTURE = Path(__file__).resolve().parent / 'fixtures' / 'tf_gpt2_tiny'


def mingpt_imports():
    """ {module: the mingpt modules it imports}, every import counted, those inside functions too """
    root = REPO / 'mingpt'

    def name(path):
        parts = path.relative_to(REPO).with_suffix('').parts
        return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
    modules = {name(p): p for p in root.rglob('*.py')}
    graph = {}
    for module, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)  # from mingpt.formats import hf
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[module] = {m for m in found if m in modules and m != module}
    return graph


class TestImports(unittest.TestCase):

    def test_the_formats_and_weights_never_import_the_model(self):
        # the model reaches its checkpoint formats through from_pretrained / save_pretrained alone;
        # they get the model class passed in, so not even a function of theirs imports mingpt.model
        graph = mingpt_imports()
        self.assertIn('mingpt.model', graph)
        self.assertIn('mingpt.weights', graph['mingpt.model'])
        readers = ['mingpt.weights'] + [m for m in graph if m.startswith('mingpt.formats')]
        self.assertGreaterEqual(len(readers), 6)
        for module in readers:
            self.assertNotIn('mingpt.model', graph[module], module)
            if module != 'mingpt.weights':
                self.assertNotIn('mingpt.weights', graph[module], module)

    def test_no_import_circle_anywhere_in_the_package(self):
        # counting imports inside functions: a circle there is a circle a reader has to untangle too
        graph = mingpt_imports()
        self.assertGreaterEqual(len(graph), 30)
        for start in graph:  # a path from start back to itself is a circle
            paths = [[start]]
            seen = set()
            while paths:
                path = paths.pop()
                for nxt in graph[path[-1]]:
                    self.assertNotEqual(nxt, start, "import circle: " + ' -> '.join(path + [nxt]))
                    if nxt not in seen:
                        seen.add(nxt)
                        paths.append(path + [nxt])

    def test_weights_error_is_the_one_from_mingpt_errors(self):
        self.assertIs(WeightsError, mingpt.errors.WeightsError)
        self.assertTrue(issubclass(WeightsError, ValueError))


class TestDetectFormat(TempDirTestCase):
    """ anything that is not a checkpoint is a WeightsError saying what was looked for """

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

    def test_a_file_of_something_else(self):
        (self.tmp / 'notes.bin').write_bytes(b'hello world, not weights')
        with self.assertRaisesRegex(WeightsError, r'notes\.bin.*config\.json.*hparams\.json.*llm\.c.*gpt2-xl'):
            GPT.from_pretrained(self.tmp / 'notes.bin')

    def test_tf_directory_without_checkpoint(self):
        d = shutil.copytree(TF_FIXTURE, self.tmp / 'ckpt')
        (d / 'model.ckpt.index').unlink()
        with self.assertRaisesRegex(WeightsError, 'not a checkpoint mingpt can read.*model.ckpt.index'):
            GPT.from_pretrained(d)

    def test_a_local_checkpoint_directory_wins_over_the_hub_name(self):
        tiny_hf(seed=6).save_pretrained(self.tmp / 'gpt2')
        cwd = os.getcwd()
        os.chdir(self.tmp)
        try:
            self.assertEqual(detect_format('gpt2'), ('hf', Path('gpt2')))
        finally:
            os.chdir(cwd)
        self.assertEqual(detect_format('gpt2'), ('hub', 'gpt2'))
        self.assertEqual(detect_format('distilgpt2'), ('hub', 'distilgpt2'))


class TestBuildModel(TempDirTestCase):
    """ sizes and tensors that do not fit together are a WeightsError naming the file and the problem """

    def setUp(self):
        super().setUp()
        self.ok = self.tmp / 'ok'
        tiny_hf(seed=5).save_pretrained(self.ok)

    def copy_ok(self):
        return shutil.copytree(self.ok, self.tmp / 'bad')

    def test_shape_mismatch(self):
        d = self.copy_ok()
        edit_json(d / 'config.json', n_embd=48)
        with self.assertRaisesRegex(WeightsError, r'bad.*wrong shape.*transformer\.wte\.weight'):
            GPT.from_pretrained(d)

    def test_vocab_mismatch(self):
        d = self.copy_ok()
        edit_json(d / 'config.json', vocab_size=101)
        with self.assertRaisesRegex(WeightsError, r'vocab_size=101.*wte\.weight is \(100, 32\), expected \(101, 32\)'):
            GPT.from_pretrained(d)

    def test_layer_count_mismatch(self):
        d = self.copy_ok()
        edit_json(d / 'config.json', n_layer=3)
        with self.assertRaisesRegex(WeightsError, r'missing transformer\.h\.2\.'):
            GPT.from_pretrained(d)
        edit_json(d / 'config.json', n_layer=1)
        with self.assertRaisesRegex(WeightsError, r'unexpected transformer\.h\.1\.'):
            GPT.from_pretrained(d)

    def test_untied_config_but_no_head(self):
        d = self.copy_ok()
        edit_json(d / 'config.json', tie_word_embeddings=False)
        with self.assertRaisesRegex(WeightsError, r'missing lm_head\.weight'):
            GPT.from_pretrained(d)

    def test_invalid_sizes(self):
        d = self.copy_ok()
        edit_json(d / 'config.json', n_head=3)
        with self.assertRaisesRegex(WeightsError, "divisible"):
            GPT.from_pretrained(d)
        edit_json(d / 'config.json', n_head=2, n_layer='2')
        with self.assertRaisesRegex(WeightsError, r"positive integers, got n_layer='2'"):
            GPT.from_pretrained(d)

    def test_untie_on_request(self):
        model = GPT.from_pretrained(self.ok, tie_weights=False)
        self.assertIsNot(model.lm_head.weight, model.transformer.wte.weight)
        self.assertTrue(torch.equal(model.lm_head.weight, model.transformer.wte.weight))

    def test_dtype(self):
        model = load_pretrained(self.ok, GPT, dtype=torch.bfloat16)
        self.assertEqual(model.transformer.h[0].attn.c_attn.weight.dtype, torch.bfloat16)
        tiny_hf(seed=0).to(torch.float16).save_pretrained(self.tmp / 'fp16')
        self.assertEqual(load_pretrained(self.tmp / 'fp16', GPT, dtype=None).lm_head.weight.dtype, torch.float16)
        self.assertEqual(load_pretrained(self.tmp / 'fp16', GPT).lm_head.weight.dtype, torch.float32)

    def test_a_subclass_gets_itself_back(self):
        class MyGPT(GPT):
            pass

        model = MyGPT.from_pretrained(self.ok)
        self.assertIs(type(model), MyGPT)
        self.assertIs(type(load_pretrained(self.ok, GPT)), GPT)


if __name__ == '__main__':
    unittest.main()
