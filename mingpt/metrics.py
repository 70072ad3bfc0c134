"""
What a training run shows while it runs and leaves to look at afterwards:

- MetricsLog: work_dir/metrics.jsonl, one JSON record per line (a training step's {'iter', 'loss',
  'lr', 'tokens_per_sec', 'time'}, an evaluation's {'iter', 'val_loss'}, a downstream task's {'iter',
  'task', 'metric', 'score', ...} from mingpt.tasks), and the same numbers in memory as a history.
  metrics.jsonl is the current run's; the log of an earlier run in the same work_dir that starts
  afresh (it wrote no checkpoint to resume) is kept as metrics.1.jsonl, metrics.2.jsonl, ... in the
  order they were written.
- Progress: what a person watching the run sees: the tqdm bar in a terminal, log lines otherwise;
  track: the same around any long loop (an evaluation, a long sample).
- plot_metrics: a PNG of the loss curves, from a history or from metrics.jsonl's records.
- dataset_loss: the validation loss the Trainer records (on any dataset of (x, y) rows, over every rank).
"""

import contextlib
import inspect
import json
import logging
import os
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.utils.data.dataloader import default_collate

from mingpt.utils import atomic_write

logger = logging.getLogger(__name__)


def history_of(records, history=None):
    """
    Add metrics records to a history: iter/loss/lr of the training steps, val_iter/val_loss of the
    evaluations, task_iter/task_score/task_label of the downstream tasks (a defaultdict(list), the shape
    plot_metrics reads). Returns the history.
    """
    history = defaultdict(list) if history is None else history
    for r in records:
        if 'loss' in r:
            for k in ('iter', 'loss', 'lr'):
                if k in r:
                    history[k].append(r[k])
        if 'val_loss' in r:
            history['val_iter'].append(r['iter'])
            history['val_loss'].append(r['val_loss'])
        if 'task' in r and 'score' in r:
            history['task_iter'].append(r['iter'])
            history['task_score'].append(r['score'])
            history['task_label'].append(f"{r['task']} {r.get('metric', '')}".strip())
    return history


class MetricsLog:
    """
    The history of a run and, when it has a work_dir, the same records appended to
    work_dir/metrics.jsonl. A resumed run keeps the records up to its checkpoint and drops the
    ones after it, which it is about to redo. A fresh run never overwrites an earlier log: it moves
    it to the next free metrics.<n>.jsonl first (kept_as says where, for the run's log line).
    """

    def __init__(self):
        self.history = defaultdict(list)
        self._file = None
        self.kept_as = None

    def open(self, work_dir, resume_iter=None):
        """ start a run's log (in memory only if work_dir is None); resume_iter: resuming from there """
        self.close()
        self.history = defaultdict(list)
        if work_dir is None:
            return
        path = os.path.join(work_dir, 'metrics.jsonl')
        os.makedirs(work_dir, exist_ok=True)
        if resume_iter is not None and os.path.exists(path):
            with open(path) as f:
                records = [json.loads(line) for line in f if line.strip()]
            records = [r for r in records if r.get('iter', 0) <= resume_iter]
            atomic_write(path, ''.join(json.dumps(r) + '\n' for r in records))
            history_of(records, self.history)
        elif resume_iter is None and os.path.isfile(path) and os.path.getsize(path) > 0:
            self.kept_as = _keep_earlier(path)
        self._file = open(path, 'a' if resume_iter is not None else 'w')

    def log(self, record):
        """ one record: into the history, and into metrics.jsonl (flushed: `tail -f` sees it now) """
        history_of([record], self.history)
        if self._file is not None:
            self._file.write(json.dumps(record) + '\n')
            self._file.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def _keep_earlier(path):
    """ move the metrics log at path to the next free metrics.<n>.jsonl beside it; returns that path """
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(f"{stem}.{n}{ext}"):
        n += 1
    os.replace(path, f"{stem}.{n}{ext}")
    return f"{stem}.{n}{ext}"


# seconds between plain progress lines when there is no bar to watch
PLAIN_PROGRESS_EVERY = 10.0


class Progress(contextlib.ExitStack):
    """
    What a person watching a long loop sees (on rank 0; enabled=False elsewhere): a tqdm bar when
    bar is on, log lines printing above it; a line every log_interval steps; and without the bar a
    line about every PLAIN_PROGRESS_EVERY seconds as well, so that a run piped to a file is never
    silent for minutes. total: the number of steps (None: no end, no ETA). A line reads
    "<what> <n>/<total>: <details>, ETA <time>", the Trainer's "iter 3/100: loss 0.3333, lr ...";
    desc and unit label the bar.
    """

    def __init__(self, total, initial=0, bar=False, log_interval=None, enabled=True, what='iter', desc=None,
                 unit='it'):
        super().__init__()
        self.total, self.initial, self.log_interval, self.enabled = total, initial, log_interval, enabled
        self.what, self.desc, self.unit = what, desc, unit
        self.show_bar = bar and enabled
        self.bar = None
        self.t_start = self.t_line = None  # when the loop started, when the last line was logged

    def __enter__(self):
        super().__enter__()
        if self.show_bar:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm
            self.enter_context(logging_redirect_tqdm())  # log lines print above the bar
            # leave=None: a bar inside another one (a sample during training) goes when it is done
            self.bar = self.enter_context(tqdm(total=self.total, initial=self.initial, desc=self.desc,
                                               unit=self.unit, dynamic_ncols=True, leave=None))
        self.t_start = self.t_line = time.monotonic()
        return self

    def update(self, iter_num, loss, lr, tokens_per_sec):
        """ the Trainer's: iter_num iterations are done, the last with this loss, lr and speed """
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:.0f}",
                                 refresh=False)
        self.advance(iter_num, f"loss {loss:.4f}, lr {lr:.3e}, {tokens_per_sec:.0f} tokens/s")

    def advance(self, n, details=''):
        """ n steps are done; details: what a line says about them """
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n - self.bar.n)
        now = time.monotonic()
        due = self.log_interval and n % self.log_interval == 0
        if due or (self.bar is None and now - self.t_line >= PLAIN_PROGRESS_EVERY):
            self.t_line = now
            line = f"{self.what} {n}" + (f"/{self.total}" if self.total else "")
            line += f": {details}" if details else ""
            if self.total and n > self.initial:
                per_step = (now - self.t_start) / (n - self.initial)
                line += ", ETA " + duration((self.total - n) * per_step)
            logger.info("%s", line)


def track(iterable, total, what, desc=None, unit='it', enabled=True):
    """
    Yield the items of iterable (total of them) with Progress shown as they are used: a bar when
    stderr is a terminal, else a line about every PLAIN_PROGRESS_EVERY seconds ("<what> n/total,
    ETA ..."). For a loop that may take minutes, such as an evaluation or a long sample.
    """
    with Progress(total, bar=sys.stderr.isatty(), enabled=enabled, what=what, desc=desc, unit=unit) as progress:
        for n, item in enumerate(iterable, 1):
            yield item
            progress.advance(n)


def duration(seconds):
    """ '45s', '3m10s', '2h05m' """
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


_warned_no_matplotlib = False


def plot_metrics(history, path):
    """
    Save a PNG of training (and validation) loss against iteration, and a downstream task's score
    on a second axis when there is one; returns path. history is
    Trainer.history or a list of metrics.jsonl records. matplotlib is optional: without it this
    logs one warning (the first time) and returns None, so a run that ends with a plot still ends
    well. Uses the Agg canvas directly, so it touches no global pyplot backend state.
    """
    global _warned_no_matplotlib
    try:
        from matplotlib.figure import Figure
    except ImportError:
        if not _warned_no_matplotlib:
            logger.warning("no loss plot: plotting needs matplotlib, which is optional: pip install matplotlib")
            _warned_no_matplotlib = True
        return None
    if isinstance(history, list):  # metrics.jsonl records
        history = history_of(history)
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.plot(history['iter'], history['loss'], lw=0.8, label='train')
    if history.get('val_loss'):
        ax.plot(history['val_iter'], history['val_loss'], 'o-', label='val')
    ax.set_xlabel('iteration')
    ax.set_ylabel('loss')
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    if history.get('task_score'):  # another scale (accuracy): its own axis on the right
        label = history['task_label'][-1]
        score = ax.twinx()
        score.plot(history['task_iter'], history['task_score'], 's--', color='C2', label=label)
        score.set_ylabel(label)
        handles = [a + b for a, b in zip(handles, score.get_legend_handles_labels())]
    ax.legend(*handles)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path

# -----------------------------------------------------------------------------
# the loss on a dataset of (x, y) rows: the Trainer's evaluation

def count_targets(y):
    """ how many targets of y count in the loss: -1 is GPT's ignore_index """
    if torch.is_tensor(y) and not y.is_floating_point():
        return y.ne(-1).sum().float()
    return torch.ones((), device=y.device if torch.is_tensor(y) else None)


def loss_only(model):
    """ the keyword arguments that have model's forward(x, y) return the loss without the logits:
    {'return_logits': False} for mingpt's GPT (mingpt.loss), {} for any other model with minGPT's
    forward(x, y) -> (logits, loss), which the Trainer trains as well """
    return {'return_logits': False} if 'return_logits' in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def dataset_loss(model, dataset, batches, device, autocast=contextlib.nullcontext, rank=0, world_size=1,
                 every_rank=False):
    """
    Mean loss per counted target of model (forward(x, y) -> (logits, loss)) on the rows of dataset
    that batches (lists of indices) name. world_size ranks share each batch, rank r taking every
    W-th row, and their sums meet in an all-reduce. every_rank: a rank with no row of a batch runs
    one anyway, uncounted (FSDP's ranks gather the weights together: none may skip a forward).
    autocast: a function returning the context each forward runs in.
    """
    was_training = model.training
    model.eval()
    kwargs = loss_only(model)
    loss_sum = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for global_idx in batches:
        mine, counted = global_idx[rank::world_size], 1
        if len(mine) == 0:
            if not every_rank:
                continue
            mine, counted = global_idx[:1], 0
        x, y = [t.to(device) for t in default_collate([dataset[int(i)] for i in mine])]
        with autocast():
            _, loss = model(x, y, **kwargs)
        n = count_targets(y) * counted
        loss_sum += loss.float() * n
        count += n
    if world_size > 1:
        both = torch.stack([loss_sum, count])
        dist.all_reduce(both)
        loss_sum, count = both[0], both[1]
    model.train(was_training)
    return (loss_sum / count.clamp(min=1)).item()
