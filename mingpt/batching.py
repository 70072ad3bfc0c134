"""
Many generations at once: continuous batching. A BatchEngine is the one decode step of
mingpt.decoder (a Decoder: a KV cache of `rows` rows, one running request per row, each step ONE
forward for all of them) driven by a thread, with requests handed over through thread-safe queues.

    engine = BatchEngine(model, rows=16)               # a KV cache of 16 rows, one thread of steps
    request = engine.submit(ids, 100, do_sample=True, temperature=0.8, seed=0)
    for tok in request:                                # this request's new token ids (ints)
        ...
    engine.close()

Why. Decoding one token of one sequence reads every weight of the model once; a step of 16
sequences reads them once too, and its 16-row matmuls cost little more than a single row on a CPU
until the arithmetic, not the memory, is the limit. Serving concurrent users one after another
leaves most of the machine idle; stepping all of them together does not.

Each step: requests whose consumer stopped listening (cancel(), should_stop) leave, freeing their
rows; every running request gets its next token (Decoder.step); waiting requests take the free rows,
each prefilled and given its first token, and join the batched forward at the next step. Each
request samples with its own options and generator and attends to its own row only, so its tokens
are those of the same request generated alone by mingpt.generate.stream (see mingpt.decoder). A
request whose forward, sampling or callback fails ends alone with an error; the others run on.

submit() from any thread; the steps in the engine's own thread (or the caller's: threaded=False);
each request's tokens on a queue its consumer reads.
"""

import collections
import logging
import queue
import threading
import time

from mingpt.decoder import Decoder, Sequence
from mingpt.errors import ConfigError
from mingpt.generate import prepare_prompts, sequence_options

logger = logging.getLogger(__name__)

_END = object()  # the end of a request's token queue


def default_rows(model, budget_bytes=2 << 30):
    """
    The number of batch rows when the user gives none: 16 on a CPU, where a decode step of 16 rows
    costs a few single ones (the weights are read once per step, and 16-row matmuls are still
    cheap for a few cores), 64 on a GPU, which has far more arithmetic per byte read; fewer if the
    rows' KV cache (2 x n_layer x block_size x n_embd values per row) would pass budget_bytes.
    """
    p = next(model.parameters())
    c = model.config
    per_row = 2 * c.n_layer * model.block_size * c.n_embd * p.element_size()
    return max(1, min(16 if p.device.type == 'cpu' else 64, budget_bytes // per_row))


class Request(Sequence):
    """
    One generation in the batch (a mingpt.decoder.Sequence) and the queue its new tokens go out on.
    Iterate it for the token ids (ints) as they come; leaving the loop early cancels it.
    finish_reason says why it ended: 'stop' (eos_token_id), 'length' (max_new_tokens),
    'cancelled', or 'error' (the iteration then raises a RuntimeError saying what failed).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cancelled = False
        self.done = threading.Event()  # set once it has ended and its row is free
        self._out = queue.SimpleQueue()  # token ids, then an exception or _END

    def cancel(self):
        """ stop generating: the request leaves the batch (or the queue) at the next step """
        self.cancelled = True

    def stopped(self):
        return self.cancelled or super().stopped()

    def emit(self, tok):
        self._out.put(tok)

    def finish(self, reason, error=None):
        super().finish(reason, error)
        self.done.set()
        if error is not None:
            failed = RuntimeError(f"generation failed: {type(error).__name__}: {error}")
            failed.__cause__ = error
            self._out.put(failed)
        else:
            self._out.put(_END)

    def __iter__(self):
        try:
            while (item := self._out.get()) is not _END:
                if isinstance(item, BaseException):
                    self._out.put(_END)
                    raise item
                yield item
            self._out.put(_END)  # iterating an ended request again ends at once rather than wait forever
        finally:
            self.cancel()  # a consumer that stops listening frees the row; after the end, a no-op


class BatchEngine:
    """
    A pool of `rows` KV-cache rows (default: default_rows(model)) and the thread that steps
    every running request together; see the module docstring. threaded=False starts no thread:
    the caller steps, by calling step() (to control exactly when requests join) or run() (in a
    thread of its choosing, until close()). A context manager, or call close(). On a CPU in fp32,
    the model's big weights are also held in oneDNN's blocked layout, for the many-row products of
    the steps and prefills (the Decoder calls mingpt.hardware.pack_weights).
    """

    RATE_WINDOW = 10.0  # seconds over which stats() counts tokens per second

    def __init__(self, model, rows=None, *, threaded=True):
        self.model = model
        self.n_rows = default_rows(model) if rows is None else rows
        if self.n_rows < 1:
            raise ConfigError(f"a batch needs at least 1 row (got rows={rows})")
        self.decoder = Decoder(model, self.n_rows)  # touched by the stepping thread only
        self.device = next(model.parameters()).device
        self.threaded = threaded
        self.waiting = collections.deque()  # submitted requests waiting for a row
        self.lock = threading.Condition()
        self.closed = False
        self.stepper = None  # the thread in run(): the engine's own (started at the first submit), or the caller's
        self.stopped = threading.Event()  # set when run() returns
        self.recent = collections.deque()  # (time, tokens) of the steps of the last RATE_WINDOW seconds
        self.started = time.monotonic()

    def request(self, prompt, max_new_tokens, options=None, *, should_stop=None, on_logits=None, **kwargs):
        """
        A Request, every argument checked (a ConfigError, or PromptTooLong for a prompt longer than
        the context), not yet submitted. prompt: a 1-D sequence of token ids. options (a
        mingpt.sampling.SamplingOptions, or its fields as keywords) and kwargs (generator, window_keep,
        speculative decoding) are mingpt.generate.stream's; should_stop() is asked before every step (True: cancel);
        on_logits(logits) is called in the engine's thread with the (V,) logits each token is
        sampled from (an inference tensor: copy it to keep it).
        """
        how = sequence_options(self.model, max_new_tokens, options, **kwargs)
        _, (tokens,) = prepare_prompts(self.model, [prompt])
        return Request(tokens, max_new_tokens, should_stop=should_stop, on_logits=on_logits, **how)

    def submit(self, prompt_or_request, max_new_tokens=None, **kwargs):
        """
        Queue a request (a Request from request(), or request()'s arguments) for the next free row;
        it starts at the next step. Starts the engine's thread if it is not running. -> the Request
        """
        req = prompt_or_request
        if not isinstance(req, Request):
            req = self.request(req, max_new_tokens, **kwargs)
        if req.max_new_tokens == 0:
            req.finish('length')
            return req
        with self.lock:
            if self.closed:
                raise RuntimeError("this BatchEngine is closed")
            self.waiting.append(req)
            if self.stepper is None and self.threaded:
                self.stepper = threading.Thread(target=self._run, name='mingpt-batch', daemon=True)
                self.stepper.start()
            self.lock.notify()
        return req

    def close(self):
        """ stop the thread after its current step; every request not finished ends 'cancelled' """
        with self.lock:
            self.closed = True
            self.lock.notify()
        if self.stepper is not None and self.stepper is not threading.current_thread():
            self.stopped.wait()
        with self.lock:
            left, self.decoder.rows = self.decoder.rows + list(self.waiting), []
            self.waiting.clear()
        for req in left:
            req.finish('cancelled')

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def stats(self):
        """ rows, rows_in_use, queued, tokens_per_second (over the last RATE_WINDOW seconds) """
        now = time.monotonic()
        with self.lock:
            tokens = sum(n for t, n in self.recent if t > now - self.RATE_WINDOW)
        span = min(self.RATE_WINDOW, now - self.started)
        return {'rows': self.n_rows, 'rows_in_use': len(self.decoder.rows), 'queued': len(self.waiting),
                'tokens_per_second': round(tokens / span, 1) if span > 0 else 0.0}

    # -------------------------------------------------------------------------
    # the steps

    def run(self):
        """
        Step in the calling thread until close(), with threaded=False. Why a caller would: the
        thread that loaded the model owns an OpenMP thread pool already, and a second thread doing
        the model's work starts another; with more pool threads than cores, OpenMP's threads sleep
        between parallel regions instead of spinning, and every step is slower (mingpt.serve
        steps in its main thread and serves HTTP from another: see serve.run_server).
        """
        if self.threaded:
            raise RuntimeError("this BatchEngine steps in its own thread; run() is for threaded=False")
        self.stepper = threading.current_thread()
        self._run()

    def _run(self):
        try:
            while True:
                with self.lock:
                    while not (self.closed or self.waiting or self.decoder.rows):
                        self.lock.wait()
                    if self.closed:
                        return
                try:
                    self.step()
                except Exception as e:  # a failure no request owns (a bug): the running ones end, the engine goes on
                    logger.exception("a generation step failed")
                    failed, self.decoder.rows = self.decoder.rows, []
                    for req in failed:
                        req.finish('error', e)
        finally:
            self.stopped.set()

    def step(self):
        """
        One step (see the module docstring): the engine's thread calls it in a loop; with
        threaded=False the caller does. Returns the number of tokens generated.
        """
        n_tokens = self.decoder.step()  # cancelled requests leave first, freeing their rows
        n_tokens += self._join()
        now = time.monotonic()
        with self.lock:
            self.recent.append((now, n_tokens))
            while self.recent[0][0] < now - self.RATE_WINDOW:
                self.recent.popleft()
        return n_tokens

    def _join(self):
        """ waiting requests into the free rows, prefilled and given their first token """
        with self.lock:
            for req in [r for r in self.waiting if r.stopped()]:
                self.waiting.remove(req)
                req.finish('cancelled')
            joining = [self.waiting.popleft()
                       for _ in range(min(len(self.waiting), self.n_rows - len(self.decoder.rows)))]
        return self.decoder.add(joining) if joining else 0
