"""
LoRA adapters (mingpt.lora): merged and unmerged outputs agree, only the adapters train, adapter-only
checkpoints resume bit for bit, PEFT's format both ways against the real peft package; and the
Trainer's activation checkpointing, whose gradients equal those without it.
"""

import json
import os
import tempfile
import unittest

import torch
from safetensors.torch import load_file

from mingpt import hardware, lora
from mingpt.checkpoint import read_checkpoint
from mingpt.resume import load_lora_checkpoint
from mingpt.errors import CheckpointError, ConfigError, WeightsError
from mingpt.hardware import pack_weights
from mingpt.model import GPT
from mingpt.trainer import Trainer
from mingpt.utils import set_seed
from tests.common import TempDirTestCase, run_train_script, shakespeare, slow, tiny_gpt
from tests.test_trainer import RepeatDataset, quiet_config

ALL = ('c_attn', 'c_proj', 'c_fc', 'lm_head')


def randomize_adapters(model, seed=1):
    """ B starts at zero (the adapted model starts as the base one): give it values to compare with """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'lora_B' in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def lora_run(work_dir, max_iters, base_seed=0, resume=False, **lora_kw):
    """ a seeded LoRA run of a tiny GPT on RepeatDataset, checkpointed every 2 iterations; the trainer """
    model = lora.add_lora(tiny_gpt(seed=base_seed), **{'targets': ALL, **lora_kw})
    set_seed(0)
    C = quiet_config(max_iters=max_iters, batch_size=4, learning_rate=3e-3, work_dir=work_dir,
                     checkpoint_interval=2, resume=resume)
    trainer = Trainer(C, model, RepeatDataset())
    trainer.run()
    return trainer


class TestAdapters(unittest.TestCase):

    def test_names_freezing_and_a_start_equal_to_the_base(self):
        base = tiny_gpt()
        x = torch.randint(0, 13, (2, 10))
        expected = base(x)[0]
        model = lora.add_lora(base, r=4, alpha=8, targets=('c_attn', 'c_fc'))
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        self.assertEqual(trainable, [f'transformer.h.{i}.{layer}.lora_{ab}.weight' for i in range(2)
                                     for layer in ('attn.c_attn', 'mlp.c_fc') for ab in 'AB'])
        self.assertEqual(tuple(model.transformer.h[0].attn.c_attn.lora_A.weight.shape), (4, 32))  # (r, in)
        self.assertEqual(tuple(model.transformer.h[0].attn.c_attn.lora_B.weight.shape), (96, 4))  # (out, r)
        self.assertTrue(torch.equal(model(x)[0], expected))  # B = 0: exactly the base model
        self.assertEqual(model.lora_config['fingerprint'], lora.base_fingerprint(tiny_gpt()))

    def test_merge_equals_unmerged_and_unmerge_restores(self):
        model = randomize_adapters(lora.add_lora(tiny_gpt(), targets=ALL))
        weights = {n: p.clone() for n, p in model.state_dict().items()}
        x = torch.randint(0, 13, (3, 12))
        unmerged = model(x)[0]
        self.assertGreater((unmerged - tiny_gpt()(x)[0]).abs().max().item(), 1e-2)  # the adapters do something
        lora.merge(model)
        self.assertFalse(torch.equal(model.lm_head.weight, weights['lm_head.weight']))
        torch.testing.assert_close(model(x)[0], unmerged, rtol=0, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(model(x)[0], unmerged, rtol=0, atol=1e-5)
        out = model.generate(x[:1, :4], 5)  # generation runs on the merged weights
        self.assertEqual(tuple(out.shape), (1, 9))
        lora.unmerge(model)
        for n, p in model.state_dict().items():
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x)[0], unmerged, rtol=0, atol=1e-5)

    def test_merge_renews_the_blocked_weight_copy(self):
        # 256 x 1024 weights take the oneDNN path, where pack_weights keeps a blocked copy of each
        model = randomize_adapters(lora.add_lora(tiny_gpt(n_embd=256, n_head=4, n_layer=1), targets=('c_fc',)))
        pack_weights(model)
        layer = model.transformer.h[0].mlp.c_fc
        self.assertTrue(layer.packs)
        x = torch.randint(0, 13, (2, 8))
        with torch.no_grad():
            unmerged = model(x)[0]
            if hardware._onednn_pack is not None:  # where torch has the op, the product read a blocked copy
                self.assertIsNotNone(layer._packed)
            lora.merge(model)
            merged = model(x)[0]
            lora.unmerge(model)
            again = model(x)[0]
        torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-4)
        torch.testing.assert_close(again, unmerged, rtol=0, atol=1e-4)
        self.assertGreater((merged - tiny_gpt(n_embd=256, n_head=4, n_layer=1)(x)[0]).abs().max().item(), 1e-2)

    def test_user_errors(self):
        with self.assertRaisesRegex(ConfigError, 'tie_weights'):
            lora.add_lora(tiny_gpt(tie_weights=True), targets=('lm_head',))
        with self.assertRaisesRegex(ConfigError, 'one of c_attn'):
            lora.add_lora(tiny_gpt(), targets=('attn',))
        with self.assertRaisesRegex(ConfigError, 'int >= 1'):
            lora.add_lora(tiny_gpt(), r=0)
        model = lora.add_lora(tiny_gpt())
        with self.assertRaisesRegex(ConfigError, 'already has LoRA'):
            lora.add_lora(model)
        lora.merge(randomize_adapters(model)).train()
        with self.assertRaisesRegex(ConfigError, 'unmerge'):
            model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()


class TestTraining(TempDirTestCase):

    def test_only_the_adapters_train(self):
        model = lora.add_lora(tiny_gpt(), targets=ALL)
        before = {n: p.clone() for n, p in model.named_parameters()}
        set_seed(0)
        trainer = Trainer(quiet_config(max_iters=3, batch_size=4, learning_rate=3e-3), model, RepeatDataset())
        trainer.run()
        adapter_ids = {id(p) for n, p in model.named_parameters() if 'lora_' in n}
        grouped = [id(p) for g in trainer.optimizer.param_groups for p in g['params']]
        self.assertEqual(sorted(grouped), sorted(adapter_ids))  # frozen parameters are in no group
        decayed = {id(p) for p in trainer.optimizer.param_groups[0]['params']}
        self.assertEqual(decayed, adapter_ids)  # A and B decay, towards the base model
        for n, p in model.named_parameters():
            if 'lora_' in n:
                self.assertFalse(torch.equal(p, before[n]), n)
            else:
                self.assertTrue(torch.equal(p, before[n]), n)
                self.assertIsNone(p.grad, n)

    def test_checkpoint_holds_the_adapters_and_resume_is_exact(self):
        whole = lora_run(self.tmp / 'whole', 4).model
        lora_run(self.tmp / 'parts', 2)
        # a new process would build the base model and its adapters afresh, then resume
        resumed = lora_run(self.tmp / 'parts', 4, resume=True).model
        for (n, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
            self.assertTrue(torch.equal(a, b), n)

        ckpt = self.tmp / 'parts' / 'ckpt'
        stored = load_file(ckpt / 'model.safetensors')
        self.assertEqual(sorted(stored), sorted(lora.adapter_state_dict(whole.state_dict())))
        _, state = read_checkpoint(ckpt)
        self.assertEqual(state['lora']['fingerprint'], lora.base_fingerprint(tiny_gpt()))
        n_adapters = sum(1 for n, _ in whole.named_parameters() if 'lora_' in n)
        self.assertEqual(len(state['optimizer']['state']), n_adapters)

    def test_from_checkpoint_rebuilds_base_and_adapters(self):
        tiny_gpt().save_pretrained(self.tmp / 'base')
        model = lora.add_lora(tiny_gpt(), targets=ALL, base=self.tmp / 'base')
        set_seed(0)
        Trainer(quiet_config(max_iters=2, batch_size=4, learning_rate=3e-3, work_dir=self.tmp / 'run'),
                model, RepeatDataset()).run()
        rebuilt = load_lora_checkpoint(self.tmp / 'run' / 'ckpt', GPT)
        for (n, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
            self.assertTrue(torch.equal(a, b), n)
        tiny_gpt(seed=5).save_pretrained(self.tmp / 'other')
        with self.assertRaisesRegex(CheckpointError, 'other base weights'):
            load_lora_checkpoint(self.tmp / 'run' / 'ckpt', GPT, base=self.tmp / 'other')
        # from_pretrained reads the run's checkpoint as the fine-tuned model: one plain GPT, adapters merged
        plain = GPT.from_pretrained(self.tmp / 'run' / 'ckpt').eval()
        self.assertFalse(lora.adapters(plain))
        self.assertFalse(any('lora_' in n for n in plain.state_dict()))
        self.assertTrue(all(p.requires_grad for p in plain.parameters()))
        x = torch.randint(0, plain.config.vocab_size, (2, 8))
        with torch.no_grad():
            torch.testing.assert_close(plain(x)[0], rebuilt.eval()(x)[0], rtol=0, atol=1e-5)

    def test_resume_refuses_another_base_or_rank(self):
        lora_run(self.tmp / 'run', 2)
        with self.assertRaisesRegex(CheckpointError, 'other base weights'):
            lora_run(self.tmp / 'run', 4, base_seed=1, resume=True)
        with self.assertRaisesRegex(CheckpointError, 'r=8'):
            lora_run(self.tmp / 'run', 4, r=4, resume=True)
        with self.assertRaisesRegex(CheckpointError, 'holds LoRA adapters'):
            set_seed(0)
            Trainer(quiet_config(max_iters=4, work_dir=self.tmp / 'run', resume=True), tiny_gpt(), RepeatDataset())


class TestPEFT(TempDirTestCase):
    """ against the real peft package on transformers' GPT2LMHeadModel of the same (saved) weights """

    def setUp(self):
        super().setUp()
        import transformers
        transformers.logging.set_verbosity_error()
        self.x = torch.randint(0, 13, (2, 10))

    def hf_base(self):
        import transformers
        tiny_gpt().save_pretrained(self.tmp / 'base')
        return transformers.GPT2LMHeadModel.from_pretrained(self.tmp / 'base').eval()

    def test_peft_loads_what_save_adapter_writes(self):
        import peft
        model = randomize_adapters(lora.add_lora(tiny_gpt(), r=4, alpha=16, targets=ALL, base='gpt2-tiny'))
        lora.save_adapter(model, self.tmp / 'adapter')
        config = json.loads((self.tmp / 'adapter' / 'adapter_config.json').read_text())
        self.assertEqual((config['r'], config['lora_alpha'], config['base_model_name_or_path']), (4, 16, 'gpt2-tiny'))
        keys = load_file(self.tmp / 'adapter' / 'adapter_model.safetensors')
        self.assertIn('base_model.model.transformer.h.0.attn.c_attn.lora_A.weight', keys)
        self.assertIn('base_model.model.lm_head.lora_B.weight', keys)
        theirs = peft.PeftModel.from_pretrained(self.hf_base(), self.tmp / 'adapter').eval()
        with torch.no_grad():
            expected = theirs(self.x).logits
        self.assertGreater((expected - tiny_gpt()(self.x)[0]).abs().max().item(), 1e-2)  # really adapted
        torch.testing.assert_close(model(self.x)[0], expected, rtol=0, atol=1e-5)

    def test_load_adapter_reads_what_peft_writes(self):
        import peft
        cfg = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, target_modules=['c_attn', 'c_proj', 'c_fc'],
                              fan_in_fan_out=True, init_lora_weights=False, task_type='CAUSAL_LM')  # B != 0
        theirs = peft.get_peft_model(self.hf_base(), cfg).eval()
        theirs.save_pretrained(self.tmp / 'adapter')
        model = lora.load_adapter(tiny_gpt(), self.tmp / 'adapter')
        self.assertEqual((model.lora_config['r'], model.lora_config['alpha']), (4, 12))
        with torch.no_grad():
            expected = theirs(self.x).logits
        torch.testing.assert_close(model(self.x)[0], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(lora.merge(model)(self.x)[0], expected, rtol=0, atol=1e-5)

    def test_an_adapter_of_another_shape_is_a_clear_error(self):
        lora.save_adapter(lora.add_lora(tiny_gpt(n_embd=16), targets=('c_attn',)), self.tmp / 'adapter')
        with self.assertRaisesRegex(WeightsError, 'does not fit this model'):
            lora.load_adapter(tiny_gpt(), self.tmp / 'adapter')
        cfg = json.loads((self.tmp / 'adapter' / 'adapter_config.json').read_text())
        (self.tmp / 'adapter' / 'adapter_config.json').write_text(json.dumps({**cfg, 'use_dora': True}))
        with self.assertRaisesRegex(WeightsError, 'use_dora=True'):
            lora.load_adapter(tiny_gpt(), self.tmp / 'adapter')


class TestActivationCheckpointing(unittest.TestCase):

    def first_grads(self, model, **kw):
        """ the gradients of a Trainer's first step (dropout on: the recomputation must replay its masks) """
        set_seed(0)
        trainer = Trainer(quiet_config(max_iters=2, batch_size=8, learning_rate=1e-3, **kw), model, RepeatDataset())
        grads = []
        trainer.add_callback('on_batch_end', lambda t: grads.append(
            {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None})
            if t.iter_num == 0 else None)
        trainer.run()
        self.assertFalse(any('forward' in vars(b) for b in model.transformer.h))  # the blocks are plain again
        return grads[0], trainer.loss.item()

    def check(self, make, **kw):
        plain, loss = self.first_grads(make(), **kw)
        checkpointed, loss_ckpt = self.first_grads(make(), activation_checkpointing=True, **kw)
        self.assertEqual(sorted(plain), sorted(checkpointed))
        for n in plain:
            torch.testing.assert_close(checkpointed[n], plain[n], rtol=0, atol=1e-7, msg=n)
        self.assertAlmostEqual(loss, loss_ckpt, places=6)

    def test_gradients_equal_without(self):
        self.check(tiny_gpt)

    def test_with_lora(self):
        self.check(lambda: lora.add_lora(tiny_gpt(), targets=ALL))

    def test_with_compile(self):
        # the 'eager' backend: torch.compile's graph capture of the checkpointed blocks, without a C++ build.
        # Without dropout: a compiled graph draws its dropout masks otherwise than eager code does
        def without_dropout():
            model = tiny_gpt()
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
                if hasattr(m, 'attn_pdrop'):
                    m.attn_pdrop = 0.0
            return model
        self.check(without_dropout, compile=True, compile_backend='eager')

    def test_config_is_checked(self):
        with self.assertRaisesRegex(ConfigError, 'activation_checkpointing'):
            Trainer(quiet_config(activation_checkpointing='yes'), tiny_gpt(), RepeatDataset())
        self.assertFalse(Trainer.get_default_config().activation_checkpointing)

    @slow
    def test_with_lora_under_ddp(self):
        # 2 gloo processes of 8 rows, LoRA and activation checkpointing, take the steps 1 process of 16 rows takes
        common = ['max_iters=4', 'data_seed=7', 'learning_rate=1e-3', 'activation_checkpointing=True']
        with tempfile.TemporaryDirectory() as d:
            ddp = run_train_script(os.path.join(d, 'ddp'), '--dropout', 0, '--lora', nproc=2,
                                   trainer=[*common, 'batch_size=8'])
            self.assertEqual(ddp.returncode, 0, ddp.stderr[-3000:])
            one = run_train_script(os.path.join(d, 'one'), '--dropout', 0, '--lora', trainer=[*common, 'batch_size=16'])
            self.assertEqual(one.returncode, 0, one.stderr[-3000:])
            a = load_file(os.path.join(d, 'ddp', 'final.safetensors'))
            b = load_file(os.path.join(d, 'one', 'final.safetensors'))
            self.assertTrue(any('lora_B' in k and b[k].abs().max() > 0 for k in b))  # the adapters trained
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


class TestFinetuneProject(TempDirTestCase):

    @slow
    def test_lora_fine_tuning_saves_the_adapter_and_the_merged_model(self):
        import peft
        import transformers
        from tests.test_projects import read_metrics, run_project
        transformers.logging.set_verbosity_error()
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2,
                                                             n_head=2)).save_pretrained(self.tmp / 'tiny')
        (self.tmp / 'text.txt').write_text(shakespeare(40000), encoding='utf-8')
        work_dir = self.tmp / 'out'
        args = [f'--system.work_dir={work_dir}', f'--model.init_from={self.tmp / "tiny"}',
                f'--data.path={self.tmp / "text.txt"}', '--data.block_size=32', '--trainer.device=cpu',
                '--system.num_threads=1', '--trainer.batch_size=8', '--trainer.learning_rate=3e-3',
                '--trainer.warmup_iters=3', '--trainer.eval_interval=10', '--trainer.eval_iters=4',
                '--sample.max_new_tokens=10', '--lora.r=8', '--lora.targets=c_attn,c_fc,lm_head',
                '--trainer.activation_checkpointing=True']
        proc = run_project('finetune', *args, '--trainer.max_iters=20')
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        stored = load_file(work_dir / 'ckpt' / 'model.safetensors')
        self.assertTrue(stored and all('lora_' in k for k in stored))  # the adapters, not the model
        _, _, val = read_metrics(work_dir)
        self.assertLess(val[-1][1], val[0][1])
        # the same command, further: it continues from the adapter checkpoint
        proc = run_project('finetune', *args, '--trainer.max_iters=30')
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertIn('resuming from', proc.stderr)
        results = json.loads((work_dir / 'results.json').read_text())
        self.assertEqual(results['iters'], 30)
        self.assertLess(results['val_loss_after'], results['val_loss_before'])
        # the PEFT adapter on transformers' base model and the merged export give the same logits
        x = torch.randint(0, 50257, (1, 16))
        base = transformers.GPT2LMHeadModel.from_pretrained(self.tmp / 'tiny').eval()
        with torch.no_grad():
            adapted = peft.PeftModel.from_pretrained(base, work_dir / 'adapter').eval()(x).logits
            merged = transformers.GPT2LMHeadModel.from_pretrained(work_dir / 'model').eval()(x).logits
        torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-4)


if __name__ == '__main__':
    unittest.main()
