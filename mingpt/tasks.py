"""
Downstream evaluation: how often a model picks the right answer, beside its loss.

    python -m mingpt.tasks --model gpt2 --task hellaswag          # HellaSwag's validation set, downloaded once
    python -m mingpt.tasks --model out/run/ckpt --task my.jsonl --limit 500   # HellaSwag's format, or llm.c's .bin
    python -m mingpt.tasks --model gpt2 --task eval_bundle/       # a CORE-style bundle (nanochat's, DCLM's)

    from mingpt.tasks import load_task, evaluate_task
    task = load_task('hellaswag', tokenizer)
    evaluate_task(model, task, tokenizer, limit=500)   # {'acc': ..., 'acc_norm': ..., 'examples': 500, ...}
    trainer.add_callback('on_eval_end', eval_callback(task, tokenizer, every=4, limit=500))  # into metrics.jsonl

Multiple choice (HellaSwag). An example is a context and N endings. Each ending is scored by the
log-likelihood of its tokens after the context's (the ending encoded with a leading space, apart from
the context, as build-nanogpt and llm.c do). acc: the ending with the highest total log-likelihood is
the model's answer; acc_norm: the one with the highest mean per token, the normalisation of llm.c and
build-nanogpt (the lm-evaluation-harness divides by the ending's characters instead, so its acc_norm
differs). The endings of several examples go through the model as one right-padded batch: padding after
a row's last token changes none of that row's logits, attention being causal.

A CORE-style bundle has nanochat's and DCLM's layout: core.yaml lists the tasks (icl_tasks: label,
dataset_uri, icl_task_type, num_fewshot [k], continuation_delimiter, default ' '), eval_data/<dataset_uri>
holds each task's JSONL, eval_meta_data.csv each task's random baseline (columns 'Eval Task', 'Random
baseline', in percent). A task's examples are shuffled with a fixed seed (1337) before `limit` keeps the
first ones, and example i draws its k few-shot examples from the others with random.Random(1234 + i),
as nanochat does. A prompt is <|endoftext|> (when the tokenizer has it), then the few-shot examples, each
followed by a blank line, then the example:
- multiple_choice ({query, choices, gold}): query + delimiter + each choice; the answer is the choice
  whose tokens after the prompts' common prefix have the lowest mean loss;
- schema ({context_options, continuation, gold}): each context + delimiter + continuation; scored on the
  prompts' common suffix the same way;
- language_modeling ({context, continuation}): right when greedy decoding reproduces every token of the
  continuation.
Centered accuracy is (acc - baseline) / (1 - baseline): 0 at chance, 1 when always right. The CORE score
is its mean over the bundle's tasks.
"""

import argparse
import contextlib
import csv
import json
import logging
import random
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch

from mingpt.download import get_dataset
from mingpt.errors import ConfigError, DataError, MissingFileError
from mingpt.metrics import track

logger = logging.getLogger(__name__)

# a multiple-choice example as token ids: context [ids], endings [[ids], ...], label (the right ending's index)
Example = namedtuple('Example', 'context endings label')
# one task of a CORE bundle: label, kind (an icl_task_type), few-shot count, delimiter, JSONL path, baseline (0-1)
CoreTask = namedtuple('CoreTask', 'label kind num_fewshot delimiter path baseline')
# what load_task returns: kind 'multiple_choice' (items: Examples) or 'core' (items: CoreTasks)
Task = namedtuple('Task', 'name kind items')

CORE_KINDS = ('multiple_choice', 'schema', 'language_modeling')
NORMALISATION = ('acc: the highest total log-likelihood; acc_norm: the highest mean log-likelihood per token '
                 '(llm.c, build-nanogpt; the lm-evaluation-harness normalises by characters instead)')

# -----------------------------------------------------------------------------
# scoring continuations


@contextlib.contextmanager
def eval_mode(model):
    """ the model in eval mode (no dropout) for the block, then back in the mode it was in """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def score_continuations(model, pairs):
    """
    [(context ids, continuation ids)] -> [(log-likelihood, is_greedy)]: the summed log-probabilities of each
    continuation's tokens after its context, and whether greedy decoding would produce all of them. One
    forward of the rows, right-padded; a row longer than the model's context loses its oldest tokens.
    """
    block_size = model.block_size
    rows = []
    for context, continuation in pairs:
        if not context or not continuation:
            raise ConfigError('a scored pair needs a context and a continuation of at least one token each; '
                              'start an empty context with a token such as <|endoftext|>')
        if len(continuation) > block_size:
            raise ConfigError(f'a continuation of {len(continuation)} tokens does not fit in the model\'s context '
                              f'of {block_size}')
        rows.append((list(context) + list(continuation))[:-1][-block_size:])  # the last token predicts nothing
    x = torch.zeros((len(rows), max(map(len, rows))), dtype=torch.long)
    for i, row in enumerate(rows):
        x[i, :len(row)] = torch.tensor(row)
    device = next(model.parameters()).device
    logits, _ = model(x.to(device))  # (B, T, V)
    out = []
    for i, ((_, continuation), row) in enumerate(zip(pairs, rows)):
        n, c = len(row), len(continuation)
        # (c, V): the predictions of the continuation's tokens, in float32 at least (bf16 sums drift)
        logp = logits[i, n - c:n].to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
        target = torch.tensor(continuation, device=device)
        out.append((logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())))
    return out


def choice_scores(model, groups, batch_size=16, progress=False, desc='scoring'):
    """
    groups: per example, its (context, continuation) pairs -> per example, score_continuations of its pairs.
    An example's pairs share one forward with as many other whole examples as fit in batch_size rows.
    """
    if batch_size < 1:
        raise ConfigError(f'batch_size={batch_size} must be at least 1')
    out, pending = [], []

    def flush():
        scores = iter(score_continuations(model, [pair for group in pending for pair in group]))
        out.extend([next(scores) for _ in group] for group in pending)
        pending.clear()

    with eval_mode(model):
        for group in track(groups, len(groups), f'{desc}: example', desc=desc, unit='example', enabled=progress):
            if pending and sum(map(len, pending)) + len(group) > batch_size:
                flush()
            pending.append(group)
        if pending:
            flush()
    return out


def _argmax(values):
    return max(range(len(values)), key=values.__getitem__)  # the first of equal ones, like torch.argmax


def evaluate_multiple_choice(model, examples, batch_size=16, progress=False):
    """ acc and acc_norm (see the module docstring) of model on examples (Examples) """
    if not examples:
        raise ConfigError('there are no examples to evaluate on')
    groups = [[(ex.context, ending) for ending in ex.endings] for ex in examples]
    scores = choice_scores(model, groups, batch_size, progress, desc='multiple choice')
    acc = acc_norm = 0
    for ex, s in zip(examples, scores):
        acc += _argmax([ll for ll, _ in s]) == ex.label
        acc_norm += _argmax([ll / len(ending) for (ll, _), ending in zip(s, ex.endings)]) == ex.label
    n = len(examples)
    return {'acc': acc / n, 'acc_norm': acc_norm / n, 'examples': n, 'metric': 'acc_norm', 'score': acc_norm / n}

# -----------------------------------------------------------------------------
# reading multiple-choice data


def _read_jsonl(path):
    """ [(line number, object)] of a JSONL file, or a MissingFileError / DataError saying what is wrong """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f'{path} does not exist; give the path of a JSONL file')
    rows = []
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f'{path}, line {lineno}: not JSON ({e}); expected one JSON object a line') from None
    return rows


def read_hellaswag(path, tokenizer):
    """ a JSONL file in HellaSwag's published format ({"ctx", "endings", "label", ...} a line) -> [Example] """
    examples = []
    for lineno, row in _read_jsonl(path):
        try:
            ctx, endings, label = row['ctx'], row['endings'], int(row['label'])
            ok = isinstance(ctx, str) and ctx and isinstance(endings, list) and 0 <= label < len(endings)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok or not all(isinstance(e, str) and e for e in endings):
            raise DataError(f'{path}, line {lineno}: expected HellaSwag\'s fields: "ctx" (text), "endings" (a list '
                            f'of texts) and "label" (the index of the right ending)')
        examples.append(Example(tokenizer.encode(ctx), [tokenizer.encode(' ' + e) for e in endings], label))
    return examples


LLMC_EVAL_MAGIC = 20240522
LLMC_EXAMPLE_START = 2 ** 16 - 1


def read_llmc_eval(path):
    """
    llm.c's multiple-choice eval file (hellaswag_val.bin, GPT-2 token ids) -> [Example]. Its layout: 256 int32
    [magic 20240522, version 1, examples, longest example's bytes, 0...], then each example as uint16: 65535,
    its size in bytes, its index, its label, N, the context's length and tokens, N x (length, tokens).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f'{path} does not exist; give the path of an llm.c eval .bin file')
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype='<i4') if len(raw) >= 1024 else None
    if header is None or header[0] != LLMC_EVAL_MAGIC or header[1] != 1:
        raise DataError(f'{path} is not an llm.c eval file (version 1, magic {LLMC_EVAL_MAGIC})')
    stream = np.frombuffer(raw[1024:], dtype='<u2').astype(np.int64)
    examples, p = [], 0
    for i in range(int(header[2])):
        if p + 6 > len(stream) or stream[p] != LLMC_EXAMPLE_START:
            raise DataError(f'{path}: example {i} is not where it should be: the file is cut short or corrupt')
        size, label, n_endings = stream[p + 1] // 2, int(stream[p + 3]), int(stream[p + 4])
        parts, q = [], p + 5
        for _ in range(1 + n_endings):  # the context, then the endings
            n = int(stream[q]) if q < len(stream) else 0
            parts.append(stream[q + 1:q + 1 + n].tolist())
            q += 1 + n
        if q > len(stream) or q != p + size or not 0 <= label < n_endings:
            raise DataError(f'{path}: example {i} does not add up (size, label): the file is cut short or corrupt')
        examples.append(Example(parts[0], parts[1:], label))
        p = q
    return examples

# -----------------------------------------------------------------------------
# CORE-style bundles


def read_bundle(directory):
    """ a CORE-style bundle directory (core.yaml, eval_data/, eval_meta_data.csv) -> [CoreTask] """
    d = Path(directory)
    for name in ('core.yaml', 'eval_meta_data.csv', 'eval_data'):
        if not (d / name).exists():
            raise MissingFileError(f'{d} is not a CORE bundle: it has no {name} (a bundle has core.yaml, '
                                   f'eval_meta_data.csv and eval_data/)')
    try:
        import yaml
    except ImportError:
        raise ConfigError('reading a bundle\'s core.yaml needs PyYAML: pip install pyyaml (or .[eval])') from None
    try:
        tasks = yaml.safe_load((d / 'core.yaml').read_text(encoding='utf-8'))['icl_tasks']
        with open(d / 'eval_meta_data.csv', encoding='utf-8', newline='') as f:
            baselines = {row['Eval Task']: float(row['Random baseline']) / 100 for row in csv.DictReader(f)}
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise DataError(f'{d}: cannot read core.yaml\'s icl_tasks or eval_meta_data.csv\'s "Eval Task" and '
                        f'"Random baseline" columns ({type(e).__name__}: {e})') from None
    out = []
    for t in tasks:
        label, kind, shots = t.get('label'), t.get('icl_task_type'), t.get('num_fewshot', [0])
        shots = shots[0] if isinstance(shots, list) else shots
        if kind not in CORE_KINDS or label not in baselines or not isinstance(shots, int) or 'dataset_uri' not in t:
            raise DataError(f'{d}: task {label!r} in core.yaml needs an icl_task_type of {", ".join(CORE_KINDS)} '
                            f'(has {kind!r}), a dataset_uri, an int num_fewshot and a row in eval_meta_data.csv')
        out.append(CoreTask(label, kind, shots, t.get('continuation_delimiter', ' '),
                            d / 'eval_data' / t['dataset_uri'], baselines[label]))
    return out


def core_prompts(kind, item, shots, delimiter):
    """ the texts of one example: a prompt per choice (multiple_choice, schema), or the prompt without and
    with the continuation (language_modeling); shots are the few-shot examples, each shown answered """
    if kind == 'multiple_choice':
        prefix = ''.join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item['choices']]
    if kind == 'schema':
        prefix = ''.join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}\n\n" for s in shots)
        return [f"{prefix}{context}{delimiter}{item['continuation']}" for context in item['context_options']]
    prefix = ''.join(f"{s['context'].strip()}{delimiter}{s['continuation']}\n\n" for s in shots)
    prompt = f"{prefix}{item['context'].strip()}{delimiter}"
    # without: stripped, so that a trailing space is not a token of its own where the continuation merges it
    return [prompt.strip(), prompt + item['continuation']]


def _common_prefix(seqs):
    n = 0
    for column in zip(*seqs):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def core_pairs(kind, tokens):
    """ the (context, continuation) pairs of one example's tokenized prompts (see core_prompts): every pair
    keeps at least one token on each side """
    shortest = min(map(len, tokens)) - 1
    if kind == 'multiple_choice':  # the choices follow the same prompt: score what comes after it
        start = min(_common_prefix(tokens), shortest)
        return [(t[:start], t[start:]) for t in tokens]
    if kind == 'schema':  # the contexts differ, the continuation is the same: score the shared end
        n = min(_common_prefix([t[::-1] for t in tokens]), shortest)
        return [(t[:len(t) - n], t[len(t) - n:]) for t in tokens]
    without, full = tokens
    start = min(_common_prefix([without, full]), len(full) - 1)
    return [(full[:start], full[start:])]


def evaluate_core_task(model, tokenizer, task, limit=None, batch_size=16, progress=False):
    """ the accuracy of model on one CoreTask (see the module docstring) -> (accuracy, examples) """
    data = [row for _, row in _read_jsonl(task.path)]
    random.Random(1337).shuffle(data)
    data = data[:limit] if limit else data
    if len(data) <= task.num_fewshot:
        raise ConfigError(f'task {task.label} takes {task.num_fewshot} few-shot examples from {len(data)} '
                          f'examples: evaluate more of them (limit)')
    eot = getattr(tokenizer, 'special_tokens', {}).get('<|endoftext|>')
    bos = [] if eot is None else [eot]
    groups = []
    for i, item in enumerate(data):
        # sample(range(n - 1)) then skipping i draws what sample() of the other examples' list draws
        shots = [data[j + (j >= i)] for j in random.Random(1234 + i).sample(range(len(data) - 1), task.num_fewshot)]
        try:
            prompts = core_prompts(task.kind, item, shots, task.delimiter)
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise DataError(f'{task.path}: an example lacks a field a {task.kind} task needs '
                            f'({type(e).__name__}: {e})') from None
        groups.append(core_pairs(task.kind, [bos + tokenizer.encode(p) for p in prompts]))
    scores = choice_scores(model, groups, batch_size, progress, desc=task.label)
    if task.kind == 'language_modeling':
        correct = [s[0][1] for s in scores]
    else:
        correct = [_argmax([ll / len(cont) for (ll, _), (_, cont) in zip(s, g)]) == item['gold']
                   for s, g, item in zip(scores, groups, data)]
    return sum(correct) / len(correct), len(correct)


def evaluate_core(model, tokenizer, bundle, limit=None, batch_size=16, progress=False):
    """ every task of a bundle ([CoreTask]): {'tasks': {label: {acc, centered, baseline, examples}}, 'core'} """
    results = {}
    for task in bundle:
        acc, n = evaluate_core_task(model, tokenizer, task, limit, batch_size, progress)
        centered = (acc - task.baseline) / (1 - task.baseline)
        results[task.label] = {'acc': acc, 'centered': centered, 'baseline': task.baseline, 'examples': n}
        logger.info('%s: accuracy %.4f, centered %.4f (%d examples)', task.label, acc, centered, n)
    core = sum(r['centered'] for r in results.values()) / len(results)
    return {'tasks': results, 'core': core, 'metric': 'core', 'score': core}

# -----------------------------------------------------------------------------
# any task by name, during training, and on the command line


def load_task(task, tokenizer):
    """ 'hellaswag' (its validation set, downloaded once), a HellaSwag-format .jsonl, an llm.c eval .bin, or a
    CORE bundle directory -> Task(name, kind, items) """
    if str(task) == 'hellaswag':
        return Task('hellaswag', 'multiple_choice', read_hellaswag(get_dataset('hellaswag'), tokenizer))
    path = Path(task)
    if path.is_dir():
        return Task(path.name, 'core', read_bundle(path))
    if path.suffix == '.bin':
        return Task(path.stem, 'multiple_choice', read_llmc_eval(path))
    if path.is_file():
        return Task(path.stem, 'multiple_choice', read_hellaswag(path, tokenizer))
    raise MissingFileError(f'no task {task!r}: give "hellaswag", a HellaSwag-format .jsonl file, an llm.c eval '
                           f'.bin file or a CORE bundle directory')


def evaluate_task(model, task, tokenizer, limit=None, batch_size=16, progress=False):
    """ a loaded Task's result: evaluate_multiple_choice's or evaluate_core's, with 'task': its name """
    if task.kind == 'core':
        result = evaluate_core(model, tokenizer, task.items, limit, batch_size, progress)
    else:
        result = evaluate_multiple_choice(model, task.items[:limit] if limit else task.items, batch_size, progress)
    return {'task': task.name, **result}


def eval_callback(task, tokenizer, every=1, limit=None, batch_size=16):
    """
    A Trainer callback for 'on_eval_end': every `every`-th evaluation, evaluate the model on task (a Task, or
    what load_task takes) and log {'iter', 'task', 'metric', 'score', ...} into metrics.jsonl (and the loss
    plot's second axis). Rank 0 evaluates alone, unless FSDP shards the model: then every rank runs it.
    """
    if not isinstance(every, int) or every < 1:
        raise ConfigError(f'every={every!r} must be an int >= 1: the task runs at every `every`-th evaluation')
    task = task if isinstance(task, Task) else load_task(task, tokenizer)
    evaluations = 0

    def callback(trainer):
        nonlocal evaluations
        evaluations += 1
        sharded = trainer.config.parallel == 'fsdp' and trainer.world_size > 1
        if evaluations % every or not (trainer.is_master or sharded):
            return
        result = evaluate_task(trainer.model, task, tokenizer, limit, batch_size)
        if trainer.is_master:
            logger.info('iter %d: %s %s %.4f', trainer.iter_num, task.name, result['metric'], result['score'])
            trainer.metrics.log({'iter': trainer.iter_num, **result})
    return callback


def _print_result(model, result):
    if 'tasks' not in result:
        print(f"| model | task | examples | acc | acc_norm |\n|---|---|---:|---:|---:|\n| {model} | {result['task']} | "
              f"{result['examples']:,} | {result['acc']:.4f} | {result['acc_norm']:.4f} |\n\n{NORMALISATION}")
        return
    print('| task | examples | accuracy | random baseline | centered |\n|---|---:|---:|---:|---:|')
    for label, r in result['tasks'].items():
        print(f"| {label} | {r['examples']:,} | {r['acc']:.4f} | {r['baseline']:.4f} | {r['centered']:.4f} |")
    print(f"| CORE (mean centered accuracy) | | | | {result['core']:.4f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m mingpt.tasks',
                                     description='Accuracy of a model on HellaSwag, any multiple-choice file in its '
                                                 'format, or a CORE-style task bundle.')
    parser.add_argument('--model', required=True,
                        help='a model directory, trainer checkpoint, llm.c .bin, OpenAI checkpoint or hub name (gpt2)')
    parser.add_argument('--task', default='hellaswag',
                        help='"hellaswag" (the default: downloaded once), a HellaSwag-format .jsonl, an llm.c eval '
                             '.bin or a CORE bundle directory (core.yaml, eval_data/, eval_meta_data.csv)')
    parser.add_argument('--limit', type=int, default=None, help='evaluate the first N examples (of each task)')
    parser.add_argument('--batch-size', type=int, default=16, help='sequences per forward pass (default 16)')
    parser.add_argument('--tokenizer', default=None, help='"gpt2" or a directory of tokenizer files (default: the '
                                                          'model\'s, else GPT-2 for a 50257-token model)')
    parser.add_argument('--device', default='auto', help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')

    from mingpt.hardware import resolve_device
    from mingpt.model import GPT
    from mingpt.tokenizers import load_tokenizer, tokenizer_for_model
    try:
        if args.limit is not None and args.limit < 1:
            raise ConfigError(f'--limit {args.limit}: give a number of examples >= 1')
        device = resolve_device(args.device)
        model = GPT.from_pretrained(args.model)
        tokenizer = (load_tokenizer(args.tokenizer) if args.tokenizer is not None
                     else tokenizer_for_model(args.model, model.config.vocab_size))
        task = load_task(args.task, tokenizer)
        result = evaluate_task(model.to(device), task, tokenizer, args.limit, args.batch_size, progress=True)
    except (ValueError, OSError) as e:  # every MinGPTError is one of these
        parser.exit(2, f'error: {e}\n')
    _print_result(args.model, result)
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
