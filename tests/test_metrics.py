"""
The metrics log and the plot: records into history and metrics.jsonl, truncation on resume, a PNG
from either source, and a clear warning (no crash) without matplotlib.
"""

import builtins
import contextlib
import json
import logging
from unittest import mock

from mingpt import metrics
from mingpt.metrics import MetricsLog, history_of, plot_metrics
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
        MetricsLog().open(self.tmp)  # a fresh run starts the file over
        self.assertEqual(self.read(), [])

    def test_without_work_dir_only_history(self):
        log = MetricsLog()
        log.open(None)
        log.log(train_record(1, 1.0))
        log.flush()
        log.close()
        self.assertEqual(log.history['loss'], [1.0])


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
