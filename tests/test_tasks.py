"""
Tests for mingpt/tasks.py: multiple choice and CORE-style bundles scored against transformers' GPT2LMHeadModel
on the same exported weights, HellaSwag's download against a local HTTP server, the command line, and the
training callback (also in projects/gpt2).
"""

import copy
import io
import json
import random
import shutil
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import torch

from mingpt.bpe import get_encoder
from mingpt.errors import ConfigError, DataError, DownloadError, MissingFileError
from mingpt.metrics import history_of, plot_metrics
from mingpt.tasks import (choice_scores, core_prompts, eval_callback, evaluate_core, evaluate_multiple_choice,
                          evaluate_task, load_task, main, read_bundle, read_hellaswag, read_llmc_eval)
from tests import test_projects as projects
from tests.common import (FIXTURES, TempDirTestCase, free_port_url, local_http_server, patched_env, slow,
                          tiktoken_gpt2, tiny_gpt)

HELLASWAG = FIXTURES / 'hellaswag_tiny.jsonl'  # 24 examples in HellaSwag's format
BUNDLE = FIXTURES / 'core_bundle'  # 3 tasks: multiple choice (1-shot), schema, language modelling (2-shot)
EOT = 50256


def hellaswag_rows():
    with open(HELLASWAG) as f:
        return [json.loads(line) for line in f]


class ModelTestCase(TempDirTestCase):
    """ a random GPT-2-shaped model (GPT-2's vocabulary, a small body), saved, and transformers' model of the
    exported weights; float64 copies of both for comparisons that float32 rounding would blur """

    @classmethod
    def setUpClass(cls):
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        cls.enc = get_encoder()
        cls.model = tiny_gpt(vocab_size=50257, block_size=64)
        cls.model_dir = tempfile.mkdtemp()
        cls.addClassCleanup(shutil.rmtree, cls.model_dir)
        cls.model.save_pretrained(cls.model_dir)
        cls.hf = transformers.GPT2LMHeadModel.from_pretrained(cls.model_dir).eval()
        cls.model64, cls.hf64 = copy.deepcopy(cls.model).double(), copy.deepcopy(cls.hf).double()

    @torch.no_grad()
    def reference_loglikelihood(self, context, continuation, hf=None):
        """ transformers' summed log-probability of continuation after context, one unpadded row """
        ids = (context + continuation)[-(hf or self.hf64).config.n_positions - 1:]
        logp = (hf or self.hf64)(torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1)
        n = len(continuation)
        return logp[-n:].gather(1, torch.tensor(continuation)[:, None]).sum().item()


class TestMultipleChoice(ModelTestCase):

    def test_loglikelihoods_equal_transformers(self):
        examples = read_hellaswag(HELLASWAG, self.enc)
        groups = [[(ex.context, e) for e in ex.endings] for ex in examples]
        for model, hf, tol in ((self.model64, self.hf64, 1e-9), (self.model, self.hf, 1e-4)):
            scores = choice_scores(model, groups, batch_size=10)  # 2 examples of 4 endings a forward
            for ex, s in zip(examples, scores):
                for ending, (ll, _) in zip(ex.endings, s):
                    self.assertAlmostEqual(ll, self.reference_loglikelihood(ex.context, ending, hf), delta=tol)

    def test_acc_and_acc_norm_from_the_reference_scores(self):
        examples = read_hellaswag(HELLASWAG, self.enc)
        acc = acc_norm = 0
        for ex in examples:
            lls = [self.reference_loglikelihood(ex.context, e) for e in ex.endings]
            acc += int(np.argmax(lls)) == ex.label
            acc_norm += int(np.argmax([ll / len(e) for ll, e in zip(lls, ex.endings)])) == ex.label
        result = evaluate_multiple_choice(self.model64, examples)
        self.assertEqual((result['acc'], result['acc_norm'], result['examples']), (acc / 24, acc_norm / 24, 24))
        self.assertEqual((result['metric'], result['score']), ('acc_norm', result['acc_norm']))

    def test_batching_changes_no_score(self):
        groups = [[(ex.context, e) for e in ex.endings] for ex in read_hellaswag(HELLASWAG, self.enc)[:6]]
        one, all_ = choice_scores(self.model, groups, batch_size=1), choice_scores(self.model, groups, batch_size=100)
        np.testing.assert_allclose([ll for s in one for ll, _ in s], [ll for s in all_ for ll, _ in s], atol=1e-4)

    def test_a_long_example_keeps_its_newest_tokens(self):
        import transformers
        small = tiny_gpt(vocab_size=50257, block_size=16, seed=1).double()
        small.save_pretrained(self.tmp)
        hf = transformers.GPT2LMHeadModel.from_pretrained(self.tmp).double().eval()
        ex = read_hellaswag(HELLASWAG, self.enc)[1]
        self.assertGreater(len(ex.context) + len(ex.endings[0]), 17)  # longer than the context: cropped
        [[(ll, _)]] = choice_scores(small, [[(ex.context, ex.endings[0])]])
        self.assertAlmostEqual(ll, self.reference_loglikelihood(ex.context, ex.endings[0], hf), delta=1e-9)

    def test_the_model_keeps_its_mode_and_errors_say_what_to_do(self):
        self.model.train()
        try:
            evaluate_multiple_choice(self.model, read_hellaswag(HELLASWAG, self.enc)[:2])
            self.assertTrue(self.model.training)
        finally:
            self.model.eval()
        with self.assertRaisesRegex(ConfigError, 'no examples'):
            evaluate_multiple_choice(self.model, [])
        with self.assertRaisesRegex(ConfigError, 'at least one token'):
            choice_scores(self.model, [[([], [1, 2])]])
        with self.assertRaisesRegex(ConfigError, 'batch_size=0'):
            choice_scores(self.model, [[([1], [2])]], batch_size=0)


class TestReading(TempDirTestCase):

    def test_hellaswag_jsonl(self):
        enc = get_encoder()
        examples = read_hellaswag(HELLASWAG, enc)
        rows = hellaswag_rows()
        self.assertEqual(len(examples), 24)
        for ex, row in zip(examples, rows):
            self.assertEqual(ex.context, enc.encode(row['ctx']))
            self.assertEqual(ex.endings, [enc.encode(' ' + e) for e in row['endings']])  # with their leading space
            self.assertEqual(ex.label, row['label'])
        self.assertEqual(sorted({ex.label for ex in examples}), [0, 1, 2, 3])

    def test_bad_hellaswag_files(self):
        enc = get_encoder()
        good = json.dumps(hellaswag_rows()[0])
        for bad, message in (('{"ctx": "a", "label": 0}', 'line 2: expected HellaSwag'),
                             ('{"ctx": "a", "endings": ["b"], "label": 3}', 'line 2: expected HellaSwag'),
                             ('{"ctx": "a", ', 'line 2: not JSON')):
            (self.tmp / 'bad.jsonl').write_text(good + '\n' + bad + '\n')
            with self.assertRaisesRegex(DataError, message):
                read_hellaswag(self.tmp / 'bad.jsonl', enc)
        with self.assertRaises(MissingFileError):
            read_hellaswag(self.tmp / 'missing.jsonl', enc)
        with self.assertRaisesRegex(MissingFileError, 'give "hellaswag"'):
            load_task(self.tmp / 'missing.jsonl', enc)

    def write_llmc_eval(self, path, rows):
        """ llm.c's dev/data format of an eval file, with tiktoken's ids (what llm.c tokenizes with) """
        enc = tiktoken_gpt2()
        stream = []
        for i, row in enumerate(rows):
            parts = [enc.encode(row['ctx'])] + [enc.encode(' ' + e) for e in row['endings']]
            example = [2 ** 16 - 1, 0, i, row['label'], len(row['endings'])]
            for p in parts:
                example += [len(p), *p]
            example[1] = 2 * len(example)
            stream += example
        header = np.zeros(256, dtype=np.int32)
        header[:4] = [20240522, 1, len(rows), 0]
        path.write_bytes(header.tobytes() + np.array(stream, dtype=np.uint16).tobytes())

    def test_llmc_eval_file(self):
        path = self.tmp / 'hellaswag_val.bin'
        self.write_llmc_eval(path, hellaswag_rows())
        self.assertEqual(read_llmc_eval(path), read_hellaswag(HELLASWAG, get_encoder()))
        task = load_task(path, None)
        self.assertEqual((task.name, task.kind, len(task.items)), ('hellaswag_val', 'multiple_choice', 24))
        raw = path.read_bytes()
        path.write_bytes(raw[:-10])
        with self.assertRaisesRegex(DataError, 'example 23'):
            read_llmc_eval(path)
        path.write_bytes(b'\0' * 4 + raw[4:])
        with self.assertRaisesRegex(DataError, 'not an llm.c eval file'):
            read_llmc_eval(path)


class TestHellaSwagDownload(ModelTestCase):

    def test_downloaded_once_then_read_from_the_cache(self):
        served, cache = self.tmp / 'served', self.tmp / 'cache'
        served.mkdir()
        shutil.copy(HELLASWAG, served / 'hellaswag_val.jsonl')
        log = []
        with local_http_server(served, requests_log=log) as url, \
                patched_env(MINGPT_HELLASWAG_URL=f'{url}/hellaswag_val.jsonl', MINGPT_CACHE=cache):
            task = load_task('hellaswag', self.enc)
        self.assertEqual((task.name, len(task.items)), ('hellaswag', 24))
        self.assertEqual(task.items, read_hellaswag(HELLASWAG, self.enc))
        self.assertEqual((cache / 'datasets' / 'hellaswag_val.jsonl').read_bytes(), HELLASWAG.read_bytes())
        self.assertEqual(len(log), 1)
        with patched_env(MINGPT_HELLASWAG_URL=free_port_url(), MINGPT_CACHE=cache):  # offline: the cached copy
            self.assertEqual(load_task('hellaswag', self.enc).items, task.items)
        with patched_env(MINGPT_HELLASWAG_URL=free_port_url(), MINGPT_CACHE=self.tmp / 'empty'), \
                self.assertRaises(DownloadError) as cm:
            load_task('hellaswag', self.enc)
        self.assertIn(str(self.tmp / 'empty' / 'datasets' / 'hellaswag_val.jsonl'), str(cm.exception))

    def run_cli(self, *args, **env):
        """ python -m mingpt.tasks --model <the model> *args, in this process: (stdout, stderr, exit status) """
        out, err, status = io.StringIO(), io.StringIO(), 0
        with patched_env(MINGPT_CACHE=self.tmp / 'cache', **env), redirect_stdout(out), redirect_stderr(err):
            try:
                main(['--model', self.model_dir, *args])
            except SystemExit as e:
                status = e.code
        return out.getvalue(), err.getvalue(), status

    def test_command_line(self):
        out, err, status = self.run_cli('--task', str(HELLASWAG), '--limit', '10', '--batch-size', '8')
        self.assertEqual(status, 0, err)
        r = evaluate_task(self.model, load_task(HELLASWAG, self.enc), self.enc, limit=10)
        self.assertIn(f"| {self.model_dir} | hellaswag_tiny | 10 | {r['acc']:.4f} | {r['acc_norm']:.4f} |", out)
        self.assertIn('acc_norm: the highest mean log-likelihood per token', out)
        out, err, status = self.run_cli('--task', str(BUNDLE), '--limit', '4')
        self.assertEqual(status, 0, err)
        r = evaluate_task(self.model, load_task(BUNDLE, self.enc), self.enc, limit=4)
        self.assertIn(f"| CORE (mean centered accuracy) | | | | {r['core']:.4f} |", out)
        self.assertIn(f"| everyday_choice | 4 | {r['tasks']['everyday_choice']['acc']:.4f} | 0.2500 |", out)

    def test_command_line_errors_are_one_line(self):
        for args, env, message in (((), dict(MINGPT_HELLASWAG_URL=free_port_url()), 'error: could not download'),
                                   (('--task', 'nope.jsonl'), {}, "error: no task 'nope.jsonl'"),
                                   (('--task', str(HELLASWAG), '--limit', '0'), {}, 'error: --limit 0')):
            _, err, status = self.run_cli(*args, **env)
            self.assertEqual(status, 2, err)
            errors = [line for line in err.splitlines() if line.startswith('error:')]
            self.assertEqual(len(errors), 1, err)
            self.assertTrue(errors[0].startswith(message), err)


class TestCore(ModelTestCase):

    def test_reads_the_bundle(self):
        tasks = read_bundle(BUNDLE)
        self.assertEqual([(t.label, t.kind, t.num_fewshot, t.delimiter, t.baseline) for t in tasks],
                         [('everyday_choice', 'multiple_choice', 1, '\nAnswer: ', 0.25),
                          ('pronoun_schema', 'schema', 0, ' ', 0.5), ('capitals', 'language_modeling', 2, ' ', 0.0)])
        self.assertTrue(all(t.path.is_file() for t in tasks))
        task = load_task(BUNDLE, self.enc)
        self.assertEqual((task.name, task.kind, task.items), ('core_bundle', 'core', tasks))

    def test_prompts(self):
        shot = {'query': 'Cold?', 'choices': ['Coat.', 'Hat.'], 'gold': 0}
        item = {'query': 'Wet?', 'choices': ['Mop.', 'Map.'], 'gold': 0}
        self.assertEqual(core_prompts('multiple_choice', item, [shot], '\nAnswer: '),
                         ['Cold?\nAnswer: Coat.\n\nWet?\nAnswer: Mop.', 'Cold?\nAnswer: Coat.\n\nWet?\nAnswer: Map.'])
        item = {'context_options': ['A because A', 'A because B'], 'continuation': 'ran.', 'gold': 1}
        self.assertEqual(core_prompts('schema', item, [item], ' '),
                         ['A because B ran.\n\nA because A ran.', 'A because B ran.\n\nA because B ran.'])
        shot = {'context': ' The capital of Peru is ', 'continuation': 'Lima'}
        item = {'context': 'The capital of Canada is ', 'continuation': 'Ottawa'}
        self.assertEqual(core_prompts('language_modeling', item, [shot], ' '),
                         ['The capital of Peru is Lima\n\nThe capital of Canada is',
                          'The capital of Peru is Lima\n\nThe capital of Canada is Ottawa'])

    @torch.no_grad()
    def reference_accuracy(self, task):
        """ nanochat's procedure, one example at a time, unpadded, on transformers' model """
        with open(task.path) as f:
            data = [json.loads(line) for line in f]
        random.Random(1337).shuffle(data)
        correct = 0
        for i, item in enumerate(data):
            others = [j for j in range(len(data)) if j != i]
            shots = [data[j] for j in random.Random(1234 + i).sample(others, task.num_fewshot)]
            prompts = core_prompts(task.kind, item, shots, task.delimiter)
            tokens = [[EOT] + self.enc.encode(p) for p in prompts]
            if task.kind == 'language_modeling':
                without, full = tokens
                self.assertEqual(full[:len(without)], without)
                predicted = self.hf64(torch.tensor([full])).logits[0].argmax(-1)
                correct += predicted[len(without) - 1:-1].tolist() == full[len(without):]
                continue
            if task.kind == 'schema':
                tokens = [t[::-1] for t in tokens]
            same = next(k for k in range(min(map(len, tokens)) + 1)
                        if k == min(map(len, tokens)) or len({t[k] for t in tokens}) > 1)
            if task.kind == 'schema':
                tokens = [t[::-1] for t in tokens]
            losses = []
            for t in tokens:
                start, end = (same, len(t)) if task.kind == 'multiple_choice' else (len(t) - same, len(t))
                logp = self.hf64(torch.tensor([t])).logits[0].log_softmax(-1)
                losses.append(-np.mean([logp[k - 1, t[k]].item() for k in range(start, end)]))
            correct += int(np.argmin(losses)) == item['gold']
        return correct / len(data)

    def test_accuracies_and_core_equal_a_reference_with_transformers(self):
        tasks = read_bundle(BUNDLE)
        result = evaluate_core(self.model64, self.enc, tasks, batch_size=5)
        for task in tasks:
            r = result['tasks'][task.label]
            self.assertEqual(r['acc'], self.reference_accuracy(task), task.label)
            self.assertAlmostEqual(r['centered'], (r['acc'] - task.baseline) / (1 - task.baseline))
        self.assertEqual([r['examples'] for r in result['tasks'].values()], [10, 8, 10])
        self.assertAlmostEqual(result['core'], np.mean([r['centered'] for r in result['tasks'].values()]))
        self.assertEqual(result['score'], result['core'])

    def test_limit_and_bad_bundles(self):
        task = read_bundle(BUNDLE)[2]  # 2-shot
        self.assertEqual(evaluate_core(self.model, self.enc, [task], limit=3)['tasks']['capitals']['examples'], 3)
        with self.assertRaisesRegex(ConfigError, '2 few-shot examples from 2 examples'):
            evaluate_core(self.model, self.enc, [task], limit=2)
        with self.assertRaisesRegex(MissingFileError, 'no core.yaml'):
            read_bundle(self.tmp)
        shutil.copytree(BUNDLE, self.tmp / 'b')
        yaml = self.tmp / 'b' / 'core.yaml'
        yaml.write_text(yaml.read_text().replace('icl_task_type: schema', 'icl_task_type: question_answering'))
        with self.assertRaisesRegex(DataError, "task 'pronoun_schema'.*has 'question_answering'"):
            read_bundle(self.tmp / 'b')


class TestTrainingCallback(ModelTestCase):

    def test_records_the_score_in_metrics_and_the_plot(self):
        from mingpt.trainer import Trainer

        class Windows(torch.utils.data.Dataset):
            ids = torch.randint(0, 50257, (400,), generator=torch.Generator().manual_seed(0))

            def __len__(self):
                return 20

            def __getitem__(self, i):
                return self.ids[i * 17:i * 17 + 16], self.ids[i * 17 + 1:i * 17 + 17]

        model = tiny_gpt(vocab_size=50257, block_size=64)  # HellaSwag's endings fit (windows of 16 to train on)
        C = Trainer.get_default_config()
        C.merge_from_dict(dict(device='cpu', max_iters=6, batch_size=4, eval_interval=2, eval_iters=1,
                               work_dir=str(self.tmp / 'run'), checkpoint_interval=100, log_interval=None))
        trainer = Trainer(C, model, Windows(), val_dataset=Windows())
        task = load_task(HELLASWAG, self.enc)
        trainer.add_callback('on_eval_end', eval_callback(task, self.enc, every=3, limit=6))
        with self.assertRaisesRegex(ConfigError, 'every=0'):
            eval_callback(task, self.enc, every=0)
        trainer.run()
        with open(self.tmp / 'run' / 'metrics.jsonl') as f:
            records = [json.loads(line) for line in f]
        scores = [r for r in records if 'task' in r]
        self.assertEqual([(r['iter'], r['task'], r['metric'], r['examples']) for r in scores],
                         [(6, 'hellaswag_tiny', 'acc_norm', 6)])  # the 3rd of the evaluations at 2, 4, 6
        self.assertEqual(scores[0]['score'], scores[0]['acc_norm'])
        history = history_of(records)
        self.assertEqual((history['task_iter'], history['task_label']), ([6], ['hellaswag_tiny acc_norm']))
        self.assertEqual(plot_metrics(records, self.tmp / 'loss.png'), self.tmp / 'loss.png')
        self.assertGreater((self.tmp / 'loss.png').stat().st_size, 1000)
        # the last evaluation came after the last step: the score is the trained model's, in eval mode
        self.assertTrue(model.training)
        self.assertEqual({k: scores[0][k] for k in ('acc', 'acc_norm')},
                         {k: v for k, v in evaluate_task(model, task, self.enc, limit=6).items() if k in ('acc', 'acc_norm')})

    @slow
    def test_the_gpt2_recipe_evaluates_a_task_when_given_one(self):
        projects.TestGPT2.make_shards(self)  # a 300-token BPE with <|endoftext|>, and shards of it
        work_dir = self.tmp / 'out'
        proc = projects.run_project('gpt2', f'--data.dir={self.shards}', f'--system.work_dir={work_dir}',
                                    '--trainer.max_iters=20', f'--tasks.path={HELLASWAG}', '--tasks.limit=8',
                                    '--tasks.every=2', *projects.TestGPT2.TINY, '--data.block_size=64')
        self.assertEqual(proc.returncode, 0, proc.stderr)
        records, _, _ = projects.read_metrics(work_dir)
        self.assertEqual([(r['iter'], r['examples']) for r in records if 'task' in r], [(20, 8)])
        self.assertIn('iter 20: hellaswag_tiny acc_norm', proc.stderr)


if __name__ == '__main__':
    unittest.main()
