"""
mingpt's models in EleutherAI's lm-evaluation-harness (pip install -e '.[eval]'):

    lm_eval --model mingpt --model_args pretrained=out/run/ckpt_best --tasks hellaswag,arc_easy
    lm_eval --model mingpt --model_args pretrained=gpt2 --tasks my_task --include_path my_tasks/

lm_eval knows a model type only once something registers it: the install puts mingpt-lm-eval.pth in
site-packages, which has every Python register 'mingpt' as a name that resolves to MinGPTLM below (see
mingpt_lm_eval.py). `python -m mingpt.harness` is lm_eval's same command line with the model registered
here, for a Python that reads no .pth files (python -S, or mingpt on PYTHONPATH without an install).
From Python: lm_eval.simple_evaluate(model=MinGPTLM(model=gpt, tokenizer=tok), tasks=[...]).

model_args: pretrained (anything GPT.from_pretrained reads), tokenizer ("gpt2" or a directory; default the
model's, see mingpt.tokenizers.tokenizer_for_model), max_gen_toks (default 256, at most half the context).
--batch_size is the number of sequences a forward pass takes ('auto': 16); --device the device (a CUDA one
falls back to the CPU on a machine without, as transformers' model in the harness does). A mingpt error
(a wrong path, say) ends lm_eval's traceback with what is wrong and what to do; under python -m
mingpt.harness it is that one `error:` line and exit status 2.

What it computes, on the library's own code: loglikelihood is mingpt.tasks.score_continuations (the
continuation's summed log-probabilities after its context, the oldest tokens dropped to fit the context,
as transformers' model in the harness does); loglikelihood_rolling scores a whole text in disjoint windows
of the model's context (the harness's windows); generate_until decodes with mingpt.generate.stream, a
batch of prompts at a time, left-padded, until every row has produced one of its stop strings, or
max_gen_toks tokens.
"""

import json
import logging
import sys

import torch
from tqdm import tqdm

NEEDS = "the lm-evaluation-harness is optional: pip install lm-eval (or pip install -e '.[eval]')"
try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:
    if __name__ == '__main__':  # the command line: one line, as every mingpt tool says it
        print(f'error: {NEEDS}', file=sys.stderr)
        raise SystemExit(2) from None
    raise ImportError(NEEDS) from e

from mingpt.errors import ConfigError
from mingpt.generate import stream
from mingpt.hardware import resolve_device
from mingpt.model import GPT
from mingpt.tasks import eval_mode, score_continuations
from mingpt.tokenizers import load_tokenizer, tokenizer_for_model
from mingpt.utils import run_script

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16


@register_model('mingpt')
class MinGPTLM(TemplateLM):
    """ a mingpt GPT as an lm_eval model: pretrained (a name or path), or model (a GPT) with tokenizer """

    def __init__(self, pretrained=None, model=None, tokenizer=None, batch_size=DEFAULT_BATCH_SIZE, device=None,
                 max_gen_toks=None, max_batch_size=None):
        super().__init__()
        if (pretrained is None) == (model is None):
            raise ConfigError('give the model to evaluate: model_args pretrained=PATH (or a GPT as model=)')
        model = GPT.from_pretrained(pretrained) if model is None else model
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = (tokenizer_for_model(pretrained, model.config.vocab_size) if tokenizer is None
                         else load_tokenizer(tokenizer))
        eot = getattr(tokenizer, 'special_tokens', {}).get('<|endoftext|>')
        if eot is None:
            raise ConfigError('the harness needs a tokenizer with <|endoftext|> (it starts empty contexts and ends '
                              'generations): use a BPE tokenizer that has it')
        if device is None or (str(device).startswith('cuda') and not torch.cuda.is_available()):
            if device is not None:  # lm_eval's default is cuda:0 whether or not there is one
                logger.warning('device %s: there is no CUDA device here, running on the CPU', device)
            device = 'auto'
        self.model = model.to(resolve_device(device)).eval()
        self._tokenizer, self._eot = tokenizer, eot
        self._batch_size = DEFAULT_BATCH_SIZE if batch_size in (None, 'auto') else int(str(batch_size).split(':')[0])
        self.max_gen_toks = min(256, model.block_size // 2) if max_gen_toks is None else int(max_gen_toks)
        if self._batch_size < 1 or not 1 <= self.max_gen_toks < model.block_size:
            raise ConfigError(f'batch_size must be >= 1 and max_gen_toks between 1 and the context ({model.block_size}) '
                              f'- 1 (got {self._batch_size} and {self.max_gen_toks})')

    @property
    def eot_token_id(self):
        return self._eot

    @property
    def max_length(self):
        return self.model.block_size

    @property
    def device(self):
        return next(self.model.parameters()).device

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self._tokenizer.encode(string)

    def tok_decode(self, tokens, **kwargs):
        return self._tokenizer.decode(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        """ [(key, context ids, continuation ids)] -> [(log-likelihood, is_greedy)], longest rows first, so that
        a batch's rows are padded little """
        batch_size = override_bs or self._batch_size
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results = [None] * len(requests)
        with eval_mode(self.model), tqdm(total=len(requests), desc='loglikelihood', disable=disable_tqdm) as bar:
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                for i, answer in zip(batch, score_continuations(self.model, [requests[i][1:] for i in batch])):
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial('loglikelihood', requests[i][0], answer)
                bar.update(len(batch))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """ the log-likelihood of each whole text: every token scored once, in windows of the model's context """
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for window in get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self._eot,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append((None, *make_disjoint_window(window)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        """ the text each prompt continues with, up to its first stop string (gen_kwargs 'until') """
        groups = {}  # requests with the same decoding options decode together
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        results = [None] * len(requests)
        with eval_mode(self.model), tqdm(total=len(requests), desc='generate_until', disable=disable_tqdm) as bar:
            for indices in groups.values():
                options = dict(requests[indices[0]].args[1])
                for start in range(0, len(indices), self._batch_size):
                    batch = indices[start:start + self._batch_size]
                    texts = self._generate([requests[i].args[0] for i in batch], options)
                    for i, text in zip(batch, texts):
                        results[i] = text
                        self.cache_hook.add_partial('generate_until', requests[i].args, text)
                    bar.update(len(batch))
        return results

    def _generate(self, contexts, options):
        """ decode a batch of prompts with one set of gen_kwargs; the texts, each cut at its first stop string """
        until = options.pop('until', None) or []
        until = [until] if isinstance(until, str) else list(until)
        until.append(self.tok_decode([self._eot]))
        max_new = min(int(options.pop('max_gen_toks', self.max_gen_toks)), self.max_length - 1)
        do_sample = bool(options.pop('do_sample', False))
        temperature = float(options.pop('temperature', 1.0 if do_sample else 0.0))
        sampling = dict(do_sample=do_sample and temperature > 0, temperature=temperature,
                        top_k=options.pop('top_k', None), top_p=options.pop('top_p', None), seed=options.pop('seed', None))
        if options:
            logger.warning('ignoring generation options mingpt does not have: %s', ', '.join(options))
        keep = self.max_length - max_new  # the prompt's newest tokens that leave room for max_new more
        prompts = [torch.tensor(self.tok_encode(c)[-keep:] or [self._eot]) for c in contexts]
        new = [[] for _ in prompts]
        done = [False] * len(prompts)
        for step in stream(self.model, prompts, max_new, eos_token_id=self._eot, **sampling):
            for row, tok in enumerate(step.tolist()):
                if not done[row]:
                    new[row].append(tok)
                    done[row] = tok == self._eot or any(s in self.tok_decode(new[row]) for s in until)
            if all(done):
                break
        texts = []
        for ids in new:
            text = self.tok_decode([t for t in ids if t != self._eot])
            texts.append(min((text.split(s)[0] for s in until), key=len))
        return texts


def main(argv=None):
    """ lm_eval's command line, with 'mingpt' among its models """
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ['lm_eval', *(sys.argv[1:] if argv is None else argv)]
    run_script(cli_evaluate)


if __name__ == '__main__':
    main()
