"""
Tests for mingpt/harness.py, mingpt's model in the lm-evaluation-harness: its loglikelihood, rolling
loglikelihood and generation against transformers' GPT2LMHeadModel on the same weights, and lm_eval's own
command line in a subprocess against mingpt.tasks.
"""

import glob
import json
import os
import site
import subprocess
import sys
import unittest

import numpy as np
import torch

from mingpt.tasks import choice_scores, evaluate_multiple_choice, read_hellaswag
from tests.common import REPO, python_without, slow
from tests.test_tasks import EOT, HELLASWAG, ModelTestCase, hellaswag_rows


class TestHarness(ModelTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        from mingpt.harness import MinGPTLM
        cls.lm = MinGPTLM(model=cls.model64, tokenizer=cls.enc, batch_size=5, device='cpu')

    def requests(self, kind, *args):
        from lm_eval.api.instance import Instance
        return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]

    def test_loglikelihood(self):
        rows = hellaswag_rows()[:3]
        pairs = [(r['ctx'], ' ' + e) for r in rows for e in r['endings']] + [('', 'Hello there')]
        got = self.lm.loglikelihood(self.requests('loglikelihood', *pairs), disable_tqdm=True)
        for (context, continuation), (ll, greedy) in zip(pairs, got):
            ctx = self.enc.encode(context) if context else [EOT]  # an empty context starts at <|endoftext|>
            self.assertAlmostEqual(ll, self.reference_loglikelihood(ctx, self.enc.encode(continuation)), delta=1e-9)
            self.assertIsInstance(greedy, bool)

    def test_loglikelihood_rolling(self):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        texts = ['A short text.', ' '.join(r['ctx'] for r in hellaswag_rows()[:8])]  # the second > 64 tokens
        got = self.lm.loglikelihood_rolling(self.requests('loglikelihood_rolling', *[(t,) for t in texts]), True)
        for text, ll in zip(texts, got):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.enc.encode(text), prefix_token=EOT, max_seq_len=64, context_len=1)]
            self.assertEqual(sum(len(c) for _, c in windows), len(self.enc.encode(text)))  # every token once
            self.assertAlmostEqual(ll, sum(self.reference_loglikelihood(c, t) for c, t in windows), delta=1e-9)
        self.assertGreater(len(self.enc.encode(texts[1])), 64)

    @torch.no_grad()
    def test_generate_until_equals_transformers_greedy(self):
        prompts = ['The cat', 'Once upon a time there was a', 'Hello']
        options = {'until': ['\n'], 'max_gen_toks': 12, 'do_sample': False}
        got = self.lm.generate_until(self.requests('generate_until', *[(p, options) for p in prompts]), True)
        for prompt, text in zip(prompts, got):
            ids = torch.tensor([self.enc.encode(prompt)])
            out = self.hf64.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                     pad_token_id=EOT, eos_token_id=EOT)[0, ids.size(1):].tolist()
            want = self.enc.decode(out[:out.index(EOT)] if EOT in out else out).split('\n')[0]
            self.assertEqual(text, want)

    @slow
    def test_without_lm_eval_one_line_says_what_to_install(self):
        proc = subprocess.run([*python_without('lm_eval'), '-m', 'mingpt.harness', '--model', 'mingpt'], cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
        self.assertEqual((proc.returncode, proc.stderr.count('\n')), (2, 1), proc.stderr)
        self.assertTrue(proc.stderr.startswith('error: ') and "pip install -e '.[eval]'" in proc.stderr, proc.stderr)

    def test_lm_eval_finds_the_model_type_by_name(self):
        """ mingpt_lm_eval (what mingpt-lm-eval.pth imports at startup) registers 'mingpt' once lm_eval
        reads its table of models, without importing torch or mingpt before lm_eval asks for the name """
        code = ('import sys, mingpt_lm_eval, lm_eval.models; from lm_eval.api.registry import get_model, model_registry; '
                'assert "mingpt" in model_registry and "hf" in model_registry, "not registered"; '
                'assert "torch" not in sys.modules and "mingpt.harness" not in sys.modules, "imported early"; '
                'print(get_model("mingpt").__module__, get_model("mingpt").__name__)')
        proc = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
        self.assertEqual(proc.stdout.split(), ['mingpt.harness', 'MinGPTLM'])

    def test_pip_install_puts_the_pth_in_site_packages(self):
        if not any(os.path.isdir(os.path.join(d, 'mingpt')) or os.path.exists(os.path.join(d, '__editable__.mingpt-0.1.0.pth'))
                   for d in site.getsitepackages()):
            self.skipTest('mingpt is not pip-installed in this Python (pip install -e .)')
        found = [d for d in site.getsitepackages() if os.path.exists(os.path.join(d, 'mingpt-lm-eval.pth'))]
        self.assertTrue(found, 'pip install -e . should have put mingpt-lm-eval.pth in site-packages')

    def test_the_pth_line_is_silent_when_mingpt_is_gone(self):
        """ a clone moved or deleted after `pip install -e .` leaves the .pth behind: Python must still
        start without a traceback (the line imports mingpt_lm_eval only where it can be found) """
        line = (REPO / 'mingpt-lm-eval.pth').read_text().strip()
        self.assertTrue(line.startswith('import '), 'site.py runs only the .pth lines that start with "import "')
        code = line + '; import sys; print("mingpt_lm_eval" in sys.modules)'
        # -S: no site-packages, so no finder for mingpt_lm_eval; the cwd holds no copy of it either
        gone = subprocess.run([sys.executable, '-S', '-c', code], cwd=self.tmp, capture_output=True, text=True,
                              timeout=60)
        self.assertEqual((gone.returncode, gone.stderr, gone.stdout.strip()), (0, '', 'False'))
        here = subprocess.run([sys.executable, '-S', '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60)
        self.assertEqual((here.returncode, here.stdout.strip()), (0, 'True'), here.stderr)

    @slow
    def test_lm_eval_command_line_equals_the_library(self):
        """ lm_eval's command line, both `lm_eval` itself and `python -m mingpt.harness`, on a local task in
        HellaSwag's format: the accuracy and every ending's log-likelihood equal mingpt.tasks's on the
        same model """
        (self.tmp / 'tasks').mkdir()
        (self.tmp / 'tasks' / 'fixture.yaml').write_text(f"""
task: mingpt_hellaswag_fixture
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {HELLASWAG}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
""")
        env = dict(os.environ, PYTHONPATH=str(REPO), HF_DATASETS_OFFLINE='1', HF_HUB_OFFLINE='1',
                   HF_DATASETS_CACHE=str(self.tmp / 'hf'), HF_HOME=str(self.tmp / 'hf'))
        lm_eval = os.path.join(os.path.dirname(sys.executable), 'lm_eval')
        lm_eval = [lm_eval] if os.path.exists(lm_eval) else [sys.executable, '-m', 'lm_eval']
        examples = read_hellaswag(HELLASWAG, self.enc)
        want_acc = evaluate_multiple_choice(self.model, examples)['acc']
        want_scores = choice_scores(self.model, [[(ex.context, e) for e in ex.endings] for ex in examples])
        for command in (lm_eval, [sys.executable, '-m', 'mingpt.harness']):
            with self.subTest(command=command[-1]):
                out = self.tmp / ('out_' + command[-1])
                proc = subprocess.run([*command, '--model', 'mingpt', '--model_args', f'pretrained={self.model_dir}',
                                       '--tasks', 'mingpt_hellaswag_fixture', '--include_path', str(self.tmp / 'tasks'),
                                       '--batch_size', '8', '--device', 'cpu', '--output_path', str(out),
                                       '--log_samples'], cwd=self.tmp, env=env, capture_output=True, text=True,
                                      timeout=600)
                self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
                with open(glob.glob(str(out / '*' / 'results_*.json'))[0]) as f:
                    results = json.load(f)['results']['mingpt_hellaswag_fixture']
                self.assertEqual(results['acc,none'], want_acc)
                with open(glob.glob(str(out / '*' / 'samples_*.jsonl'))[0]) as f:
                    samples = sorted((json.loads(line) for line in f), key=lambda s: s['doc_id'])
                self.assertEqual(len(samples), 24)
                for sample, s in zip(samples, want_scores):
                    np.testing.assert_allclose([float(r[0][0]) for r in sample['resps']], [ll for ll, _ in s],
                                               atol=1e-4)

if __name__ == '__main__':
    unittest.main()
