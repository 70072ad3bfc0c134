"""
Trainer checkpoints: what is written, atomic replacement, clear errors for missing / corrupt /
mismatched checkpoints, and a resume after SIGKILL that continues bit for bit.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mingpt.checkpoint import find_checkpoint, read_checkpoint
from mingpt.errors import CheckpointError, ConfigError, DataError
from mingpt import trainer as trainer_module
from mingpt.model import GPT
from mingpt.trainer import Trainer
from mingpt.utils import set_seed
from tests.common import TempDirTestCase, slow
from tests.test_trainer import RepeatDataset, quiet_config

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train_script.py')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(n_embd=48, tie_weights=False):
    config = GPT.get_default_config()
    config.model_type = None
    config.n_layer, config.n_head, config.n_embd = 2, 2, n_embd
    config.vocab_size, config.block_size = 5, 8
    config.tie_weights = tie_weights
    return GPT(config)


def train(work_dir, max_iters, model=None, **kw):
    """ a fresh seeded run (or a resume) of the tiny model; returns the trainer """
    set_seed(0)
    model = model if model is not None else tiny_model()
    C = quiet_config(max_iters=max_iters, batch_size=4, learning_rate=3e-3, work_dir=work_dir,
                     checkpoint_interval=2, **kw)
    trainer = Trainer(C, model, RepeatDataset())
    trainer.run()
    return trainer


class StatefulDataset(RepeatDataset):
    """ a dataset with a state, as token shards have (which shards): a resume must find the same """

    def __init__(self, name):
        super().__init__()
        self.name = name

    def state_dict(self):
        return {'name': self.name}

    def load_state_dict(self, state):
        if state != self.state_dict():
            raise DataError(f"trained on {state['name']}, not {self.name}")


class TestCheckpointFiles(TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.dir = str(self.tmp)

    def test_contents_and_weights_only_loading(self):
        trainer = train(self.dir, 3, model=tiny_model(tie_weights=True))
        ckpt = os.path.join(self.dir, 'ckpt')
        self.assertEqual(sorted(os.listdir(self.dir)), ['ckpt', 'metrics.jsonl'])  # no .tmp / .old left
        self.assertEqual(sorted(os.listdir(ckpt)), ['config.json', 'model.safetensors', 'trainer.pt'])
        state = torch.load(os.path.join(ckpt, 'trainer.pt'), weights_only=True)
        self.assertEqual(state['iter_num'], 3)  # the final one, not only every checkpoint_interval
        self.assertEqual(set(state['rng'][0]), {'python', 'numpy', 'torch'})
        self.assertEqual(len(state['optimizer']['state']), len(list(trainer.model.parameters())))
        # the tied lm_head / wte weight is stored once, and comes back tied
        with safe_open(os.path.join(ckpt, 'model.safetensors'), 'pt') as f:
            self.assertEqual(len(list(f.keys())), len(trainer.model.state_dict()) - 1)
        sd, _ = read_checkpoint(ckpt)
        model = tiny_model(tie_weights=True)
        model.load_state_dict(sd, strict=True)
        self.assertIs(model.lm_head.weight, model.transformer.wte.weight)
        self.assertTrue(torch.equal(model.lm_head.weight, trainer.model.lm_head.weight))
        with open(os.path.join(ckpt, 'config.json')) as f:
            self.assertEqual(json.load(f)['model']['n_embd'], 48)

    def test_the_datasets_state_is_checked_before_a_resume(self):
        C = quiet_config(max_iters=2, batch_size=4, work_dir=self.dir, checkpoint_interval=2)
        Trainer(C, tiny_model(), StatefulDataset('a'), val_dataset=RepeatDataset()).run()
        _, state = read_checkpoint(find_checkpoint(os.path.join(self.dir, 'ckpt')))
        self.assertEqual(state['datasets'], [{'name': 'a'}, None])  # the val dataset has no state
        C.max_iters, C.resume = 4, True
        with self.assertRaisesRegex(DataError, 'trained on a, not b'):
            Trainer(C, tiny_model(), StatefulDataset('b'))  # refused when the Trainer is made: nothing written
        trainer = Trainer(C, tiny_model(), StatefulDataset('a'))
        trainer.run()
        self.assertEqual(trainer.iter_num, 4)

    def test_in_process_resume_matches_straight_run(self):
        straight = train(os.path.join(self.dir, 'a'), 6).model
        train(os.path.join(self.dir, 'b'), 4)
        resumed = train(os.path.join(self.dir, 'b'), 6, resume=True)
        self.assertEqual(resumed.iter_num, 6)
        for a, b in zip(straight.parameters(), resumed.model.parameters()):
            self.assertTrue(torch.equal(a, b))
        self.assertEqual(resumed.history['iter'], [1, 2, 3, 4, 5, 6])  # history reloaded from metrics

    def test_resume_at_the_end_does_nothing(self):
        train(self.dir, 2)
        steps = []
        set_seed(0)
        trainer = Trainer(quiet_config(max_iters=2, batch_size=4, work_dir=self.dir, resume=True),
                          tiny_model(), RepeatDataset())
        trainer.add_callback('on_batch_end', lambda t: steps.append(t.iter_num))
        trainer.run()
        self.assertEqual((steps, trainer.iter_num), ([], 2))

    def test_a_kill_between_the_two_renames_falls_back_to_the_previous(self):
        train(self.dir, 4)
        ckpt = os.path.join(self.dir, 'ckpt')
        # the moment write_checkpoint has moved the old one aside and not yet renamed the new one in
        os.replace(ckpt, ckpt + '.old')
        os.makedirs(ckpt + '.tmp')
        with open(os.path.join(ckpt + '.tmp', 'model.safetensors'), 'wb') as f:
            f.write(b'half a file')
        self.assertEqual(find_checkpoint(ckpt), ckpt + '.old')
        trainer = train(self.dir, 6, resume=True)
        self.assertEqual(trainer.iter_num, 6)
        self.assertEqual(read_checkpoint(ckpt)[1]['iter_num'], 6)
        self.assertFalse(os.path.exists(ckpt + '.old'))
        self.assertFalse(os.path.exists(ckpt + '.tmp'))


class TestCheckpointErrors(TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.dir = str(self.tmp)

    def test_an_existing_run_is_never_overwritten(self):
        train(self.dir, 2)
        with self.assertRaisesRegex(CheckpointError, "already holds a checkpoint.*resume=True"):
            train(self.dir, 4)
        self.assertEqual(read_checkpoint(os.path.join(self.dir, 'ckpt'))[1]['iter_num'], 2)

    def test_a_run_that_cannot_resume_writes_nothing(self):
        train(self.dir, 2)
        before = {name: open(os.path.join(root, name), 'rb').read()
                  for root, _, names in os.walk(self.dir) for name in names}
        cases = [(dict(model=tiny_model(n_embd=32), resume=True), "another size"),
                 (dict(resume=False), "already holds a checkpoint"),
                 (dict(resume='auto', data_seed=99), "data_seed")]
        for kw, message in cases:
            with self.subTest(message):
                set_seed(0)
                C = quiet_config(max_iters=4, batch_size=4, work_dir=self.dir, **{k: v for k, v in kw.items()
                                                                                   if k != 'model'})
                with self.assertRaisesRegex(CheckpointError, message):
                    Trainer(C, kw.get('model', tiny_model()), RepeatDataset())  # making it is enough
        after = {name: open(os.path.join(root, name), 'rb').read()
                 for root, _, names in os.walk(self.dir) for name in names}
        self.assertEqual(after, before)

    def test_resume_needs_a_checkpoint_unless_auto(self):
        with self.assertRaisesRegex(CheckpointError, "no checkpoint"):
            train(self.dir, 2, resume=True)
        self.assertEqual(train(self.dir, 2, resume='auto').iter_num, 2)  # fresh start
        self.assertEqual(train(self.dir, 4, resume='auto').iter_num, 4)  # and then a resume

    def test_corrupt_files_are_errors_not_fresh_starts(self):
        train(self.dir, 2)
        ckpt = os.path.join(self.dir, 'ckpt')
        backup = os.path.join(self.dir, 'backup')
        shutil.copytree(ckpt, backup)
        for name, damage in [('model.safetensors', 'truncate'), ('trainer.pt', 'garbage'),
                             ('trainer.pt', 'missing')]:
            with self.subTest(file=name, damage=damage):
                shutil.rmtree(ckpt)
                shutil.copytree(backup, ckpt)
                path = os.path.join(ckpt, name)
                if damage == 'truncate':
                    with open(path, 'r+b') as f:
                        f.truncate(os.path.getsize(path) // 2)
                elif damage == 'garbage':
                    with open(path, 'wb') as f:
                        f.write(b'\x00not a checkpoint' * 10)
                else:
                    os.remove(path)
                with self.assertRaisesRegex(CheckpointError, name) as ctx:
                    train(self.dir, 4, resume=True)
                self.assertNotIn('weights_only', str(ctx.exception))  # never advice to run a file's code

    def test_a_file_copied_in_from_another_run_is_refused(self):
        # the other run is the same command: same model, same iteration, so only the save id tells them apart
        other = os.path.join(self.dir, 'other')
        train(os.path.join(self.dir, 'a'), 2)
        train(other, 2)
        ckpt = os.path.join(self.dir, 'a', 'ckpt')
        for name in ('model.safetensors', 'trainer.pt'):
            with self.subTest(copied=name):
                backup = os.path.join(self.dir, 'backup')
                shutil.copytree(ckpt, backup)
                shutil.copy(os.path.join(other, 'ckpt', name), os.path.join(ckpt, name))
                with self.assertRaises(CheckpointError) as ctx:
                    train(os.path.join(self.dir, 'a'), 4, resume='auto')
                self.assertRegex(str(ctx.exception), "mixes files of two saves: model.safetensors is from save "
                                                     "[0-9a-f]+-2 and trainer.pt from save [0-9a-f]+-2")
                shutil.rmtree(ckpt)
                os.replace(backup, ckpt)
        self.assertEqual(train(os.path.join(self.dir, 'a'), 4, resume=True).iter_num, 4)

    def test_mismatched_model_or_data_seed(self):
        train(self.dir, 2)
        with self.assertRaisesRegex(CheckpointError, "was written by a model of another size") as ctx:
            train(self.dir, 4, model=tiny_model(n_embd=32), resume=True)
        # one sentence naming a few tensors and both shapes, not torch's dump of every one of them
        message = str(ctx.exception)
        self.assertIn("(transformer.wte.weight: (5, 48) in the checkpoint, (5, 32) in this model; ", message)
        self.assertRegex(message, r"; and \d+ more tensors\): build the model with the sizes in .*config\.json")
        self.assertNotIn('\n', message)
        self.assertLess(len(message), 600)
        with self.assertRaisesRegex(CheckpointError, "data_seed"):
            train(self.dir, 4, resume=True, data_seed=12345)


class Killed(Exception):
    """ stands for a SIGKILL in the middle of a run """


class FakeClock:
    """ the Trainer's clock, a minute and a second further at every look """

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 61.0
        return self.now


def run_until(work_dir, max_iters, kill_at=None, **kw):
    """ a seeded run of the tiny model that checkpoints by the clock only (a FakeClock), killed as it
    starts iteration kill_at (+ 1, counting from 1); returns the trainer and the iterations it checkpointed """
    set_seed(0)
    C = quiet_config(max_iters=max_iters, batch_size=4, learning_rate=3e-3, work_dir=work_dir,
                     checkpoint_interval=1000, **kw)
    trainer = Trainer(C, tiny_model(), RepeatDataset())
    saved = []
    trainer.add_callback('on_checkpoint', lambda t: saved.append(t.iter_num))

    def kill(t):
        if t.iter_num == kill_at:
            raise Killed()
    trainer.add_callback('on_batch_end', kill)
    with mock.patch.object(trainer_module, 'clock', FakeClock()):
        try:
            trainer.run()
        except Killed:
            pass
    return trainer, saved


class TestCheckpointMinutes(TempDirTestCase):
    """ checkpoint_minutes: a checkpoint once that many minutes have passed since the last, whatever
    the iteration; the clock is a fake one that moves 61 s a look (the Trainer looks once an iteration
    and once as it saves), so checkpoint_minutes=2 saves every other iteration """

    def test_a_checkpoint_every_few_minutes(self):
        for minutes, expected in ((2, [2, 4, 6]), (1, [1, 2, 3, 4, 5, 6]), (None, [6]), (0, [6])):
            with self.subTest(minutes=minutes):
                _, saved = run_until(str(self.tmp / str(minutes)), 6, checkpoint_minutes=minutes)
                self.assertEqual(saved, expected)
        self.assertEqual(Trainer.get_default_config().checkpoint_minutes, 5)
        with self.assertRaisesRegex(ConfigError, "checkpoint_minutes=-1 cannot work"):
            Trainer(quiet_config(checkpoint_minutes=-1), tiny_model(), RepeatDataset())

    def test_a_run_killed_after_a_timed_checkpoint_resumes_bit_exact(self):
        straight, _ = run_until(str(self.tmp / 'a'), 6, checkpoint_minutes=None)
        _, saved = run_until(str(self.tmp / 'b'), 6, kill_at=3, checkpoint_minutes=2)  # killed in iteration 4
        self.assertEqual(saved, [2])
        resumed, _ = run_until(str(self.tmp / 'b'), 6, resume=True, checkpoint_minutes=2)
        self.assertEqual(resumed.iter_num, 6)
        for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
            self.assertTrue(torch.equal(a, b))
        self.assertEqual(resumed.history['loss'], straight.history['loss'])


class TestFreshStart(TempDirTestCase):
    """ a run with no checkpoint to resume says so, and keeps what an earlier run logged """

    def test_a_restart_before_the_first_checkpoint_keeps_the_earlier_metrics(self):
        with self.assertLogs('mingpt.trainer', 'INFO') as logs:
            run_until(str(self.tmp), 6, kill_at=3, checkpoint_minutes=None, resume='auto')  # killed: no checkpoint
        self.assertIn(f"no checkpoint in {self.tmp / 'ckpt'}: starting afresh at iteration 0", '\n'.join(logs.output))
        self.assertIsNone(find_checkpoint(self.tmp / 'ckpt'))
        with self.assertLogs('mingpt.trainer', 'WARNING') as logs:
            again, _ = run_until(str(self.tmp), 6, checkpoint_minutes=None, resume='auto')
        self.assertIn(f"no checkpoint in {self.tmp / 'ckpt'}: starting afresh at iteration 0; the metrics an "
                      f"earlier run logged are kept in {self.tmp / 'metrics.1.jsonl'}", '\n'.join(logs.output))
        self.assertEqual(again.history['iter'], [1, 2, 3, 4, 5, 6])
        with open(self.tmp / 'metrics.1.jsonl') as f:
            self.assertEqual([json.loads(line)['iter'] for line in f], [1, 2, 3])
        with open(self.tmp / 'metrics.jsonl') as f:
            self.assertEqual([json.loads(line)['iter'] for line in f], [1, 2, 3, 4, 5, 6])


class TestResumeAfterKill(unittest.TestCase):
    """
    The real thing, in fresh processes: a run SIGKILLed mid-way (2 steps after its last
    checkpoint) and resumed ends with exactly the weights of a run that was never interrupted.
    Dropout on, tied weights, 2 micro-steps per step: every RNG and the data order must replay.
    """

    def run_script(self, out, work_dir, *extra, kill_at=None):
        cmd = [sys.executable, SCRIPT, '--out', out, '--tie_weights']
        if kill_at is not None:
            cmd += ['--kill_at', str(kill_at)]
        cmd += ['--trainer', f'work_dir={work_dir}', 'max_iters=12', 'checkpoint_interval=4',
                'batch_size=8', 'grad_accum_steps=2', *extra]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)

    @slow
    def test_sigkill_then_resume_is_bit_exact(self):
        with tempfile.TemporaryDirectory() as d:
            p = self.run_script(os.path.join(d, 'straight'), os.path.join(d, 'w1'))
            self.assertEqual(p.returncode, 0, p.stderr)
            p = self.run_script(os.path.join(d, 'killed'), os.path.join(d, 'w2'), kill_at=10)
            self.assertEqual(p.returncode, -signal.SIGKILL, p.stderr)
            self.assertFalse(os.path.exists(os.path.join(d, 'killed')))  # it never finished
            self.assertEqual(read_checkpoint(os.path.join(d, 'w2', 'ckpt'))[1]['iter_num'], 8)
            p = self.run_script(os.path.join(d, 'resumed'), os.path.join(d, 'w2'), 'resume=True')
            self.assertEqual(p.returncode, 0, p.stderr)

            a = load_file(os.path.join(d, 'straight', 'final.safetensors'))
            b = load_file(os.path.join(d, 'resumed', 'final.safetensors'))
            self.assertEqual(set(a), set(b))
            for k in a:
                self.assertTrue(torch.equal(a[k], b[k]), k)
            with open(os.path.join(d, 'straight', 'losses.json')) as f:
                straight = json.load(f)
            with open(os.path.join(d, 'resumed', 'losses.json')) as f:
                resumed = json.load(f)
            self.assertEqual(sorted(resumed, key=int), ['8', '9', '10', '11'])
            self.assertEqual({k: straight[k] for k in resumed}, resumed)
            # metrics.jsonl: the steps 9 and 10 the killed run logged after its checkpoint are not doubled
            with open(os.path.join(d, 'w2', 'metrics.jsonl')) as f:
                iters = [json.loads(line)['iter'] for line in f]
            self.assertEqual(iters, list(range(1, 13)))


if __name__ == '__main__':
    unittest.main()
