"""
Checkpoint directories on their own: what write_checkpoint writes and read_checkpoint gives back
(wrappers' prefixes stripped, tied weights stored once), the .old fallback, and clear errors for files
that do not belong together. (RNG capture: test_resume.py; resuming a Trainer: test_trainer_resume.py.)
"""

import fractions
import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mingpt.checkpoint import (CHECKPOINT_VERSION, SHARDED, check_one_save, clean_state_dict, find_checkpoint,
                               read_checkpoint, write_checkpoint)
from mingpt.errors import CheckpointError
from mingpt.model import GPT
from tests.common import TempDirTestCase, tiny_gpt


def state(iter_num=0):
    return {'version': CHECKPOINT_VERSION, 'iter_num': iter_num}


class TestCheckpointDirectory(TempDirTestCase):

    def test_prefixes_are_stripped(self):
        sd = {'_orig_mod.lm_head.weight': 1, 'module._orig_mod.transformer.wte.weight': 2, 'a.b': 3}
        self.assertEqual(clean_state_dict(sd), {'lm_head.weight': 1, 'transformer.wte.weight': 2, 'a.b': 3})
        model = tiny_gpt()
        write_checkpoint(os.path.join(self.tmp, 'c'), torch.compile(model), state())
        sd, _ = read_checkpoint(os.path.join(self.tmp, 'c'))
        self.assertEqual(set(sd), set(model.state_dict()))

    def test_tied_weights_are_stored_once_and_come_back_tied(self):
        model = tiny_gpt(tie_weights=True)
        ckpt = self.tmp / 'ckpt'
        write_checkpoint(ckpt, model, state(3))
        self.assertEqual(sorted(os.listdir(ckpt)), ['config.json', 'model.safetensors', 'trainer.pt'])
        self.assertEqual(json.loads((ckpt / 'config.json').read_text())['model']['n_embd'], 32)
        with safe_open(ckpt / 'model.safetensors', 'pt') as f:
            self.assertEqual(len(list(f.keys())), len(model.state_dict()) - 1)
        sd, st = read_checkpoint(ckpt)
        self.assertEqual(st['iter_num'], 3)
        fresh = tiny_gpt(tie_weights=True, seed=1)
        fresh.load_state_dict(sd, strict=True)
        self.assertIs(fresh.lm_head.weight, fresh.transformer.wte.weight)
        self.assertTrue(torch.equal(fresh.lm_head.weight, model.lm_head.weight))

    def test_rewrite_replaces_whole_and_old_is_the_fallback(self):
        ckpt = str(self.tmp / 'ckpt')
        self.assertIsNone(find_checkpoint(ckpt))
        write_checkpoint(ckpt, tiny_gpt(), state(1))
        write_checkpoint(ckpt, tiny_gpt(), state(2))
        self.assertEqual(sorted(os.listdir(self.tmp)), ['ckpt'])  # no .tmp or .old left behind
        self.assertEqual(read_checkpoint(ckpt)[1]['iter_num'], 2)
        os.replace(ckpt, ckpt + '.old')  # a kill between the two renames
        self.assertEqual(find_checkpoint(ckpt), ckpt + '.old')

    def test_files_of_two_saves_or_another_version_are_errors(self):
        a, b = str(self.tmp / 'a'), str(self.tmp / 'b')
        write_checkpoint(a, tiny_gpt(), state(1))
        write_checkpoint(b, tiny_gpt(), state(2))
        os.replace(os.path.join(b, 'trainer.pt'), os.path.join(a, 'trainer.pt'))
        with self.assertRaisesRegex(CheckpointError, "mixes files of two saves"):
            read_checkpoint(a)
        write_checkpoint(b, tiny_gpt(), {'version': CHECKPOINT_VERSION + 1, 'iter_num': 0})
        with self.assertRaisesRegex(CheckpointError, f"version {CHECKPOINT_VERSION}"):
            read_checkpoint(b)


    def test_trainer_state_with_python_objects_is_refused(self):
        ckpt = self.tmp / 'ckpt'
        write_checkpoint(ckpt, tiny_gpt(), state(0))
        # a plain pickle of an object: unpickling it would call fractions.Fraction, i.e. run code
        torch.save({**state(0), 'x': fractions.Fraction(1, 3)}, ckpt / 'trainer.pt')
        with self.assertRaises(CheckpointError) as ctx:
            read_checkpoint(ckpt)
        message = str(ctx.exception)
        self.assertIn('refused to load', message)
        self.assertIn('fractions.Fraction', message)
        self.assertIn('code that could run on load', message)
        self.assertNotIn('weights_only', message)


def without_save_ids(ckpt):
    """ rewrite the checkpoint at ckpt as a mingpt without save ids wrote it """
    path = os.path.join(ckpt, 'model.safetensors')
    with safe_open(path, 'pt') as f:
        metadata = {k: v for k, v in f.metadata().items() if k != 'save_id'}
    save_file(load_file(path), path, metadata=metadata)
    st = torch.load(os.path.join(ckpt, 'trainer.pt'), weights_only=True)
    del st['save_id']
    torch.save(st, os.path.join(ckpt, 'trainer.pt'))
    with open(os.path.join(ckpt, 'config.json')) as f:
        info = json.load(f)
    del info['save_id']
    with open(os.path.join(ckpt, 'config.json'), 'w') as f:
        json.dump(info, f)


class TestOneSave(TempDirTestCase):
    """ the files of one save share its id: a file copied in from another run is an error naming both """

    def two_runs(self, optimizer=False):
        """ two checkpoints of the same model at the same iteration, as two runs of one command write """
        for name in ('a', 'b'):
            model = tiny_gpt(seed=0 if name == 'a' else 1)
            opt = torch.optim.AdamW(model.parameters()) if optimizer else None
            write_checkpoint(self.tmp / name, model, state(4), optimizer=opt)
        return self.tmp / 'a', self.tmp / 'b'

    def test_every_file_carries_the_save_id(self):
        a, _ = self.two_runs()
        _, st = read_checkpoint(a)
        self.assertRegex(st['save_id'], r'^[0-9a-f]{16}-4$')
        with safe_open(a / 'model.safetensors', 'pt') as f:
            self.assertEqual(f.metadata()['save_id'], st['save_id'])
        self.assertEqual(json.loads((a / 'config.json').read_text())['save_id'], st['save_id'])

    def test_a_file_from_another_run_is_an_error_naming_both(self):
        a, b = self.two_runs()
        backup = self.tmp / 'backup'
        shutil.copytree(a, backup)
        for name in ('model.safetensors', 'trainer.pt', 'config.json'):
            with self.subTest(copied=name):
                shutil.rmtree(a)
                shutil.copytree(backup, a)
                shutil.copy(b / name, a / name)
                other = 'model.safetensors' if name == 'trainer.pt' else name
                for read in (read_checkpoint, GPT.from_pretrained):
                    with self.assertRaises(CheckpointError) as ctx:
                        read(a)
                    message = str(ctx.exception)
                    self.assertIn('mixes files of two saves', message)
                    self.assertIn(f'{other} is from save', message)
                    self.assertIn('trainer.pt from save', message)
        shutil.rmtree(a)
        shutil.copytree(backup, a)
        self.assertEqual(read_checkpoint(a)[1]['iter_num'], 4)  # the files of one save are fine
        self.assertIsInstance(GPT.from_pretrained(a), GPT)

    def test_a_sharded_state_from_another_run_is_an_error(self):
        a, b = self.two_runs(optimizer=True)
        self.assertTrue((a / SHARDED).is_dir())
        check_one_save(a)
        shutil.rmtree(a / SHARDED)
        shutil.copytree(b / SHARDED, a / SHARDED)
        with self.assertRaisesRegex(CheckpointError, f"{SHARDED}/ is from save .* and trainer.pt from save"):
            check_one_save(a)

    def test_a_checkpoint_without_save_ids_is_read_with_a_warning(self):
        a, b = self.two_runs()
        without_save_ids(a)
        with self.assertLogs('mingpt.checkpoint', 'WARNING') as logs:
            sd, st = read_checkpoint(a)
        self.assertIn('no save ids', logs.output[0])
        self.assertEqual(st['iter_num'], 4)
        self.assertTrue(torch.equal(sd['lm_head.weight'], tiny_gpt(seed=0).lm_head.weight))
        with self.assertLogs('mingpt.checkpoint', 'WARNING'):
            self.assertIsInstance(GPT.from_pretrained(a), GPT)
        # a file with an id beside files without one cannot be of the same save
        shutil.copy(b / 'trainer.pt', a / 'trainer.pt')
        with self.assertRaisesRegex(CheckpointError, r"model.safetensors is from no save \(it has no save id\)"):
            read_checkpoint(a)
