"""
Many generations at once: continuous batching, built from the generation engine's own parts
(mingpt.generate: its option checks, its context-window rule and its `sample`).

    engine = BatchEngine(model, rows=16)               # a KV cache of 16 rows, one thread of steps
    request = engine.submit(ids, 100, do_sample=True, temperature=0.8, seed=0)
    for tok in request:                                # this request's new token ids (ints)
        ...
    engine.close()

Why. Decoding one token of one sequence reads every weight of the model once; a step of 16
sequences reads them once too, and its 16-row matmuls cost little more than a single row on a CPU
until the arithmetic, not the memory, is the limit. Serving concurrent users one after another
leaves most of the machine idle; stepping all of them together does not.

How. The engine owns one KV cache of `rows` rows (model.make_kv_cache(rows)); a running request
owns one row, rows 0..n-1 for the n running requests. Each step:

1. a request whose consumer stopped listening (cancel(), should_stop) leaves, freeing its row;
2. ONE forward decodes the newest token of every row, each row at its own position
   (cache_pos is a (n,) tensor: see GPT.forward), and each request samples its own next token
   with its own settings and its own torch.Generator. A row whose sequence fills the context
   instead re-prefills its last window_keep tokens alone (as mingpt.generate.stream does); its
   slot in the batched forward writes position 0 of its row, which that prefill rewrites;
3. a request that emitted its eos token or its last token leaves: the last row moves into its
   place (a copy of that row's cache), so the running requests always fill rows 0..n-1;
4. waiting requests take the free rows: each is prefilled alone into its row (a prompt's
   forward is compute-bound, so batching prefills would gain little), emits its first token, and
   joins the batched forward at the next step.

A row's output does not depend on its neighbours: every row attends only to its own cache
positions (the mask hides other requests and whatever an earlier owner of the row left past the
row's position), its position ids are its own, and everything else in a transformer works on each
row separately. So each request's tokens are those of the same request generated alone by
mingpt.generate.stream, with its logits within float rounding of them (the batched matmuls sum in
another order).

Requests are handed over through thread-safe queues: submit() from any thread, the steps in the
engine's own thread, each request's tokens on a queue its consumer reads.
"""

import collections
import logging
import queue
import threading
import time

import torch

from mingpt.errors import ConfigError
from mingpt.generate import decoding_options, next_input, prepare_prompts, sample
from mingpt.hardware import pack_weights

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


class Request:
    """
    One generation in the batch: its tokens so far, its decoding options, and the queue its new
    tokens go out on. Iterate it for the token ids (ints) as they come; leaving the loop early
    cancels it. finish_reason says why it ended: 'stop' (eos_token_id), 'length' (max_new_tokens),
    'cancelled', or 'error' (the iteration then raises the step's error).
    """

    def __init__(self, tokens, max_new_tokens, keep, how, eos_token_id, should_stop, on_logits):
        self.tokens = tokens  # prompt + generated ids, a list of ints
        self.max_new_tokens, self.keep, self.how = max_new_tokens, keep, how
        self.eos_token_id, self.should_stop, self.on_logits = eos_token_id, should_stop, on_logits
        self.n_new = 0  # tokens generated so far
        self.cache_len = 0  # positions of this request's row that hold its tokens
        self.finish_reason = None
        self.cancelled = False
        self._out = queue.SimpleQueue()  # token ids, then an exception or _END

    def cancel(self):
        """ stop generating: the request leaves the batch (or the queue) at the next step """
        self.cancelled = True

    def stopped(self):
        return self.cancelled or (self.should_stop is not None and self.should_stop())

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

    def _finish(self, reason, error=None):
        self.finish_reason = reason
        self._out.put(_END if error is None else error)


class BatchEngine:
    """
    A pool of `rows` KV-cache rows (default: default_rows(model)) and the thread that steps
    every running request together; see the module docstring. threaded=False starts no thread:
    the caller steps, by calling step() (to control exactly when requests join) or run() (in a
    thread of its choosing, until close()). A context manager, or call close(). On a CPU in fp32,
    the model's big weights are also held in oneDNN's blocked layout, for the many-row products of
    the steps and prefills (mingpt.hardware.pack_weights).
    """

    RATE_WINDOW = 10.0  # seconds over which stats() counts tokens per second

    def __init__(self, model, rows=None, *, threaded=True):
        self.model = model
        self.n_rows = default_rows(model) if rows is None else rows
        if self.n_rows < 1:
            raise ConfigError(f"a batch needs at least 1 row (got rows={rows})")
        self.cache = model.make_kv_cache(self.n_rows)
        pack_weights(model)  # a step's products have a row per request: see hardware.pack_weights
        self.device = next(model.parameters()).device
        self.threaded = threaded
        self.rows = []  # the running requests, request i in row i; touched by the stepping thread only
        self.waiting = collections.deque()  # submitted requests waiting for a row
        self.lock = threading.Condition()
        self.closed = False
        self.stepper = None  # the thread in run(): the engine's own (started at the first submit), or the caller's
        self.stopped = threading.Event()  # set when run() returns
        self.recent = collections.deque()  # (time, tokens) of the steps of the last RATE_WINDOW seconds
        self.started = time.monotonic()

    def request(self, prompt, max_new_tokens, *, temperature=1.0, do_sample=False, top_k=None,
                top_p=None, generator=None, seed=None, eos_token_id=None, window_keep=None,
                should_stop=None, on_logits=None):
        """
        A Request, every argument checked (a ConfigError, or PromptTooLong for a prompt longer than
        the context), not yet submitted. prompt: a 1-D sequence of token ids. The options are
        mingpt.generate.stream's; should_stop() is asked before every step (True: cancel);
        on_logits(logits), called in the engine's thread with the (V,) logits each token is
        sampled from (an inference tensor: copy it to keep it).
        """
        keep, how = decoding_options(self.model, max_new_tokens, temperature=temperature,
                                     do_sample=do_sample, top_k=top_k, top_p=top_p,
                                     generator=generator, seed=seed, window_keep=window_keep)
        idx, _ = prepare_prompts(self.model, [prompt])
        return Request(idx[0].tolist(), max_new_tokens, keep, how, eos_token_id, should_stop, on_logits)

    def submit(self, prompt_or_request, max_new_tokens=None, **kwargs):
        """
        Queue a request (a Request from request(), or request()'s arguments) for the next free row;
        it starts at the next step. Starts the engine's thread if it is not running. -> the Request
        """
        req = prompt_or_request
        if not isinstance(req, Request):
            req = self.request(req, max_new_tokens, **kwargs)
        if req.max_new_tokens == 0:
            req._finish('length')
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
            left, self.rows = self.rows + list(self.waiting), []
            self.waiting.clear()
        for req in left:
            req._finish('cancelled')

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
        return {'rows': self.n_rows, 'rows_in_use': len(self.rows), 'queued': len(self.waiting),
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
                    while not (self.closed or self.waiting or self.rows):
                        self.lock.wait()
                    if self.closed:
                        return
                try:
                    self.step()
                except Exception as e:  # a bug or an out-of-memory: the running requests fail, the engine goes on
                    logger.exception("a generation step failed")
                    failed, self.rows = self.rows, []
                    for req in failed:
                        req._finish('error', RuntimeError(f"generation failed: {type(e).__name__}: {e}"))
        finally:
            self.stopped.set()

    def step(self):
        """
        One step (see the module docstring): the engine's thread calls it in a loop; with
        threaded=False the caller does. Returns the number of tokens generated.
        """
        n_tokens = 0
        with torch.inference_mode():
            self._leave([i for i, req in enumerate(self.rows) if req.stopped()], 'cancelled')
            if self.rows:
                n_tokens += self._decode()
            n_tokens += self._join()
        now = time.monotonic()
        with self.lock:
            self.recent.append((now, n_tokens))
            while self.recent[0][0] < now - self.RATE_WINDOW:
                self.recent.popleft()
        return n_tokens

    def _decode(self):
        """ one token for every row: one batched forward, re-prefills for rows whose context is full """
        block_size = self.model.block_size
        starts = [next_input(len(r.tokens), r.cache_len, block_size, r.keep) for r in self.rows]
        decoding = [cache_pos > 0 for _, cache_pos in starts]
        if any(decoding):
            # a row that re-prefills below is fed token 0 at position 0: its prefill rewrites it
            x = torch.tensor([[r.tokens[-1] if d else 0] for r, d in zip(self.rows, decoding)],
                             device=self.device)  # (n, 1)
            pos = torch.tensor([r.cache_len if d else 0 for r, d in zip(self.rows, decoding)],
                               device=self.device)  # (n,)
            logits, _ = self.model(x, kv_cache=self.cache, cache_pos=pos, last_only=True)  # (n, 1, V)
        done = []
        for i, req in enumerate(self.rows):
            if decoding[i]:
                req.cache_len += 1
                self._emit(req, logits[i, -1])
            else:
                self._prefill(i, starts[i][0])
            if req.finish_reason is not None:
                done.append(i)
        self._leave(done)
        return len(decoding)

    def _join(self):
        """ waiting requests into the free rows, each prefilled and given its first token """
        with self.lock:
            for req in [r for r in self.waiting if r.stopped()]:
                self.waiting.remove(req)
                req._finish('cancelled')
        n_tokens = 0
        while len(self.rows) < self.n_rows:
            with self.lock:
                if not self.waiting:
                    break
                req = self.waiting.popleft()
            self.rows.append(req)
            self._prefill(len(self.rows) - 1, 0)
            n_tokens += 1
            if req.finish_reason is not None:  # its first token was its last: the row is free again
                self._leave([len(self.rows) - 1])
        return n_tokens

    def _prefill(self, i, start):
        """ row i's tokens from start on, alone into its row at position 0; its next token """
        req = self.rows[i]
        x = torch.tensor(req.tokens[start:], device=self.device)[None]  # (1, T)
        logits, _ = self.model(x, kv_cache=[layer.row(i) for layer in self.cache], cache_pos=0,
                               last_only=True)  # (1, 1, V)
        req.cache_len = x.size(1)
        self._emit(req, logits[0, -1])

    def _emit(self, req, logits):
        """ sample req's next token from its logits (V,) with its own options, and send it """
        if req.on_logits is not None:
            req.on_logits(logits)
        tok = int(sample(logits[None], **req.how))
        req.tokens.append(tok)
        req.n_new += 1
        req._out.put(tok)
        if tok == req.eos_token_id:
            req.finish_reason = 'stop'
        elif req.n_new == req.max_new_tokens:
            req.finish_reason = 'length'

    def _leave(self, indices, reason=None):
        """
        Free the rows at indices (their requests end, with reason or their own finish_reason):
        the last row's request moves into each freed row, so rows 0..n-1 stay the running ones.
        """
        for i in sorted(indices, reverse=True):
            req = self.rows[i]
            req._finish(reason or req.finish_reason)
            last = self.rows.pop()
            if i < len(self.rows):
                self.rows[i] = last
                for layer in self.cache:
                    layer.k[i, :, :last.cache_len] = layer.k[len(self.rows), :, :last.cache_len]
                    layer.v[i, :, :last.cache_len] = layer.v[len(self.rows), :, :last.cache_len]
