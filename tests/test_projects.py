"""
The projects run end to end: each script is run as a user runs it (a subprocess, config overrides
on the command line) for a few steps with tiny settings, and we check what it writes and that the
loss went down. The datasets' own logic is checked in-process, where that is cheaper.
"""

import importlib.util
import math
import json
import os
import re
import subprocess
import sys
import unittest
from pathlib import Path

import numpy as np
import torch

from mingpt.errors import ConfigError
from mingpt.model import GPT
from tests.common import (REPO, TempDirTestCase, free_port_url, python_without, shakespeare,
                          slow)

PROJECTS = REPO / 'projects'


def run_project(name, *args, cwd=None, env=None, timeout=600, without=(), script=None):
    """
    run projects/<name>/<script or name>.py with args; returns the CompletedProcess (text output).
    without: packages the run must do without, as if they were not installed
    """
    env = dict(os.environ if env is None else env)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
    python = python_without(*without) if without else [sys.executable]
    return subprocess.run([*python, str(PROJECTS / name / f'{script or name}.py'), *args], cwd=cwd or REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


# what run_torchrun starts on each rank: the project script, with an audit hook that lists every file
# the rank opens for writing, creates, or renames into place (atomic writes) in writes.<rank>
_AUDITED = '''
import os, runpy, sys
log = open(os.path.join(sys.argv[1], 'writes.' + os.environ['RANK']), 'w')
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT
def written(event, args):
    if event == 'open' and (any(c in args[1] for c in 'wax+') if args[1] else args[2] & WRITE):
        path = args[0]
    elif event in ('os.mkdir', 'os.rename'):  # os.rename: also os.replace, the end of every atomic write
        path = args[1] if event == 'os.rename' else args[0]
    else:
        return
    if not isinstance(path, int):
        log.write(os.path.abspath(os.fsdecode(path)) + '\\n')
        log.flush()
sys.addaudithook(written)
sys.argv = sys.argv[2:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def run_torchrun(name, tmp, *args, cwd=None, script=None):
    """
    projects/<name>/<script or name>.py under `torchrun --nproc_per_node=2` (gloo, CPU); returns the
    CompletedProcess and {rank: the paths under tmp that rank wrote}
    """
    tmp = Path(tmp)
    (tmp / 'audited.py').write_text(_AUDITED)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
    # --standalone: torchrun binds a free local port itself (as in tests/test_trainer_ddp.py)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(tmp / 'audited.py'), str(tmp), str(PROJECTS / name / f'{script or name}.py'), *args],
                          cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=600)
    writes = {}
    for rank in (0, 1):
        log = tmp / f'writes.{rank}'
        paths = log.read_text().splitlines() if log.is_file() else []
        writes[rank] = sorted({p for p in paths if Path(p).is_relative_to(tmp) and not p.startswith(str(log))})
    return proc, writes


def load_project(name):
    """ import projects/<name>/<name>.py as a module (the projects are scripts, not a package) """
    spec = importlib.util.spec_from_file_location(f'project_{name}', PROJECTS / name / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_metrics(work_dir):
    with open(Path(work_dir) / 'metrics.jsonl') as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r['loss'] for r in records if 'loss' in r]
    val = [(r['iter'], r['val_loss']) for r in records if 'val_loss' in r]
    return records, train, val


def mean(xs):
    return sum(xs) / len(xs)


class ProjectTestCase(TempDirTestCase):

    def assertRan(self, proc):
        self.assertEqual(proc.returncode, 0, f"exit code {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                             f"stderr:\n{proc.stderr[-3000:]}")

    def assertWorkDir(self, work_dir, *extra):
        """ what every project leaves in its work dir """
        for name in ('config.json', 'args.txt', 'metrics.jsonl', 'loss.png', 'results.json', *extra):
            self.assertTrue((Path(work_dir) / name).exists(), f"{name} missing from {work_dir}: "
                                                              f"{sorted(os.listdir(work_dir))}")
        self.assertGreater((Path(work_dir) / 'loss.png').stat().st_size, 1000)
        with open(Path(work_dir) / 'config.json') as f:
            self.assertIn('trainer', json.load(f))

    def assertLossWentDown(self, work_dir):
        _, train, val = read_metrics(work_dir)
        self.assertGreaterEqual(len(train), 10)
        k = max(1, len(train) // 5)
        self.assertLess(mean(train[-k:]), mean(train[:k]) - 0.1, f"train loss did not go down: {train}")
        self.assertGreaterEqual(len(val), 2)
        self.assertLess(val[-1][1], val[0][1], f"val loss did not go down: {val}")

# -----------------------------------------------------------------------------

class TestAdder(ProjectTestCase):

    def test_dataset_split_is_disjoint_and_complete(self):
        adder = load_project('adder')
        config = adder.AdditionDataset.get_default_config()
        train, test = adder.AdditionDataset(config, 'train'), adder.AdditionDataset(config, 'test')
        train_ids = set(train.problem_ids(np.arange(len(train))).tolist())
        test_ids = set(test.problem_ids(np.arange(len(test))).tolist())
        self.assertEqual((len(train_ids), len(test_ids)), (8000, 2000))
        self.assertEqual(train_ids & test_ids, set())
        self.assertEqual(train_ids | test_ids, set(range(10000)))
        # 4 digits: 10^8 problems, indexed without a permutation of them all
        config.ndigit = 4
        train, test = adder.AdditionDataset(config, 'train'), adder.AdditionDataset(config, 'test')
        self.assertEqual((len(train), len(test)), (10 ** 8 - 10000, 10000))
        probe = np.random.default_rng(0).integers(0, len(train), size=100000)
        self.assertFalse(np.isin(train.problem_ids(probe), test.test_ids).any())
        self.assertEqual(train.problem_ids([len(train) - 1]).tolist(), [10 ** 8 - 1])
        # consecutive train positions are the consecutive ids with the test ids left out
        ids = train.problem_ids(np.arange(5_000_000, 5_200_000))
        everything = np.arange(ids[0], ids[-1] + 1)
        self.assertGreater(len(everything) - len(ids), 5)  # some test ids fall in this range
        np.testing.assert_array_equal(ids, np.setdiff1d(everything, test.test_ids))

    def test_encoding_reverses_the_sum_and_masks_the_operands(self):
        adder = load_project('adder')
        config = adder.AdditionDataset.get_default_config()
        dataset = adder.AdditionDataset(config, 'train')
        self.assertEqual(dataset.encode([8550]).tolist(), [[8, 5, 5, 0, 5, 3, 1]])  # 85 + 50 = 135
        self.assertEqual(dataset.encode([99 * 100 + 99, 7]).tolist(), [[9, 9, 9, 9, 8, 9, 1], [0, 0, 0, 7, 7, 0, 0]])
        self.assertEqual(dataset.get_block_size(), 6)
        i = int(np.nonzero(dataset.problem_ids(np.arange(len(dataset))) == 8550)[0][0])
        x, y = dataset[i]
        self.assertEqual(x.tolist(), [8, 5, 5, 0, 5, 3])
        self.assertEqual(y.tolist(), [-1, -1, -1, 5, 3, 1])
        # a batch fetched through __getitems__ (as the DataLoader does) is the same examples
        xs, ys = zip(*dataset.__getitems__([i, 0]))
        self.assertEqual((xs[0].tolist(), ys[0].tolist()), (x.tolist(), y.tolist()))
        self.assertEqual(dataset.encode(dataset.problem_ids([0]))[0, :-1].tolist(), xs[1].tolist())

    @slow
    def test_learns_to_add_saves_the_best_model_and_stops_by_itself(self):
        from mingpt.model import GPT
        work_dir = self.tmp / 'adder'
        # the default command, stopped early: at the first evaluation with 30% of the test split right
        proc = run_project('adder', f'--system.work_dir={work_dir}', '--trainer.device=cpu',
                           '--trainer.eval_interval=50', '--eval.stop_at=0.3')
        self.assertRan(proc)
        self.assertWorkDir(work_dir, 'best/config.json', 'best/model.safetensors')
        self.assertLossWentDown(work_dir)
        with open(work_dir / 'results.json') as f:
            results = json.load(f)
        self.assertGreaterEqual(results['best_test_acc'], 0.3)
        self.assertLess(results['iters'], 700)  # it stopped by itself, at an evaluation, before max_iters
        self.assertEqual(results['iters'] % 50, 0)
        self.assertEqual(results['iter'], results['iters'])
        self.assertIn('best test accuracy', proc.stdout)
        self.assertRegex(proc.stderr, r'exact match train [\d.]+%, test [\d.]+%')
        self.assertRegex(proc.stderr, r'test: GPT claims that \d+ \+ \d+ = \d+ but it is \d+')
        # the best model is an HF directory that adds as well as the run said, on its test split
        adder = load_project('adder')
        model = GPT.from_pretrained(work_dir / 'best')
        test = adder.AdditionDataset(adder.AdditionDataset.get_default_config(), 'test')
        self.assertAlmostEqual(adder.exact_match(model, test), results['best_test_acc'])

    @slow
    def test_under_torchrun_rank_0_reports_and_writes(self):
        work_dir = self.tmp / 'adder'
        proc, writes = run_torchrun('adder', self.tmp, f'--system.work_dir={work_dir}', '--trainer.device=cpu',
                                    '--trainer.max_iters=20', '--trainer.eval_interval=10',
                                    '--eval.train_problems=100', '--eval.show_mistakes=1')
        self.assertRan(proc)
        self.assertEqual(proc.stderr.count('adder: config:'), 1)
        self.assertEqual(proc.stderr.count('held-out test problems'), 1)
        self.assertEqual(len(re.findall(r'iter \d+: exact match', proc.stderr)), 2)  # iterations 10 and 20
        self.assertEqual(proc.stderr.count('test: GPT claims'), 2)
        self.assertEqual(proc.stdout.count('best test accuracy'), 1)
        for name in ('results.json', 'config.json', 'metrics.jsonl', 'best/model.safetensors'):
            self.assertIn(str(work_dir / name), writes[0])
        self.assertEqual(writes[1], [])

# -----------------------------------------------------------------------------

class TestCharGPT(ProjectTestCase):

    TINY = ['--trainer.device=cpu', '--system.num_threads=1', '--model.n_layer=1', '--model.n_head=2',
            '--model.n_embd=32', '--data.block_size=32', '--trainer.batch_size=16', '--trainer.warmup_iters=5',
            '--trainer.eval_interval=20', '--trainer.checkpoint_interval=20', '--trainer.eval_iters=4',
            '--sample.max_new_tokens=30', '--sample.prompt=ROMEO:']

    def setUp(self):
        super().setUp()
        # 50,000 characters of Shakespeare, as ./input.txt of the run's working directory
        (self.tmp / 'input.txt').write_text(shakespeare(50000), encoding='utf-8')

    @slow
    def test_trains_on_input_txt_samples_checkpoints_and_resumes(self):
        work_dir = self.tmp / 'out'
        proc = run_project('chargpt', f'--system.work_dir={work_dir}', '--trainer.max_iters=60',
                           *self.TINY, cwd=self.tmp)
        self.assertRan(proc)
        self.assertIn('training on input.txt', proc.stderr)
        self.assertWorkDir(work_dir, 'ckpt/model.safetensors', 'ckpt_best/model.safetensors', 'chars.json')
        self.assertLossWentDown(work_dir)
        self.assertIn('ROMEO:', proc.stdout)  # the final sample continues the prompt
        self.assertEqual(proc.stderr.count('sample\nROMEO:'), 2)  # after each evaluation but the last
        with open(work_dir / 'results.json') as f:
            self.assertEqual(json.load(f)['iters'], 60)
        # mingpt.tokenizers finds the character vocabulary next to the best checkpoint
        from mingpt.evaluate import evaluate_text
        from mingpt.tokenizers import CharTokenizer, tokenizer_for_model
        model = GPT.from_pretrained(work_dir / 'ckpt_best')
        tokenizer = tokenizer_for_model(work_dir / 'ckpt_best', model.config.vocab_size)
        self.assertIsInstance(tokenizer, CharTokenizer)
        with open(self.tmp / 'input.txt', encoding='utf-8') as f:
            held_out = f.read()[-2000:]
        result = evaluate_text(model.eval(), tokenizer, held_out)
        self.assertEqual(result['bytes'], len(held_out.encode('utf-8')) - 1)  # all but the first character
        self.assertLess(result['bits_per_byte'], math.log2(tokenizer.n_vocab))  # better than uniform

        # the same command with a longer schedule continues from iteration 60
        proc = run_project('chargpt', f'--system.work_dir={work_dir}', '--trainer.max_iters=80',
                           *self.TINY, cwd=self.tmp)
        self.assertRan(proc)
        self.assertIn('resuming from', proc.stderr)
        records, _, val = read_metrics(work_dir)
        iters = [r['iter'] for r in records if 'loss' in r]
        self.assertEqual(iters, list(range(1, 81)))  # every iteration once: nothing redone, nothing lost
        self.assertEqual([i for i, _ in val], [20, 40, 60, 80])

    @slow
    def test_output_config_first_each_sample_once_no_note_on_its_own_calls(self):
        work_dir = self.tmp / 'out'
        proc = run_project('chargpt', f'--system.work_dir={work_dir}', '--trainer.max_iters=40', *self.TINY,
                           cwd=self.tmp)
        self.assertRan(proc)
        self.assertRegex(proc.stderr.splitlines()[0], r'chargpt: config:$')  # the first thing it says
        self.assertIn('    max_iters: 40\n', proc.stderr)  # the config as resolved from the command line
        # evaluations at 20 and 40: the sample of 20 is logged, the last one printed once, at the end
        self.assertEqual(proc.stderr.count('sample\nROMEO:'), 1)
        self.assertEqual(proc.stdout.count('ROMEO:'), 1)
        self.assertRegex(proc.stdout, r'^ROMEO:')
        # the samples outgrow the context (6 + 30 characters, block_size 32) with no note about it
        self.assertNotIn('window_keep', proc.stderr)

    @slow
    def test_under_torchrun_rank_0_reports(self):
        # 2 gloo processes: each trains, one speaks and writes
        work_dir = self.tmp / 'out'
        proc, writes = run_torchrun('chargpt', self.tmp, f'--system.work_dir={work_dir}', '--trainer.max_iters=4',
                                    *self.TINY, '--trainer.eval_interval=2', cwd=self.tmp)
        self.assertRan(proc)
        self.assertIn('(rank 0 of 2)', proc.stderr)
        self.assertEqual(proc.stderr.count('chargpt: config:'), 1)
        self.assertEqual(proc.stderr.count('characters, '), 1)  # "N characters, M distinct: ..."
        self.assertEqual(proc.stderr.count('sample\nROMEO:'), 1)  # iteration 2's; 4's is the final one
        self.assertEqual(proc.stdout.count('ROMEO:'), 1)
        self.assertEqual(proc.stdout.count('after 4 iterations;'), 1)
        self.assertIn(str(work_dir / 'results.json'), writes[0])
        self.assertIn(str(work_dir / 'chars.json'), writes[0])
        self.assertEqual(writes[1], [])

    @slow
    def test_a_run_that_cannot_resume_overwrites_nothing(self):
        work_dir = self.tmp / 'out'
        self.assertRan(run_project('chargpt', f'--system.work_dir={work_dir}', '--trainer.max_iters=2',
                                   *self.TINY, cwd=self.tmp))
        before = {p.name: p.read_bytes() for p in work_dir.iterdir() if p.is_file()}
        self.assertIn('config.json', before)
        # the same work dir with a wider model: its checkpoint cannot be resumed
        proc = run_project('chargpt', f'--system.work_dir={work_dir}', '--trainer.max_iters=4', *self.TINY,
                           '--model.n_embd=48', cwd=self.tmp)
        self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
        self.assertRegex(proc.stderr, r'error: the checkpoint in .* was written by a model of another size')
        self.assertNotIn('Traceback', proc.stderr)
        self.assertEqual({p.name: p.read_bytes() for p in work_dir.iterdir() if p.is_file()}, before)

    @slow
    def test_prompt_outside_the_vocabulary_is_a_clear_error(self):
        proc = run_project('chargpt', f'--system.work_dir={self.tmp / "out"}', '--sample.prompt=ROMEO: €ë',
                           *self.TINY[:-1], cwd=self.tmp)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("--sample.prompt='ROMEO: €ë': the text has 2 character(s) that are not in the vocabulary: 'ë€'", proc.stderr)
        self.assertNotIn('Traceback', proc.stderr)

    @slow
    def test_offline_without_data_says_to_pass_data_path(self):
        empty = self.tmp / 'empty'
        empty.mkdir()
        env = dict(os.environ, MINGPT_CACHE=str(self.tmp / 'cache'), MINGPT_TINYSHAKESPEARE_URL=free_port_url())
        proc = run_project('chargpt', f'--system.work_dir={self.tmp / "out"}', *self.TINY, cwd=empty, env=env)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn('--data.path', proc.stderr)
        self.assertIn('could not download', proc.stderr)

    @slow
    def test_without_validation_it_trains_and_says_so(self):
        work_dir = self.tmp / 'out'
        proc = run_project('chargpt', f'--system.work_dir={work_dir}', '--trainer.max_iters=4', *self.TINY,
                           '--data.val_fraction=0', cwd=self.tmp)
        self.assertRan(proc)
        self.assertIn('--data.val_fraction=0.0 leaves no text to validate on: training without validation',
                      proc.stderr)
        self.assertRegex(proc.stdout, r'train loss \d\.\d{4} \(no validation\) after 4 iterations;')
        with open(work_dir / 'results.json') as f:
            results = json.load(f)
        self.assertGreater(results.pop('wall_seconds'), 0)  # the whole run's time, evaluations included
        self.assertEqual(results, {'iters': 4, 'val_loss': None, 'best_val_loss': None})
        self.assertTrue((work_dir / 'ckpt' / 'model.safetensors').is_file())
        self.assertFalse((work_dir / 'ckpt_best').exists())
        records, train, val = read_metrics(work_dir)
        self.assertEqual((len(train), val), (4, []))

    @slow
    def test_a_preset_replaces_the_cpu_sizes(self):
        chargpt = load_project('chargpt')
        config = chargpt.get_config()
        self.assertEqual((config.model.n_layer, config.model.n_head, config.model.n_embd), (4, 4, 192))
        # the preset path is exercised through main's argument handling, up to building the model
        proc = run_project('chargpt', f'--system.work_dir={self.tmp / "out"}', '--model.model_type=gpt-nano',
                           '--trainer.max_iters=1', '--trainer.eval_iters=1', '--data.block_size=16',
                           '--sample.max_new_tokens=1', '--trainer.device=cpu', '--system.num_threads=1',
                           cwd=self.tmp)
        self.assertRan(proc)
        with open(self.tmp / 'out' / 'config.json') as f:  # the run's config, as given
            model = json.load(f)['model']
        self.assertEqual((model['model_type'], model['n_layer'], model['n_embd']), ('gpt-nano', None, None))
        with open(self.tmp / 'out' / 'ckpt' / 'config.json') as f:  # the model that was trained
            model = json.load(f)['model']
        self.assertEqual((model['model_type'], model['n_layer'], model['n_embd']), ('gpt-nano', 3, 48))


    def test_the_fast_preset_trains_the_modern_recipe_with_muon(self):
        chargpt = load_project('chargpt')
        self.assertEqual(chargpt.resolved_config([]).preset, 'default')  # minGPT's architecture stays the default
        with self.assertRaisesRegex(ConfigError, 'unknown preset; use one of default, fast'):
            chargpt.resolved_config(['--preset=quick'])
        fast = chargpt.resolved_config(['--preset=fast'])
        self.assertEqual((fast.trainer.optimizer, fast.trainer.muon_momentum_warmup, fast.trainer.compile, fast.data.block_size),
                         ('muon', 300, True, 128))
        work_dir = self.tmp / 'out'  # eager here: compiling takes longer than this whole tiny run
        proc = run_project('chargpt', '--preset=fast', f'--system.work_dir={work_dir}', '--trainer.max_iters=20',
                           '--trainer.compile=False', *self.TINY, cwd=self.tmp)
        self.assertRan(proc)
        with open(work_dir / 'ckpt' / 'config.json') as f:
            saved = json.load(f)
        model, trainer = saved['model'], saved['trainer']
        self.assertEqual((model['pos_emb'], model['norm'], model['qk_norm'], model['mlp_act'], model['bias'],
                          model['value_embeds'], model['token_shift'], model['resid_pdrop']),
                         ('rope', 'rmsnorm', True, 'relu2', False, True, True, 0.05))
        self.assertEqual((trainer['optimizer'], model['n_embd']), ('muon', 32))  # the command line still wins
        with open(work_dir / 'results.json') as f:
            results = json.load(f)
        self.assertLess(results['val_loss'], math.log(65))  # it learned something: below a uniform guess
# -----------------------------------------------------------------------------

class TestConfigFirst(ProjectTestCase):
    """ every project says first the config it runs with (adder and chargpt: in their tests above) """

    def assertConfigFirst(self, proc, logger_name, error):
        self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
        self.assertRegex(proc.stderr.splitlines()[0], rf'{logger_name}: config:$')
        self.assertIn('\ntrainer:\n    device: ', proc.stderr)
        self.assertIn(f'error: {error}', proc.stderr)  # the config comes first, even before an error
        self.assertNotIn('Traceback', proc.stderr)

    @slow
    def test_finetune(self):
        (self.tmp / 'text.txt').write_text('To be, or not to be, that is the question.\n' * 100)
        proc = run_project('finetune', f'--system.work_dir={self.tmp / "out"}',
                           f'--model.init_from={self.tmp / "nowhere"}', f'--data.path={self.tmp / "text.txt"}')
        self.assertConfigFirst(proc, 'finetune', f'--model.init_from={self.tmp / "nowhere"}')  # a clear error

    @slow
    def test_chat_base(self):
        proc = run_project('chat', f'--system.work_dir={self.tmp / "out"}', '--data.n_merges=-1', script='base')
        self.assertConfigFirst(proc, 'chat.base', '--data.n_merges must be in')

    @slow
    def test_chat_sft(self):
        proc = run_project('chat', f'--system.work_dir={self.tmp / "out"}', f'--model.init_from={self.tmp / "nowhere"}',
                           script='sft')
        self.assertConfigFirst(proc, 'chat.sft', f"'{self.tmp / 'nowhere'}': no such file or directory")

# -----------------------------------------------------------------------------

class TestChatPipeline(ProjectTestCase):

    @slow
    def test_the_next_steps_base_prints_run_offline(self):
        # no network (the tiny shakespeare URL points at a closed port) and an empty cache: base.py trains
        # on a given file, and the commands it prints next must use that file, not a download
        env = dict(os.environ, MINGPT_CACHE=str(self.tmp / 'cache'), MINGPT_TINYSHAKESPEARE_URL=free_port_url(),
                   OMP_NUM_THREADS='1')
        (self.tmp / 'play.txt').write_text(shakespeare(30000), encoding='utf-8')
        proc = run_project('chat', '--data.path=play.txt', '--trainer.max_iters=2', '--trainer.eval_iters=1',
                           '--trainer.batch_size=2', '--model.n_layer=1', '--model.n_embd=16', '--model.n_head=2',
                           '--data.block_size=128', '--data.n_merges=200', script='base', cwd=self.tmp, env=env)
        self.assertRan(proc)
        hint = re.search(r'next: python (projects/chat/make_data\.py .*) && python (projects/chat/sft\.py .*)$',
                         proc.stdout, re.M)
        self.assertIsNotNone(hint, proc.stdout)
        make_data, sft = (h.split() for h in hint.groups())
        self.assertIn('--path=play.txt', make_data)
        proc = subprocess.run([sys.executable, str(REPO / make_data[0]), *make_data[1:]], cwd=self.tmp, env=env,
                              capture_output=True, text=True, timeout=300)
        self.assertRan(proc)
        self.assertTrue((self.tmp / 'out' / 'chat' / 'data' / 'train.jsonl').is_file())
        proc = run_project('chat', *sft[1:], '--trainer.max_iters=2', '--trainer.eval_iters=1',
                           '--trainer.batch_size=2', '--sample.n_prompts=1', '--sample.max_new_tokens=2',
                           script='sft', cwd=self.tmp, env=env)
        self.assertRan(proc)
        self.assertTrue((self.tmp / 'out' / 'chat' / 'sft' / 'model' / 'encoder.json').is_file())


    def test_sft_shows_a_bar_while_it_samples_replies(self):
        import io
        from unittest import mock
        from mingpt.bpe import get_encoder
        from mingpt.chat import ChatTokenizer, add_chat_tokens
        from tests.common import tiny_gpt
        spec = importlib.util.spec_from_file_location('project_chat_sft', PROJECTS / 'chat' / 'sft.py')
        sft = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sft)
        tokenizer = ChatTokenizer(add_chat_tokens(get_encoder()))
        model = tiny_gpt(tokenizer.encoder.n_vocab, block_size=64)
        conversations = [[{'role': 'user', 'content': f'Hail, {name}!'}, {'role': 'assistant', 'content': 'Hail.'}]
                         for name in ('Romeo', 'Juliet', 'Tybalt')]
        S = sft.get_config().sample
        S.max_new_tokens = 2

        class Terminal(io.StringIO):
            def isatty(self):
                return True
        with mock.patch('sys.stderr', Terminal()) as stderr:
            dialogues, _ = sft.sample_replies(model, tokenizer, conversations, S)
        self.assertEqual(len(dialogues), 3)
        self.assertIn('replies', stderr.getvalue())
        self.assertIn('3/3', stderr.getvalue())


class TestWithoutOptionalPackages(ProjectTestCase):
    """ matplotlib is optional: without it a run ends well, says once what to install, and skips the plot """

    def assertRanWithoutPlot(self, proc, work_dir):
        self.assertRan(proc)
        self.assertNotIn('Traceback', proc.stderr)
        missing = [line for line in proc.stderr.splitlines() if 'matplotlib' in line]
        self.assertEqual(len(missing), 1, proc.stderr)
        self.assertIn('pip install matplotlib', missing[0])
        self.assertTrue((work_dir / 'results.json').is_file())
        self.assertFalse((work_dir / 'loss.png').exists())

    @slow
    def test_adder_without_matplotlib(self):
        work_dir = self.tmp / 'adder'
        proc = run_project('adder', f'--system.work_dir={work_dir}', '--trainer.device=cpu',
                           '--trainer.max_iters=20', '--trainer.eval_interval=10', '--eval.train_problems=100',
                           without=['matplotlib'])
        self.assertRanWithoutPlot(proc, work_dir)
        self.assertIn('best test accuracy', proc.stdout)

    @slow
    def test_chargpt_without_matplotlib(self):
        work_dir = self.tmp / 'chargpt'
        (self.tmp / 'input.txt').write_text(shakespeare(20000), encoding='utf-8')
        proc = run_project('chargpt', f'--system.work_dir={work_dir}', '--trainer.max_iters=20',
                           *TestCharGPT.TINY, cwd=self.tmp, without=['matplotlib'])
        self.assertRanWithoutPlot(proc, work_dir)
        self.assertIn('after 20 iterations; checkpoints, metrics.jsonl in', proc.stdout)

# -----------------------------------------------------------------------------

class TestFinetune(ProjectTestCase):

    def tiny_gpt2(self, n_positions=64, n_embd=32, n_layer=2):
        """ self.tmp/tiny: a random HF GPT-2 with GPT-2's vocabulary (so the BPE ids fit), everything else tiny """
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                   n_head=2)).save_pretrained(self.tmp / 'tiny')
        return self.tmp / 'tiny'

    @slow
    def test_finetunes_a_local_checkpoint(self):
        from transformers import GPT2LMHeadModel
        from mingpt.model import GPT
        self.tiny_gpt2()
        text = self.tmp / 'text.txt'
        text.write_text(shakespeare(40000), encoding='utf-8')
        work_dir = self.tmp / 'out'
        proc = run_project('finetune', f'--system.work_dir={work_dir}', f'--model.init_from={self.tmp / "tiny"}',
                           f'--data.path={text}', '--data.block_size=32', '--trainer.device=cpu',
                           '--system.num_threads=1',
                           '--trainer.max_iters=30', '--trainer.batch_size=8', '--trainer.learning_rate=3e-3',
                           '--trainer.warmup_iters=3', '--trainer.eval_interval=10', '--trainer.eval_iters=4',
                           '--sample.max_new_tokens=10')
        self.assertRan(proc)
        self.assertWorkDir(work_dir, 'ckpt/model.safetensors', 'ckpt_best/model.safetensors',
                           'model/config.json', 'model/model.safetensors')
        from mingpt.checkpoint import read_checkpoint
        self.assertIsNone(read_checkpoint(work_dir / 'ckpt_best')[1]['optimizer'])  # weights to use, not resume
        self.assertIsNotNone(read_checkpoint(work_dir / 'ckpt')[1]['optimizer'])
        self.assertLossWentDown(work_dir)
        with open(work_dir / 'results.json') as f:
            results = json.load(f)
        self.assertLess(results['val_loss_after'], results['val_loss_before'] - 0.3)
        self.assertIn('sample before fine-tuning', proc.stdout)
        self.assertIn('sample after fine-tuning', proc.stdout)
        self.assertNotEqual(results['sample_before'], results['sample_after'])
        # the export is the best checkpoint, readable by from_pretrained (and by transformers)
        model = GPT.from_pretrained(work_dir / 'model')
        _, _, val = read_metrics(work_dir)
        self.assertAlmostEqual(results['val_loss_after'], min(v for _, v in val), places=4)
        self.assertEqual(model.config.n_embd, 32)
        GPT2LMHeadModel.from_pretrained(work_dir / 'model')

    @slow
    def test_under_torchrun_the_ranks_evaluate_together_and_rank_0_reports(self):
        # the evaluations before and after run() reduce over both ranks; only rank 0 samples and writes
        text = self.tmp / 'text.txt'
        text.write_text(shakespeare(20000), encoding='utf-8')
        work_dir = self.tmp / 'out'
        proc, writes = run_torchrun('finetune', self.tmp, f'--system.work_dir={work_dir}',
                                    f'--model.init_from={self.tiny_gpt2()}', f'--data.path={text}',
                                    '--data.block_size=32', '--trainer.device=cpu', '--trainer.max_iters=4',
                                    '--trainer.batch_size=4', '--trainer.eval_interval=2', '--trainer.eval_iters=2',
                                    '--sample.max_new_tokens=5')
        self.assertRan(proc)
        self.assertEqual(proc.stderr.count('finetune: config:'), 1)
        self.assertEqual(proc.stderr.count('before fine-tuning: val loss'), 1)
        self.assertEqual(proc.stdout.count('sample before fine-tuning'), 1)
        self.assertEqual(proc.stdout.count('sample after fine-tuning'), 1)
        with open(work_dir / 'results.json') as f:
            results = json.load(f)
        _, _, val = read_metrics(work_dir)  # the Trainer's evaluations, over both ranks' batches
        self.assertAlmostEqual(results['val_loss_after'], min(v for _, v in val), places=4)
        for name in ('results.json', 'model/model.safetensors', 'ckpt_best'):  # checkpoints: a renamed directory
            self.assertIn(str(work_dir / name), writes[0])
        self.assertEqual(writes[1], [])

    @slow
    def test_block_size_longer_than_the_context_is_a_clear_error(self):
        self.tiny_gpt2(n_positions=16, n_embd=8, n_layer=1)
        (self.tmp / 'text.txt').write_text('To be, or not to be, that is the question.\n' * 100)
        proc = run_project('finetune', f'--system.work_dir={self.tmp / "out"}',
                           f'--model.init_from={self.tmp / "tiny"}', f'--data.path={self.tmp / "text.txt"}',
                           '--data.block_size=32', '--trainer.device=cpu')
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("--data.block_size=32 is longer than the model's context of 16 tokens", proc.stderr)


# -----------------------------------------------------------------------------

class TestGPT2(ProjectTestCase):
    """ the pretraining recipe on shards that mingpt.prepare made of a little Shakespeare, with a vocabulary of
    300 tokens trained on it (GPT-2's would make even a tiny model slow) """

    TINY = ['--preset=cpu', '--trainer.device=cpu', '--system.num_threads=1', '--model.n_layer=1',
            '--model.n_head=2', '--model.n_embd=32', '--data.block_size=32', '--trainer.batch_size=8',
            '--data.total_batch_tokens=512', '--trainer.learning_rate=3e-3', '--trainer.warmup_iters=3',
            '--trainer.eval_interval=10', '--trainer.checkpoint_interval=10', '--trainer.eval_iters=2',
            '--sample.max_new_tokens=20', '--sample.interval=10']

    def make_shards(self):
        from mingpt.bpe_train import train_bpe
        from mingpt.prepare import prepare
        train_bpe(shakespeare(20_000), 300, special_tokens=['<|endoftext|>']).save(self.tmp / 'tok')
        (self.tmp / 'corpus').mkdir()
        for i in range(3):
            (self.tmp / 'corpus' / f'{i}.txt').write_text(shakespeare(15_000, start=20_000 * (i + 1)))
        self.shards = self.tmp / 'shards'
        prepare([self.tmp / 'corpus'], self.shards, tokenizer=self.tmp / 'tok', shard_tokens=5000, val_tokens=2000,
                workers=1, progress=False)

    def test_presets_and_tokens_per_step(self):
        gpt2 = load_project('gpt2')
        config = gpt2.resolved_config([])
        self.assertEqual((config.preset, config.model.n_layer, config.model.n_embd, config.data.block_size),
                         ('gpt2', 12, 768, 1024))
        self.assertEqual((config.trainer.learning_rate, config.trainer.min_lr, config.trainer.betas,
                          config.trainer.weight_decay, config.trainer.grad_norm_clip), (6e-4, 6e-5, (0.9, 0.95), 0.1, 1.0))
        config = gpt2.resolved_config(['--preset=cpu', '--trainer.max_iters=7'])
        self.assertEqual((config.model.n_layer, config.trainer.compile, config.trainer.max_iters), (4, False, 7))
        fast = gpt2.resolved_config(['--preset=cpu-fast'])  # the cpu preset's tokens, on the modern recipe
        cpu = gpt2.resolved_config(['--preset=cpu'])
        tokens = lambda c: c.data.total_batch_tokens * c.trainer.max_iters
        self.assertEqual(tokens(fast), tokens(cpu))
        self.assertEqual((fast.trainer.optimizer, fast.model.pos_emb, fast.model.tie_weights), ('muon', 'rope', False))
        config = gpt2.resolved_config(['--model.model_type=gpt2-medium'])  # a model preset replaces the sizes
        self.assertEqual((config.model.model_type, config.model.n_layer), ('gpt2-medium', None))
        with self.assertRaisesRegex(ConfigError, 'unknown preset; use one of gpt2, cpu, cpu-fast'):
            gpt2.resolved_config(['--preset=tiny'])
        # ~0.5M tokens a step on 8 GPUs of 16 rows x 1024: 4 micro-steps; 12 rows do not divide 2^19
        self.assertEqual(gpt2.grad_accum_steps(2 ** 19, 16, 1024, 8), 4)
        self.assertEqual(gpt2.grad_accum_steps(2 ** 19, 64, 1024, 1), 8)
        with self.assertRaisesRegex(ConfigError, r'12 x 1024 x 8 = 98304: set --data.total_batch_tokens=491520'):
            gpt2.grad_accum_steps(2 ** 19, 12, 1024, 8)

    @slow
    def test_trains_evaluates_bits_per_byte_samples_and_resumes(self):
        self.make_shards()
        work_dir = self.tmp / 'out'
        proc = run_project('gpt2', f'--data.dir={self.shards}', f'--system.work_dir={work_dir}',
                           '--trainer.max_iters=30', *self.TINY)
        self.assertRan(proc)
        self.assertIn('2 x 8 rows x 32 tokens x 1 processes', proc.stderr)  # 512 tokens a step: accumulation
        self.assertWorkDir(work_dir, 'ckpt/model.safetensors', 'ckpt_best/model.safetensors', 'samples.txt',
                           'encoder.json')
        self.assertLossWentDown(work_dir)
        records, _, val = read_metrics(work_dir)
        bpb = [(r['iter'], r['val_bpb']) for r in records if 'val_bpb' in r]
        self.assertEqual([i for i, _ in bpb], [10, 20, 30])
        with open(work_dir / 'results.json') as f:
            results = json.load(f)
        # bits per byte is the loss over the bytes of the windows' text: its ratio to the loss is the same at
        # every evaluation (the same windows), tokens a byte / ln 2, and a 300-token BPE packs 1-4 bytes a token
        ratios = [b / v for (_, v), (_, b) in zip(val, bpb)]
        self.assertAlmostEqual(min(ratios), max(ratios), delta=1e-9)
        self.assertTrue(1 / 4 / math.log(2) < ratios[0] < 1 / math.log(2), ratios)
        self.assertAlmostEqual(results['val_bpb'], bpb[-1][1])
        self.assertLess(results['val_loss'], math.log(300))  # better than uniform over the vocabulary
        self.assertEqual((results['iters'], results['tokens']), (30, 30 * 512))
        samples = (work_dir / 'samples.txt').read_text(encoding='utf-8')
        self.assertEqual([line.split(' (')[0] for line in samples.splitlines() if line.startswith('--- iter')],
                         ['--- iter 10', '--- iter 20', '--- iter 30'])
        self.assertIn(results['sample'], samples)
        self.assertGreater(len(results['sample']), 10)  # 20 new tokens (an <|endoftext|> among them adds no text)
        self.assertIn(results['sample'], proc.stdout)

        # the same command with a longer schedule continues from iteration 30
        proc = run_project('gpt2', f'--data.dir={self.shards}', f'--system.work_dir={work_dir}',
                           '--trainer.max_iters=40', *self.TINY)
        self.assertRan(proc)
        self.assertIn('resuming from', proc.stderr)
        records, _, _ = read_metrics(work_dir)
        self.assertEqual([r['iter'] for r in records if 'loss' in r], list(range(1, 41)))
        self.assertEqual([r['iter'] for r in records if 'val_bpb' in r], [10, 20, 30, 40])

        # ... but not on other shards: the same text prepared with other settings
        from mingpt.prepare import prepare
        prepare([self.tmp / 'corpus'], self.tmp / 'other', tokenizer=self.tmp / 'tok', shard_tokens=4000,
                val_tokens=2000, workers=1, progress=False)
        proc = run_project('gpt2', f'--data.dir={self.tmp / "other"}', f'--system.work_dir={work_dir}',
                           '--trainer.max_iters=50', *self.TINY)
        self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
        self.assertRegex(proc.stderr, r'error: the run being resumed was trained on other token shards')
        self.assertNotIn('Traceback', proc.stderr)

    @slow
    def test_under_torchrun_the_step_keeps_its_tokens_and_rank_0_reports(self):
        self.make_shards()
        env = dict(os.environ, OMP_NUM_THREADS='1')
        env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
        # under FSDP every rank samples with the sharded model (rank 0 alone would wait forever)
        for parallel in ('ddp', 'fsdp'):
            with self.subTest(parallel=parallel):
                work_dir = self.tmp / f'out-{parallel}'
                proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                       '--nproc_per_node=2', str(PROJECTS / 'gpt2' / 'gpt2.py'),
                                       f'--data.dir={self.shards}', f'--system.work_dir={work_dir}',
                                       '--trainer.max_iters=10', *self.TINY, '--trainer.eval_interval=5',
                                       '--sample.interval=5', f'--trainer.parallel={parallel}'],
                                      cwd=self.tmp, env=env, capture_output=True, text=True, timeout=300)
                self.assertRan(proc)
                # 512 tokens a step: 2 processes of 8 rows x 32 tokens need no accumulation
                self.assertIn('512 tokens a step (1 x 8 rows x 32 tokens x 2 processes)', proc.stderr)
                self.assertIn('(rank 0 of 2)', proc.stderr)
                self.assertEqual(proc.stderr.count('gpt2: config:'), 1)
                self.assertEqual(proc.stderr.count('val bits per byte'), 2)
                self.assertEqual(proc.stdout.count('bits/byte after 10 steps (5,120 tokens)'), 1)
                with open(work_dir / 'results.json') as f:
                    results = json.load(f)
                self.assertEqual(results['tokens'], 5120)
                samples = (work_dir / 'samples.txt').read_text(encoding='utf-8')
                self.assertEqual(samples.count('--- iter '), 2)  # at step 5 and at the end, written once each
                self.assertIn(results['sample'], samples)


if __name__ == '__main__':
    unittest.main()
