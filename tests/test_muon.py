"""
Tests for mingpt/muon.py and the Trainer's optimizer='muon': Newton-Schulz makes a matrix near-
orthogonal with the singular vectors of its input; a Muon step is torch.optim.Muon's (which runs the
iteration in bf16: within its rounding) and the AdamW groups are torch.optim.AdamW's; only the blocks'
matrices take Muon; both groups follow the learning-rate schedule; a resumed run ends bit-identical to
a straight one; 2 DDP or FSDP processes take the steps of 1, and FSDP's sharded state resumes.
"""

import io
import json
import os
import shutil
import tempfile
import unittest

import torch
import torch.nn as nn
from safetensors.torch import load_file

from mingpt.errors import ConfigError
from mingpt.muon import Muon, orthogonalize
from mingpt.schedule import get_lr, get_muon_momentum
from mingpt.trainer import Trainer
from tests.common import ProcessRunsTestCase, TempDirTestCase, run_train_script, slow
from tests.test_trainer import RepeatDataset, quiet_config
from tests.test_trainer_resume import tiny_model, train


class TestNewtonSchulz(unittest.TestCase):

    def test_output_is_near_orthogonal_with_the_inputs_singular_vectors(self):
        torch.manual_seed(0)
        for shape in [(64, 32), (32, 64), (192, 64)]:
            G = torch.randn(shape) * 1e-3  # a gradient's scale: the result does not depend on it
            O = orthogonalize(G)
            U, S, Vh = torch.linalg.svd(G, full_matrices=False)
            with self.subTest(shape=shape):
                self.assertEqual((O.shape, O.dtype), (G.shape, torch.float32))
                self.assertGreater(S.max() / S.min(), 4.0)  # the input is far from orthogonal...
                sv = torch.linalg.svdvals(O)
                self.assertGreater(sv.min().item(), 0.6)  # ...its image near: every singular value ~1
                self.assertLess(sv.max().item(), 1.25)
                ref = U @ Vh  # the exact orthogonalization
                self.assertLess(((O - ref).norm() / ref.norm()).item(), 0.3)


def _run(opt_factory, params, grads):
    """ a step per gradient list, from a copy of params; -> the parameters after each step """
    params = [p.detach().clone().requires_grad_() for p in params]
    opt = opt_factory(params)
    out = []
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out, opt


class TestMuonStep(unittest.TestCase):

    def setUp(self):
        g = torch.Generator().manual_seed(0)
        self.params = [torch.randn(48, 32, generator=g) * 0.1, torch.randn(32, 96, generator=g) * 0.1]
        self.grads = [[torch.randn(p.shape, generator=g) * 1e-2 for p in self.params] for _ in range(5)]

    def test_muon_step_is_torch_optim_muons(self):
        mine, _ = _run(lambda ps: Muon([{'params': ps, 'muon': True}], lr=0.02, momentum=0.95, weight_decay=0.1),
                       self.params, self.grads)
        ref, _ = _run(lambda ps: torch.optim.Muon(ps, lr=0.02, momentum=0.95, weight_decay=0.1,
                                                  adjust_lr_fn='original'), self.params, self.grads)
        for step, (a, b) in enumerate(zip(mine, ref)):
            for p0, pa, pb in zip(self.params, a, b):
                moved_a, moved_b = pa - p0, pb - p0
                # torch's Newton-Schulz runs in bf16: its updates differ from ours by that rounding
                self.assertLess(((moved_a - moved_b).norm() / moved_b.norm()).item(), 0.03, step)

    def test_adamw_groups_are_torch_adamws(self):
        params = self.params + [torch.randn(32) * 0.1]
        grads = [gs + [torch.randn(32) * 1e-2] for gs in self.grads]
        mine, _ = _run(lambda ps: Muon([{'params': ps[:1], 'muon': False, 'weight_decay': 0.1},
                                        {'params': ps[1:], 'muon': False}], lr=1e-2, betas=(0.9, 0.95)),
                       params, grads)
        ref, _ = _run(lambda ps: torch.optim.AdamW([{'params': ps[:1], 'weight_decay': 0.1},
                                                    {'params': ps[1:], 'weight_decay': 0.0}], lr=1e-2,
                                                   betas=(0.9, 0.95), foreach=False), params, grads)
        for a, b in zip(mine, ref):
            for pa, pb in zip(a, b):
                torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)

    def test_state_dict_resume_is_bit_exact(self):
        def make(ps):
            return Muon([{'params': ps[:1], 'muon': True}, {'params': ps[1:], 'muon': False, 'lr': 1e-3}])
        straight, _ = _run(make, self.params, self.grads)
        first, opt = _run(make, self.params, self.grads[:2])
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)  # what a checkpoint holds: plain tensors and values
        resumed, _ = _run(lambda ps: _loaded(make(ps), state), first[-1], self.grads[2:])
        for a, b in zip(straight[-1], resumed[-1]):
            self.assertTrue(torch.equal(a, b))

    def test_only_matrices_take_muon(self):
        with self.assertRaisesRegex(ConfigError, r'2-D weight matrices only.*\(32,\)'):
            Muon([{'params': [torch.zeros(32, requires_grad=True)], 'muon': True}])


def _loaded(opt, state):
    opt.load_state_dict(state)
    return opt


class TestTrainerWithMuon(TempDirTestCase):

    def test_the_blocks_matrices_take_muon_the_rest_adamw(self):
        C = quiet_config(optimizer='muon', muon_lr=0.05, learning_rate=1e-3)
        for tie in (False, True):
            model = tiny_model(tie_weights=tie)
            opt = model.configure_optimizers(C)
            with self.subTest(tie_weights=tie):
                self.assertIsInstance(opt, Muon)
                muon = [g for g in opt.param_groups if g['muon']]
                self.assertEqual(len(muon), 1)
                matrices = {id(m.weight) for m in model.transformer.h.modules() if isinstance(m, nn.Linear)}
                self.assertEqual({id(p) for p in muon[0]['params']}, matrices)
                self.assertEqual((muon[0]['lr'], muon[0]['momentum']), (0.05, 0.95))
                ids = [id(p) for g in opt.param_groups for p in g['params']]
                self.assertEqual(sorted(ids), sorted({id(p) for p in model.parameters()}))  # each once
                adamw = {id(p): g for g in opt.param_groups if not g['muon'] for p in g['params']}
                self.assertEqual(adamw[id(model.lm_head.weight)]['weight_decay'], 0.0 if tie else 0.1)
                self.assertEqual(adamw[id(model.transformer.wte.weight)]['lr'], 1e-3)

    def test_embedding_lr_sets_the_tables_own_rate(self):
        for optimizer in ('adamw', 'muon'):
            C = quiet_config(optimizer=optimizer, learning_rate=1e-3, embedding_lr=0.1)
            for tie in (False, True):
                model = tiny_model(tie_weights=tie)
                opt = model.configure_optimizers(C)
                with self.subTest(optimizer=optimizer, tie_weights=tie):
                    ids = [id(p) for g in opt.param_groups for p in g['params']]
                    self.assertEqual(sorted(ids), sorted({id(p) for p in model.parameters()}))  # each once
                    group = {id(p): g for g in opt.param_groups for p in g['params']}
                    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
                    self.assertEqual(group[id(wpe)]['lr'], 0.1)
                    self.assertEqual(group[id(wpe)]['weight_decay'], 0.0)
                    # a tied table is the head as well, which keeps the head's rate
                    self.assertEqual(group[id(wte)]['lr'], 1e-3 if tie else 0.1)
                    self.assertEqual(group[id(model.lm_head.weight)]['lr'], 1e-3)
                    if optimizer == 'muon':
                        self.assertTrue(all(not g['muon'] for g in opt.param_groups if g['lr'] == 0.1))
        with self.assertRaises(ConfigError):
            Trainer(quiet_config(embedding_lr=-1.0), tiny_model(), RepeatDataset())

    def test_both_groups_follow_the_schedule_and_the_loss_falls(self):
        # and Muon's momentum rises from 0.85 to muon_momentum over muon_momentum_warmup iterations
        C = quiet_config(optimizer='muon', max_iters=12, batch_size=8, learning_rate=3e-3, muon_lr=0.02,
                         lr_schedule='cosine', warmup_iters=3, muon_momentum_warmup=8)
        trainer = Trainer(C, tiny_model(), RepeatDataset())
        seen = []
        trainer.add_callback('on_batch_end', lambda t: seen.append(
            (t.iter_num, t.loss.item(), {g['muon']: g['lr'] for g in t.optimizer.param_groups},
             {g['momentum'] for g in t.optimizer.param_groups if g['muon']})))
        trainer.run()
        for it, _, lrs, momenta in seen:
            scale = get_lr(it, C) / C.learning_rate
            self.assertAlmostEqual(lrs[True], 0.02 * scale, places=12)
            self.assertAlmostEqual(lrs[False], 3e-3 * scale, places=12)
            self.assertEqual(len(momenta), 1)
            self.assertAlmostEqual(momenta.pop(), 0.85 + 0.1 * min(it, 8) / 8, places=12)
        self.assertLess(seen[-1][1], seen[0][1] * 0.5)
        self.assertEqual(get_muon_momentum(0, quiet_config(muon_momentum=0.5, muon_momentum_warmup=8)), 0.5)
        self.assertEqual(get_muon_momentum(0, quiet_config(muon_momentum=0.95)), 0.95)  # no warmup: the default

    def test_resume_is_bit_exact(self):
        # resumed inside the momentum's warmup: it carries on from the iteration, as the lr does
        straight = train(os.path.join(self.tmp, 'a'), 6, optimizer='muon', muon_momentum_warmup=5).model
        train(os.path.join(self.tmp, 'b'), 4, optimizer='muon', muon_momentum_warmup=5)
        resumed = train(os.path.join(self.tmp, 'b'), 6, optimizer='muon', muon_momentum_warmup=5, resume=True)
        self.assertEqual(resumed.iter_num, 6)
        for (name, a), b in zip(straight.named_parameters(), resumed.model.parameters()):
            self.assertTrue(torch.equal(a, b), name)
        state = torch.load(os.path.join(self.tmp, 'b', 'ckpt', 'trainer.pt'), weights_only=True)
        self.assertIn('momentum_buffer', state['optimizer']['state'][0])

    def test_config_checks(self):
        for k, v in [('optimizer', 'sgd'), ('muon_lr', 0), ('muon_momentum', 1.0), ('muon_weight_decay', -1),
                     ('muon_momentum_warmup', -1), ('muon_momentum_warmup', 1.5)]:
            with self.subTest(k), self.assertRaisesRegex(ConfigError, k):
                Trainer(quiet_config(**{k: v}), tiny_model(), RepeatDataset())


@slow  # on the class: setUpClass starts the processes
class TestProcessesWithMuon(ProcessRunsTestCase):
    """
    Under torchrun (2 gloo processes, 8 rows each) against 1 process of 16 rows, with the recipe's
    rotary positions, RMSNorm and no biases: DDP (each rank orthogonalizes the all-reduced gradient)
    and FSDP (each rank gathers every sharded matrix for Newton-Schulz) take the same steps, up to
    the rounding of summing gradients in another order; FSDP's sharded Muon state resumes bit-exact.
    """

    @classmethod
    def setUpClass(cls):
        cls.tmp = tmp = tempfile.mkdtemp()
        cls.addClassCleanup(shutil.rmtree, tmp)
        common = ['data_seed=7', 'optimizer=muon', 'learning_rate=1e-3', 'checkpoint_interval=2']
        script = ['--dropout', 0, '--model', 'pos_emb=rope', 'norm=rmsnorm', 'bias=False']
        runs = {  # name: (processes, trainer overrides)
            'one': (1, [*common, 'max_iters=4', 'batch_size=16', f'work_dir={cls.path("w_one")}']),
            'ddp': (2, [*common, 'max_iters=4', 'batch_size=8']),
            'fsdp': (2, [*common, 'max_iters=4', 'batch_size=8', 'parallel=fsdp', f'work_dir={cls.path("w_fsdp")}']),
            'half': (2, [*common, 'max_iters=2', 'batch_size=8', 'parallel=fsdp', f'work_dir={cls.path("w_half")}']),
            'resumed': (2, [*common, 'max_iters=4', 'batch_size=8', 'parallel=fsdp', f'work_dir={cls.path("w_half")}',
                            'resume=True']),
        }
        cls.runs = {name: run_train_script(cls.path(name), *script, nproc=nproc, trainer=trainer)
                    for name, (nproc, trainer) in runs.items()}

    def weights(self, name):
        if name.startswith('w_'):
            return load_file(os.path.join(self.path(name), 'ckpt', 'model.safetensors'))
        return load_file(os.path.join(self.path(name), 'final.safetensors'))

    def test_two_ranks_of_8_equal_one_process_of_16(self):
        one = json.load(open(os.path.join(self.path('one'), 'losses.json')))
        self.assertGreater(abs(one['3'] - one['0']), 1e-3)  # the weights did move
        ref = self.weights('w_one')
        self.assertNotIn('transformer.wpe.weight', ref)  # the options reached the model
        for name, weights in (('ddp', 'ddp'), ('fsdp', 'w_fsdp')):
            with self.subTest(name):
                got = json.load(open(os.path.join(self.path(name), 'losses.json')))
                self.assertEqual(sorted(got, key=int), ['0', '1', '2', '3'])
                for k in one:
                    self.assertAlmostEqual(got[k], one[k], delta=1e-5)
                w = self.weights(weights)
                self.assertEqual(set(w), set(ref))
                for k in ref:
                    torch.testing.assert_close(w[k], ref[k], rtol=0, atol=1e-5, msg=k)

    def test_fsdp_resume_is_bit_exact(self):
        straight, resumed = self.weights('w_fsdp'), self.weights('w_half')
        for k in straight:
            self.assertTrue(torch.equal(straight[k], resumed[k]), k)


if __name__ == '__main__':
    unittest.main()
