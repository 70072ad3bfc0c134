"""
The metrics log and the plot: records into history and metrics.jsonl, truncation on resume, a PNG
from either source, and a clear warning (no crash) without matplotlib.
"""

import builtins
import contextlib
import json
import logging
import types
from unittest import mock

from mingpt import metrics
from mingpt.metrics import MetricsLog, Progress, duration, history_of, plot_metrics
from tests.common import TempDirTestCase

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


@contextlib.contextmanager
def without_matplotlib():
    """ a Python without matplotlib, as far as the code inside sees (and warned afresh about it) """
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == 'matplotlib' or name.startswith('matplotlib.'):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)
    with mock.patch.object(builtins, '__import__', fake_import), \
            mock.patch.object(metrics, '_warned_no_matplotlib', False):
        yield


def train_record(i, loss):
    return {'iter': i, 'loss': loss, 'lr': 1e-3, 'tokens_per_sec': 10.0, 'time': 0.0}


class TestMetricsLog(TempDirTestCase):

    def read(self):
        with open(self.tmp / 'metrics.jsonl') as f:
            return [json.loads(line) for line in f]

    def test_records_go_to_history_and_file(self):
        log = MetricsLog()
        log.open(self.tmp)
        for i in (1, 2):
            log.log(train_record(i, 3.0 - i))
        log.log({'iter': 2, 'val_loss': 1.5})
        log.close()
        self.assertEqual([r['iter'] for r in self.read()], [1, 2, 2])
        self.assertEqual(dict(log.history), {'iter': [1, 2], 'loss': [2.0, 1.0], 'lr': [1e-3, 1e-3],
                                             'val_iter': [2], 'val_loss': [1.5]})

    def test_resume_keeps_the_records_up_to_the_checkpoint(self):
        log = MetricsLog()
        log.open(self.tmp)
        for i in range(1, 6):
            log.log(train_record(i, 1.0 / i))
        log.log({'iter': 4, 'val_loss': 0.5})
        log.close()
        resumed = MetricsLog()
        resumed.open(self.tmp, resume_iter=3)  # iterations 4 and 5 are about to be redone
        self.assertEqual(resumed.history['iter'], [1, 2, 3])
        self.assertEqual(resumed.history['val_iter'], [])
        resumed.log(train_record(4, 0.2))
        resumed.close()
        self.assertEqual([r['iter'] for r in self.read()], [1, 2, 3, 4])

    def test_a_fresh_run_keeps_the_earlier_logs(self):
        for run in range(3):  # three runs started afresh in one work_dir, each stopped before a checkpoint
            log = MetricsLog()
            log.open(self.tmp)
            self.assertEqual(log.kept_as, None if run == 0 else str(self.tmp / f'metrics.{run}.jsonl'))
            self.assertEqual(dict(log.history), {})  # the history (and plot) is this run's alone
            for i in range(1, 4 + run):
                log.log(train_record(i, 10.0 * run + i))
            log.close()
        self.assertEqual([r['loss'] for r in self.read()], [21.0, 22.0, 23.0, 24.0, 25.0])
        for run, losses in ((1, [1.0, 2.0, 3.0]), (2, [11.0, 12.0, 13.0, 14.0])):
            with open(self.tmp / f'metrics.{run}.jsonl') as f:
                self.assertEqual([json.loads(line)['loss'] for line in f], losses)
        empty = MetricsLog()
        (self.tmp / 'metrics.jsonl').write_text('')
        empty.open(self.tmp)  # nothing to keep
        self.assertIsNone(empty.kept_as)
        self.assertFalse((self.tmp / 'metrics.3.jsonl').exists())

    def test_without_work_dir_only_history(self):
        log = MetricsLog()
        log.open(None)
        log.log(train_record(1, 1.0))
        log.close()
        self.assertEqual(log.history['loss'], [1.0])


class TestProgress(TempDirTestCase):

    def run_progress(self, times, initial=0, **kw):
        """
        The log lines of a Progress that starts at clock reading times[0] and then finishes one
        iteration at each further reading.
        """
        clock = iter(times)
        with mock.patch.object(metrics, 'time', types.SimpleNamespace(monotonic=lambda: next(clock))), \
                self.assertLogs('mingpt.metrics', logging.INFO) as logs:
            with Progress(initial=initial, **kw) as progress:
                for i in range(initial + 1, initial + len(times)):
                    progress.update(i, 1.0 / i, 1e-3, 500.0)
            logging.getLogger('mingpt.metrics').info('end')  # assertLogs needs one record at least
        return [line.split(':', 2)[2] for line in logs.output[:-1]]

    def test_plain_line_every_ten_seconds_with_eta(self):
        # iterations end at 4, 8, 12, ... seconds: lines at 12 s (iter 3) and 24 s (iter 6)
        lines = self.run_progress([0, 4, 8, 12, 16, 20, 24, 28], total=100)
        self.assertEqual(lines, ['iter 3/100: loss 0.3333, lr 1.000e-03, 500 tokens/s, ETA 6m28s',
                                 'iter 6/100: loss 0.1667, lr 1.000e-03, 500 tokens/s, ETA 6m16s'])
        # a resumed run's rate counts only its own iterations: 2 in 24 s, then 10 to go
        lines = self.run_progress([0, 12, 24], initial=88, total=100)
        self.assertEqual(lines, ['iter 89/100: loss 0.0112, lr 1.000e-03, 500 tokens/s, ETA 2m12s',
                                 'iter 90/100: loss 0.0111, lr 1.000e-03, 500 tokens/s, ETA 2m00s'])
        # no max_iters: no ETA
        self.assertEqual(self.run_progress([0, 5, 10], total=None), ['iter 2: loss 0.5000, lr 1.000e-03, 500 tokens/s'])

    def test_log_interval_lines_restart_the_clock(self):
        # iter 2 (8 s) by the interval, which restarts the clock; iter 4 (16 s) and 6 (24 s) the same
        lines = self.run_progress([0, 4, 8, 12, 16, 20, 24], total=6, log_interval=2)
        self.assertEqual([line.split(':')[0] for line in lines], ['iter 2/6', 'iter 4/6', 'iter 6/6'])

    def test_only_rank_0_reports(self):
        self.assertEqual(self.run_progress([0, 20, 40], total=2, log_interval=1, enabled=False), [])

    def test_duration(self):
        self.assertEqual([duration(s) for s in (0, 59.4, 61, 3599, 3600 * 2 + 300, -3)],
                         ['0s', '59s', '1m01s', '59m59s', '2h05m', '0s'])


class TestPlot(TempDirTestCase):

    def test_png_from_history_or_records(self):
        records = [train_record(i, 1.0 / i) for i in range(1, 5)] + [{'iter': 4, 'val_loss': 0.3}]
        self.assertEqual(history_of(records)['val_iter'], [4])
        for name, source in (('a.png', records), ('b.png', history_of(records))):
            path = self.tmp / name
            self.assertEqual(plot_metrics(source, path), path)
            self.assertEqual(path.read_bytes()[:8], PNG_MAGIC)

    def test_without_matplotlib_one_warning_and_no_png(self):
        records = [train_record(1, 1.0)]
        with without_matplotlib(), self.assertLogs('mingpt.metrics', logging.WARNING) as logs:
            self.assertIsNone(plot_metrics(records, self.tmp / 'a.png'))
            self.assertIsNone(plot_metrics(records, self.tmp / 'b.png'))
        self.assertEqual(len(logs.records), 1)
        self.assertIn('pip install matplotlib', logs.output[0])
        self.assertEqual(list(self.tmp.iterdir()), [])
