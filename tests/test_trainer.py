"""
The Trainer's minGPT contract: config fields and defaults, callbacks, the attributes callbacks
read, and a run that actually lowers the loss. Then the additive features that run in one
process: schedule, accumulation, precision, compile, evaluation, observability, divergence.
(Checkpoint/resume: test_trainer_resume.py; DDP: test_trainer_ddp.py; the schedule, checkpoint
files and metrics log on their own: test_schedule.py, test_checkpoint.py, test_metrics.py.)
"""

import contextlib
import io
import json
import os
import shutil
import tempfile
import unittest
import warnings
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mingpt import metrics
from mingpt.checkpoint import find_checkpoint, read_checkpoint
from mingpt.errors import CheckpointError, ConfigError
from mingpt.hardware import default_num_workers, fast_dtype
from mingpt.model import GPT
from mingpt.schedule import get_lr
from mingpt.trainer import Trainer
from mingpt.utils import set_seed


class RepeatDataset(Dataset):
    """ sequences that repeat a random token: trivially learnable, so the loss must fall """

    def __init__(self, n=256, length=8, vocab=5):
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, vocab, (n, 1), generator=g).repeat(1, length + 1)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i, :-1], self.data[i, 1:]


def tiny_model(vocab=5, block=8, dropout=None):
    config = GPT.get_default_config()
    config.model_type = 'gpt-nano'
    config.vocab_size = vocab
    config.block_size = block
    if dropout is not None:
        config.embd_pdrop = config.resid_pdrop = config.attn_pdrop = dropout
    return GPT(config)


class MaskedDataset(Dataset):
    """ random tokens whose targets are -1 at random places: micro-batches count unequal targets """

    def __init__(self, n=128, length=8, vocab=5):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (n, length), generator=g)
        self.y = torch.randint(0, vocab, (n, length), generator=g)
        self.y[torch.rand(n, length, generator=g) < 0.4] = -1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def quiet_config(**kw):
    C = Trainer.get_default_config()
    C.device = 'cpu'
    C.num_workers = 0
    C.progress_bar = False
    C.merge_from_dict(kw)
    return C


class TestTrainerConfig(unittest.TestCase):

    def test_defaults_are_mingpts(self):
        C = Trainer.get_default_config()
        self.assertEqual(C.device, 'auto')
        self.assertIsNone(C.max_iters)
        self.assertEqual(C.batch_size, 64)
        self.assertEqual(C.learning_rate, 3e-4)
        self.assertEqual(C.betas, (0.9, 0.95))
        self.assertEqual(C.weight_decay, 0.1)
        self.assertEqual(C.grad_norm_clip, 1.0)
        self.assertTrue(hasattr(C, 'num_workers'))

    def test_worker_count_fits_the_machine(self):
        n_cpu = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        n = default_num_workers()
        self.assertGreaterEqual(n, 0)
        self.assertLessEqual(n, max(0, n_cpu - 2))


class TestTrainerRun(unittest.TestCase):

    def setUp(self):
        set_seed(0)
        self.model = tiny_model()
        C = Trainer.get_default_config()
        C.device = 'cpu'
        C.max_iters = 30
        C.batch_size = 16
        C.learning_rate = 3e-3
        self.trainer = Trainer(C, self.model, RepeatDataset())

    def test_callbacks_see_progress_and_loss_falls(self):
        seen = []

        def record(trainer):
            self.assertIs(trainer.model, self.model)
            self.assertIsInstance(trainer.optimizer, torch.optim.AdamW)
            self.assertEqual(trainer.device, 'cpu')
            self.assertGreaterEqual(trainer.iter_dt, 0.0)
            seen.append((trainer.iter_num, trainer.loss.item()))

        self.trainer.add_callback('on_batch_end', record)
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # e.g. a DataLoader complaining about too many workers
            self.trainer.run()
        self.assertEqual([i for i, _ in seen], list(range(30)))
        self.assertEqual(self.trainer.iter_num, 30)
        first, last = seen[0][1], sum(l for _, l in seen[-5:]) / 5
        self.assertLess(last, 0.5 * first)

    def test_stop_from_a_callback_ends_the_run_with_a_last_eval_and_checkpoint(self):
        for event, at in (('on_batch_end', 7), ('on_eval_end', 10)):
            with self.subTest(event=event), tempfile.TemporaryDirectory() as d:
                C = quiet_config(max_iters=100, batch_size=8, eval_interval=5, eval_iters=1,
                                 checkpoint_interval=50, work_dir=d)
                trainer = Trainer(C, tiny_model(), RepeatDataset(), val_dataset=RepeatDataset(n=16))
                evals = []
                trainer.add_callback('on_eval_end', lambda t: evals.append(t.iter_num))
                # on_batch_end sees iter_num before it counts the iteration just done
                done = (lambda t: t.iter_num + 1) if event == 'on_batch_end' else (lambda t: t.iter_num)
                trainer.add_callback(event, lambda t: t.stop() if done(t) == at else None)
                trainer.run()
                self.assertEqual(trainer.iter_num, at)
                self.assertEqual(evals[-1], at)  # the last iteration was evaluated, once
                self.assertEqual(evals.count(at), 1)
                self.assertEqual(read_checkpoint(find_checkpoint(os.path.join(d, 'ckpt')))[1]['iter_num'], at)

    def test_set_callback_replaces_add_callback_appends(self):
        calls = []
        self.trainer.add_callback('on_batch_end', lambda t: calls.append('a'))
        self.trainer.add_callback('on_batch_end', lambda t: calls.append('b'))
        self.trainer.trigger_callbacks('on_batch_end')
        self.assertEqual(calls, ['a', 'b'])
        self.trainer.set_callback('on_batch_end', lambda t: calls.append('c'))
        self.trainer.trigger_callbacks('on_batch_end')
        self.assertEqual(calls, ['a', 'b', 'c'])



class TestConfigValidation(unittest.TestCase):

    def test_new_fields_default_to_mingpts_behaviour(self):
        C = Trainer.get_default_config()
        self.assertIsNone(C.lr_schedule)
        self.assertEqual(C.warmup_iters, 0)
        self.assertEqual(C.grad_accum_steps, 1)
        self.assertEqual(C.dtype, 'float32')
        self.assertFalse(C.compile)
        self.assertIsNone(C.work_dir)
        self.assertFalse(C.resume)
        self.assertIsNone(C.data_seed)

    def test_user_errors_are_clear_exceptions(self):
        model = tiny_model()
        cases = [
            (dict(dtype='float16'), "CUDA"),          # no GradScaler on CPU
            (dict(dtype='fp8'), "unknown dtype"),
            (dict(lr_schedule='cosine'), "lr_decay_iters or max_iters"),
            (dict(lr_schedule='linear'), r"lr_schedule='linear' cannot work: set it to None \(constant\), 'cosine' or 'wsd'"),
            (dict(grad_accum_steps=0), "grad_accum_steps"),
            (dict(resume=True), "work_dir"),
            (dict(data_seed=-1), "data_seed"),
            (dict(batch_size=0), r"batch_size=0 cannot work: set it to an int >= 1"),
            (dict(max_iters=-5), r"max_iters=-5 cannot work: set it to an int >= 0, or None"),
            (dict(max_iters=2.5), r"max_iters=2.5"),
            (dict(learning_rate='fast'), r"learning_rate='fast' cannot work: set it to a number > 0"),
            (dict(learning_rate=0), r"learning_rate=0"),
            (dict(learning_rate=float('nan')), r"learning_rate=nan"),
            (dict(betas=(0.9,)), r"betas=\(0.9,\) cannot work: set it to two numbers"),
            (dict(weight_decay=-0.1), r"weight_decay"),
            (dict(eval_iters=0), r"eval_iters=0"),
            (dict(warmup_iters=True), r"warmup_iters=True"),
            (dict(log_interval=-1), r"log_interval"),
            (dict(resume='yes'), r"resume='yes' cannot work: set it to False, True or 'auto'"),
            (dict(progress_bar='on'), r"progress_bar"),
            (dict(device='gpu'), r"device='gpu' is not a device torch knows"),
        ]
        for kw, message in cases:
            with self.subTest(**kw), self.assertRaisesRegex(ConfigError, message):
                Trainer(quiet_config(**kw), model, RepeatDataset())
        # and what stays allowed: minGPT's defaults, None where None has a meaning, max_iters=0
        for kw in (dict(max_iters=0), dict(grad_norm_clip=None), dict(grad_norm_clip=0), dict(log_interval=None),
                   dict(num_workers=2), dict(learning_rate=1), dict(betas=[0.9, 0.99]), dict(min_lr=0)):
            with self.subTest(**kw):
                Trainer(quiet_config(**kw), model, RepeatDataset())

    def test_old_config_without_new_fields_still_runs(self):
        from mingpt.utils import CfgNode
        C = CfgNode(device='cpu', num_workers=0, max_iters=2, batch_size=4, learning_rate=3e-4,
                    betas=(0.9, 0.95), weight_decay=0.1, grad_norm_clip=1.0)
        trainer = Trainer(C, tiny_model(), RepeatDataset())
        trainer.run()
        self.assertEqual(trainer.iter_num, 2)


class TestLearningRateSchedule(unittest.TestCase):

    def test_trainer_applies_the_schedule_and_exposes_lr(self):
        set_seed(0)
        C = quiet_config(max_iters=8, batch_size=4, learning_rate=1e-2, lr_schedule='cosine',
                         warmup_iters=2, min_lr=1e-3)
        trainer = Trainer(C, tiny_model(), RepeatDataset())
        seen = []
        trainer.add_callback('on_batch_end', lambda t: seen.append(
            (t.lr, [g['lr'] for g in t.optimizer.param_groups])))
        trainer.run()
        for i, (lr, group_lrs) in enumerate(seen):
            self.assertAlmostEqual(lr, get_lr(i, C))
            self.assertEqual(group_lrs, [lr, lr])
        self.assertAlmostEqual(seen[0][0], 5e-3)
        self.assertLess(seen[-1][0], 2e-3)

    def test_default_leaves_the_learning_rate_alone(self):
        set_seed(0)
        trainer = Trainer(quiet_config(max_iters=3, batch_size=4), tiny_model(), RepeatDataset())
        trainer.run()
        self.assertEqual(trainer.lr, 3e-4)
        self.assertEqual([g['lr'] for g in trainer.optimizer.param_groups], [3e-4, 3e-4])


class TestGradientAccumulation(unittest.TestCase):
    """ 4 micro-batches of 8 rows give the gradient of one batch of 32, with -1 targets unevenly spread """

    def grads_and_losses(self, batch_size, accum, iters, **kw):
        set_seed(0)
        model = tiny_model(dropout=0.0)
        C = quiet_config(max_iters=iters, batch_size=batch_size, grad_accum_steps=accum,
                         learning_rate=1e-3, **kw)
        trainer = Trainer(C, model, MaskedDataset())
        losses, grads = [], []
        trainer.add_callback('on_batch_end', lambda t: losses.append(t.loss.item()))
        trainer.add_callback('on_batch_end', lambda t: grads.append(
            [p.grad.clone() for p in t.model.parameters()]) if t.iter_num == 0 else None)
        trainer.run()
        return grads[0], losses

    def check(self, **kw):
        g_big, l_big = self.grads_and_losses(32, 1, 3, **kw)
        g_acc, l_acc = self.grads_and_losses(8, 4, 3, **kw)
        for a, b in zip(g_big, g_acc):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        self.assertAlmostEqual(l_big[0], l_acc[0], delta=1e-6)
        # later steps start from weights that differ by rounding, which Adam's 1/sqrt(v) magnifies
        # where a gradient is ~0: the losses stay close, the weights are not compared bit for bit
        for a, b in zip(l_big, l_acc):
            self.assertAlmostEqual(a, b, delta=1e-5)

    def test_minGPT_sampler(self):
        self.check()

    def test_seeded_sampler(self):
        self.check(data_seed=123)


class TestMixedPrecisionAndCompile(unittest.TestCase):

    def test_bfloat16_autocast_on_cpu(self):
        set_seed(0)
        model = tiny_model()
        dtypes = []
        model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        trainer = Trainer(quiet_config(max_iters=20, batch_size=16, learning_rate=3e-3, dtype='bfloat16'),
                          model, RepeatDataset())
        losses = []
        trainer.add_callback('on_batch_end', lambda t: losses.append(t.loss.item()))
        trainer.run()
        self.assertEqual(set(dtypes), {torch.bfloat16})
        self.assertEqual(model.lm_head.weight.dtype, torch.float32)  # master weights stay fp32
        self.assertLess(sum(losses[-3:]) / 3, 0.7 * losses[0])

    def test_auto_dtype_is_bfloat16_only_with_bf16_hardware(self):
        for avx512_bf16, amx, expected in [(False, False, 'float32'), (True, False, 'bfloat16'),
                                          (False, True, 'bfloat16')]:
            with mock.patch.object(torch.cpu, '_is_avx512_bf16_supported', lambda: avx512_bf16, create=True), \
                    mock.patch.object(torch.cpu, '_is_amx_tile_supported', lambda: amx, create=True):
                self.assertEqual(fast_dtype('cpu'), expected)
                trainer = Trainer(quiet_config(max_iters=1, dtype='auto'), tiny_model(), RepeatDataset())
                self.assertEqual(trainer.config.dtype, expected)  # resolved once, then used as given
        self.assertEqual(fast_dtype('mps'), 'float32')
        with self.assertRaisesRegex(ValueError, "or 'auto'"):
            Trainer(quiet_config(dtype='fp8'), tiny_model(), RepeatDataset())

    def test_attention_runs_in_fp32_under_cpu_autocast(self):
        # torch's CPU attention kernel is slow in bf16: under autocast it gets fp32 inputs, and the
        # result equals fp32 attention on the bf16-rounded q, k, v
        import mingpt.model as model_module
        set_seed(0)
        model = tiny_model()
        calls = []
        real_sdpa = F.scaled_dot_product_attention

        def recording_sdpa(q, k, v, **kwargs):
            calls.append((q.dtype, torch.is_autocast_enabled('cpu')))
            return real_sdpa(q, k, v, **kwargs)
        x = torch.randint(0, 5, (2, 8))
        with mock.patch.object(model_module.F, 'scaled_dot_product_attention', recording_sdpa):
            with torch.autocast('cpu', dtype=torch.bfloat16):
                logits, loss = model(x, x)
            loss.backward()  # and gradients flow through the fp32 attention
            self.assertEqual(set(calls), {(torch.float32, False)})
            calls.clear()
            model(x)  # without autocast: plain fp32, unchanged
            self.assertEqual(set(calls), {(torch.float32, False)})
        self.assertEqual(logits.dtype, torch.bfloat16)
        self.assertTrue(all(p.grad is not None for p in model.parameters()))

    def test_compiled_training_writes_plain_checkpoints(self):
        # the 'eager' backend runs torch.compile's graph capture without inductor's C++ build,
        # which takes minutes on this 2-core machine; the wrapper and its key prefix are the same
        set_seed(0)
        model = tiny_model()
        with tempfile.TemporaryDirectory() as d:
            C = quiet_config(max_iters=2, batch_size=4, compile=True, compile_backend='eager', work_dir=d)
            trainer = Trainer(C, model, RepeatDataset())
            trainer.run()
            self.assertTrue(hasattr(trainer._train_model, '_orig_mod'))  # it really was compiled
            sd, state = read_checkpoint(os.path.join(d, 'ckpt'))
            self.assertFalse(any('_orig_mod' in k for k in sd))
            fresh = tiny_model()
            fresh.load_state_dict(sd, strict=True)  # loads into an uncompiled model
            for a, b in zip(fresh.parameters(), model.parameters()):
                self.assertTrue(torch.equal(a, b))
            self.assertEqual(state['iter_num'], 2)


class TestEvaluation(unittest.TestCase):

    def test_periodic_eval_tracks_best_and_saves_it(self):
        set_seed(0)
        model = tiny_model()
        with tempfile.TemporaryDirectory() as d:
            C = quiet_config(max_iters=12, batch_size=16, learning_rate=3e-3, eval_interval=5, eval_iters=2,
                             work_dir=d, checkpoint_interval=100)
            trainer = Trainer(C, model, RepeatDataset(), val_dataset=RepeatDataset(n=64))
            evals, saves = [], []
            trainer.add_callback('on_eval_end', lambda t: evals.append((t.iter_num, t.val_loss, t.best_val_loss)))
            trainer.add_callback('on_checkpoint', lambda t: saves.append(t.iter_num))
            trainer.run()
            self.assertEqual([i for i, _, _ in evals], [5, 10, 12])  # every 5, and at the end
            self.assertEqual(trainer.best_val_loss, min(v for _, v, _ in evals))
            self.assertLess(evals[-1][1], evals[0][1])
            self.assertAlmostEqual(trainer.evaluate(), evals[-1][1], places=6)  # same batches each time
            _, best = read_checkpoint(os.path.join(d, 'ckpt_best'))
            best_iter = min(evals, key=lambda e: e[1])[0]
            self.assertEqual(best['iter_num'], best_iter)
            self.assertEqual(best['best_val_loss'], trainer.best_val_loss)
            self.assertIn(best_iter, saves)  # ckpt_best ...
            self.assertEqual(saves[-1], 12)  # ... and the final ckpt
            # ckpt_best is for using the model: the weights and the progress, no optimizer state
            self.assertIsNone(best['optimizer'])
            self.assertIsNone(best['rng'])
            self.assertIsNotNone(read_checkpoint(os.path.join(d, 'ckpt'))[1]['optimizer'])
            size = lambda name: sum(f.stat().st_size for f in Path(d, name).iterdir())
            weights = Path(d, 'ckpt', 'model.safetensors').stat().st_size
            self.assertLess(size('ckpt_best'), weights + 5000)
            self.assertGreater(size('ckpt'), 2.5 * weights)  # + AdamW's two moments
            best_sd, _ = read_checkpoint(os.path.join(d, 'ckpt_best'))
            loaded = GPT.from_pretrained(os.path.join(d, 'ckpt_best'))
            for k, v in loaded.state_dict().items():
                self.assertTrue(torch.equal(v, best_sd[k]), k)
            # and it cannot be mistaken for a checkpoint to resume from
            os.makedirs(os.path.join(d, 'again'))
            shutil.copytree(os.path.join(d, 'ckpt_best'), os.path.join(d, 'again', 'ckpt'))
            with self.assertRaisesRegex(CheckpointError, 'weights only'):
                Trainer(quiet_config(work_dir=os.path.join(d, 'again'), resume=True), tiny_model(), RepeatDataset())
            with open(os.path.join(d, 'metrics.jsonl')) as f:
                records = [json.loads(line) for line in f]
            self.assertEqual([r['iter'] for r in records if 'val_loss' in r], [5, 10, 12])
            self.assertEqual([r['iter'] for r in records if 'loss' in r], list(range(1, 13)))

    def test_eval_weights_every_counted_target_equally(self):
        set_seed(0)
        model = tiny_model()
        val = MaskedDataset(n=20)
        trainer = Trainer(quiet_config(batch_size=3, eval_iters=10), model, RepeatDataset(), val_dataset=val)
        loss = trainer.evaluate()
        model.eval()
        with torch.no_grad():
            logits, _ = model(val.x)
            expected = torch.nn.functional.cross_entropy(logits.view(-1, 5), val.y.view(-1), ignore_index=-1)
        self.assertAlmostEqual(loss, expected.item(), places=5)
        self.assertTrue(model.training is False)  # evaluate restores the mode it found


class PoisonedGPT(GPT):
    """ returns a NaN loss once poisoned: divergence on demand """
    poisoned = False

    def forward(self, idx, targets=None, **kw):
        logits, loss = super().forward(idx, targets, **kw)
        return logits, loss * float('nan') if self.poisoned else loss


class TestObservability(unittest.TestCase):

    def test_metrics_log_bar_and_plot(self):
        set_seed(0)
        with tempfile.TemporaryDirectory() as d:
            C = quiet_config(max_iters=4, batch_size=4, work_dir=d, log_interval=2, progress_bar=True)
            trainer = Trainer(C, tiny_model(), RepeatDataset())
            err = io.StringIO()
            # with the bar on, no timed lines however often they would come: only every log_interval
            with self.assertLogs('mingpt', 'INFO') as logs, contextlib.redirect_stderr(err), \
                    mock.patch.object(metrics, 'PLAIN_PROGRESS_EVERY', 0.0):
                trainer.run()
            self.assertTrue(any('iter 2/4: loss' in line and 'tokens/s' in line for line in logs.output))
            self.assertEqual([line.split('iter ')[1][:3] for line in logs.output if ': loss' in line], ['2/4', '4/4'])
            self.assertIn('4/4', err.getvalue())
            self.assertIn('loss=', err.getvalue())
            with open(os.path.join(d, 'metrics.jsonl')) as f:
                records = [json.loads(line) for line in f]
            self.assertEqual([r['iter'] for r in records], [1, 2, 3, 4])
            self.assertEqual(set(records[0]), {'iter', 'loss', 'lr', 'tokens_per_sec', 'time'})
            self.assertGreater(records[0]['tokens_per_sec'], 0)
            png = os.path.join(d, 'loss.png')
            trainer.plot(png)
            with open(png, 'rb') as f:
                self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')

    def test_without_the_bar_a_plain_progress_line_with_eta(self):
        set_seed(0)
        C = quiet_config(max_iters=6, batch_size=4, log_interval=None, progress_bar=False)
        trainer = Trainer(C, tiny_model(), RepeatDataset())
        with self.assertLogs('mingpt.metrics', 'INFO') as logs, \
                mock.patch.object(metrics, 'PLAIN_PROGRESS_EVERY', 0.0):  # a line after every iteration
            trainer.run()
        lines = [line for line in logs.output if ': loss' in line]
        self.assertEqual(len(lines), 6)
        self.assertRegex(lines[0], r'iter 1/6: loss [\d.]+, lr [\d.e+-]+, \d+ tokens/s, ETA \d+s')
        self.assertRegex(lines[-1], r'iter 6/6: .*ETA 0s')
        # and at the real cadence, a run of a second or two says nothing more than its log_interval lines
        trainer = Trainer(quiet_config(max_iters=3, batch_size=4, log_interval=3), tiny_model(), RepeatDataset())
        with self.assertLogs('mingpt.metrics', 'INFO') as logs:
            trainer.run()
        self.assertEqual([line for line in logs.output if ': loss' in line and 'iter 3/3' not in line], [])

    def test_nan_before_any_checkpoint_does_not_point_to_one(self):
        set_seed(0)
        config = GPT.get_default_config()
        config.model_type, config.vocab_size, config.block_size = 'gpt-nano', 5, 8
        model = PoisonedGPT(config)
        model.poisoned = True
        with tempfile.TemporaryDirectory() as d:
            trainer = Trainer(quiet_config(max_iters=10, batch_size=4, work_dir=d), model, RepeatDataset())
            with self.assertRaises(FloatingPointError) as ctx:
                trainer.run()
            self.assertNotIn('last good checkpoint', str(ctx.exception))
            self.assertIn('no checkpoint had been written yet', str(ctx.exception))
            self.assertIsNone(find_checkpoint(os.path.join(d, 'ckpt')))
        with self.assertRaises(FloatingPointError) as ctx:  # without a work_dir: no word on checkpoints
            Trainer(quiet_config(max_iters=10, batch_size=4), model, RepeatDataset()).run()
        self.assertNotIn('checkpoint', str(ctx.exception))

    def test_without_matplotlib_the_run_ends_well_with_one_warning(self):
        import logging
        from tests.test_metrics import without_matplotlib
        set_seed(0)
        with tempfile.TemporaryDirectory() as d, without_matplotlib(), \
                self.assertLogs('mingpt', logging.WARNING) as logs:
            C = quiet_config(max_iters=4, batch_size=4, work_dir=d, eval_interval=2, eval_iters=1)
            trainer = Trainer(C, tiny_model(), RepeatDataset(), val_dataset=RepeatDataset(n=8))
            # as chargpt does: a plot after every evaluation, and one at the end
            trainer.add_callback('on_eval_end', lambda t: t.plot(os.path.join(d, 'loss.png')))
            trainer.run()
            self.assertIsNone(trainer.plot(os.path.join(d, 'loss.png')))
            self.assertEqual(trainer.iter_num, 4)
            self.assertFalse(os.path.exists(os.path.join(d, 'loss.png')))
        self.assertEqual(len(logs.records), 1)
        self.assertIn('pip install matplotlib', logs.output[0])

    def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(self):
        set_seed(0)
        config = GPT.get_default_config()
        config.model_type, config.vocab_size, config.block_size = 'gpt-nano', 5, 8
        model = PoisonedGPT(config)
        with tempfile.TemporaryDirectory() as d:
            trainer = Trainer(quiet_config(max_iters=10, batch_size=4, work_dir=d, checkpoint_interval=1),
                              model, RepeatDataset())

            def poison(t):
                if t.iter_num == 2:
                    model.poisoned = True
            trainer.add_callback('on_batch_end', poison)
            with self.assertRaisesRegex(FloatingPointError, r"loss is nan at iteration 3.*ckpt"):
                trainer.run()
            sd, state = read_checkpoint(os.path.join(d, 'ckpt'))
            self.assertEqual(state['iter_num'], 3)
            for k, v in model.state_dict().items():
                self.assertTrue(torch.isfinite(v).all())
                self.assertTrue(torch.equal(sd[k], v))  # the poisoned step never reached the weights


if __name__ == '__main__':
    unittest.main()
