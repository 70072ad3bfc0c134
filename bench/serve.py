"""
Benchmark the web chat serving many users at once: N clients talk to a real server (python -m
mingpt.serve's app and runner, in a subprocess, on 127.0.0.1) over HTTP, each request a 64-token
prompt and 128 new tokens, for N = 1, 4, 16; first with the replies batched (16 rows), then with the
same server generating one reply at a time (1 row), in one run. GPT-2 124M with random weights, fp32.

    python bench/serve.py                                   # the full benchmark (several minutes)
    python bench/serve.py --model gpt-micro --new-tokens 16 --clients 1 4 --requests 1   # a quick check

Method. Each client sends --requests requests one after another (the next when the previous reply
has ended). Client i sends its first one i/N of a reply's duration after the first client, so that
requests arrive spread out, as users do, rather than all in the same instant (16 prompts arriving
together must be prefilled one after another whatever the server does, and replies of one length
started together would end together and arrive together again, forever). Sampling is the server's
default (temperature 0.8, top-k 50); the special tokens' and partial UTF-8 tokens' output rows are
zeroed, so that every reply runs to its full length and every token arrives as an event of its own.

Reported per run: aggregate tokens/s (token events received while all N clients were active, per
second of that time), per-stream tokens/s (the median, over requests, of a reply's tokens after its
first per second), time to first token (TTFT: request sent -> first token received; median and p95).
Before the servers start, the script times in-process one prefill of the prompt and one decode step
of N rows, and prints the TTFT bound 2 x (prefill + a step of the full batch).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from mingpt.bpe import get_encoder  # noqa: E402
from mingpt.chat import ChatTokenizer, add_chat_tokens  # noqa: E402
from mingpt.hardware import pack_weights  # noqa: E402
from mingpt.model import GPT  # noqa: E402

SHARED_DATA = REPO.parent / 'shared' / 'data'


def chat_model(model_type, seed=0):
    """ (model, ChatTokenizer): a random GPT of the preset on GPT-2's vocabulary plus the chat tokens,
    never ending a reply early and never emitting a token that is not whole text (see the docstring) """
    enc = get_encoder(SHARED_DATA if (SHARED_DATA / 'encoder.json').is_file() else None)
    tok = ChatTokenizer(add_chat_tokens(enc))
    torch.manual_seed(seed)
    c = GPT.get_default_config()
    c.model_type, c.vocab_size, c.block_size = model_type, tok.n_vocab, 1024
    model = GPT(c).eval()
    partial = [i for i in range(tok.n_vocab) if '\ufffd' in tok.decode([i])]
    with torch.no_grad():
        model.lm_head.weight[sorted(tok.stop_ids) + partial] = 0
    return model, tok


def prompt_text(tok, n_tokens, i):
    """ a user message whose rendered prompt is n_tokens long (<|endoftext|> <|user|> ... <|end|> <|assistant|>) """
    words = f"request {i} :" + " hello" * n_tokens
    ids = tok.encode(words)[:n_tokens - 4]
    text = tok.decode(ids)
    assert len(tok.render_for_completion([{'role': 'user', 'content': text}])) == n_tokens
    return text


def time_steps(model, prompt_tokens, new_tokens, clients, repeats=5):
    """ in-process: seconds of one prefill of the prompt, and of one decode step of n rows for each n """
    def best(f):
        f()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times)
    pack_weights(model)  # as the server's BatchEngine does
    with torch.inference_mode():
        cache = model.make_kv_cache(max(clients))
        x = torch.randint(model.config.vocab_size, (1, prompt_tokens))
        prefill = best(lambda: model(x, kv_cache=[c.rows(0, 1) for c in cache], last_only=True))
        steps = {}
        for n in clients:
            # positions spread over a reply's span, as in a running batch
            pos = torch.linspace(prompt_tokens, prompt_tokens + new_tokens - 1, n).long()
            xs = torch.randint(model.config.vocab_size, (n, 1))
            steps[n] = best(lambda: model(xs, kv_cache=cache, cache_pos=pos, last_only=True))
    return prefill, steps

# -----------------------------------------------------------------------------
# the server, in a subprocess

def serve(args):
    """ the subprocess: the chat app on 127.0.0.1:args.port with args.rows rows, run as python -m
    mingpt.serve runs it (run_server: the engine's steps in the main thread, HTTP in another) """
    from mingpt.serve import create_app, run_server
    torch.set_num_threads(args.threads)
    model, tok = chat_model(args.model)
    app = create_app(model, tok, model_name=args.model, max_concurrent=args.rows,
                     max_queue=max(args.clients) * args.requests, queue_timeout=3600,
                     max_new_tokens=args.new_tokens, engine_thread=False)
    run_server(app, '127.0.0.1', args.port)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_server(args, rows):
    """ (process, base URL) of a server with rows rows, once it answers /health """
    import httpx
    port = free_port()
    cmd = [sys.executable, __file__, '--serve', '--rows', str(rows), '--port', str(port),
           '--model', args.model, '--threads', str(args.threads), '--new-tokens', str(args.new_tokens),
           '--requests', str(args.requests), '--clients', *map(str, args.clients)]
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f'http://127.0.0.1:{port}'
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + '/health', timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start within 300 s")

# -----------------------------------------------------------------------------
# the clients

def one_request(client, text, new_tokens):
    """ -> dict(sent, first, done, events: [receive times of the token events], tokens) """
    body = {'messages': [{'role': 'user', 'content': text}], 'max_tokens': new_tokens}
    r = {'sent': time.perf_counter(), 'events': []}
    with client.stream('POST', '/chat', json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {response.read()[:200]}")
        for line in response.iter_lines():
            if not line.startswith('data: '):
                continue
            event = json.loads(line[6:])
            if 'token' in event:
                r['events'].append(time.perf_counter())
            elif 'error' in event:
                raise RuntimeError(f"generation failed: {event['error']}")
            elif event.get('done'):
                r['tokens'] = event['tokens']
    r['first'], r['done'] = r['events'][0], time.perf_counter()
    return r


def run_clients(url, texts, n, requests, new_tokens, spread):
    """ n clients, each sending `requests` requests back to back, client i starting i * spread / n s
    after the first; -> the list of every request's timings """
    import httpx
    results, errors = [], []
    start = time.perf_counter()

    def client(i):
        time.sleep(max(0.0, start + i * spread / n - time.perf_counter()))
        try:
            with httpx.Client(base_url=url, timeout=3600) as c:
                for j in range(requests):
                    results.append(dict(one_request(c, texts[(i * requests + j) % len(texts)], new_tokens),
                                        client=i))
        except Exception as e:  # reported below, not lost in a thread
            errors.append(e)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def summarize(results, n):
    """ aggregate and per-stream tokens/s, TTFT median and p95 (seconds) """
    clients = range(n)
    # the time every client was active: from the last client's first request to the first client's end
    begin = max(min(r['sent'] for r in results if r['client'] == i) for i in clients)
    end = min(max(r['done'] for r in results if r['client'] == i) for i in clients)
    if end - begin < 1.0:  # too short to count in (a tiny run): the whole run then
        begin, end = min(r['sent'] for r in results), max(r['done'] for r in results)
    events = sum(begin <= t <= end for r in results for t in r['events'])
    ttft = sorted(r['first'] - r['sent'] for r in results)
    per_stream = [(len(r['events']) - 1) / (r['done'] - r['first']) for r in results if len(r['events']) > 1]
    return {'aggregate': events / (end - begin),
            'per_stream': statistics.median(per_stream) if per_stream else float('nan'),
            'ttft_median': statistics.median(ttft),
            'ttft_p95': ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='gpt2', help='a preset of mingpt.model (default gpt2: 124M)')
    parser.add_argument('--clients', type=int, nargs='+', default=[1, 4, 16], help='values of N (default 1 4 16)')
    parser.add_argument('--prompt-tokens', type=int, default=64)
    parser.add_argument('--new-tokens', type=int, default=128)
    parser.add_argument('--requests', type=int, default=2, help='requests per client, back to back (default 2)')
    parser.add_argument('--rows', type=int, default=None, help='rows of the batched server (default: the '
                                                              'largest N)')
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    parser.add_argument('--skip-sequential', action='store_true', help='only the batched server')
    parser.add_argument('--serve', action='store_true', help=argparse.SUPPRESS)  # the server subprocess
    parser.add_argument('--port', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args)
    torch.set_num_threads(args.threads)
    rows = args.rows or max(args.clients)

    model, tok = chat_model(args.model)
    texts = [prompt_text(tok, args.prompt_tokens, i) for i in range(64)]
    prefill, steps = time_steps(model, args.prompt_tokens, args.new_tokens, sorted({1, rows, *args.clients}))
    del model
    print(f"{args.model}, {args.threads} threads, {args.prompt_tokens}-token prompts, {args.new_tokens} new "
          f"tokens, {args.requests} requests per client; in-process: prefill {prefill * 1e3:.0f} ms, decode step "
          + ', '.join(f"{n} rows {s * 1e3:.0f} ms" for n, s in steps.items()), flush=True)

    table = []
    for label, server_rows in [('batched', rows)] + ([] if args.skip_sequential else [('one at a time', 1)]):
        proc, url = start_server(args, server_rows)
        try:
            for n in args.clients:
                # a reply's duration, as the server will take it: requests spread over one of them
                step = steps[min(n, server_rows)]
                spread = prefill + args.new_tokens * step
                s = summarize(run_clients(url, texts, n, args.requests, args.new_tokens, spread), n)
                table.append((label, server_rows, n, s))
                print(f"  {label}, {n} clients: {s['aggregate']:.1f} tokens/s", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)

    base = next((s['aggregate'] for label, _, n, s in table if label == 'batched' and n == 1), None)
    print()
    print("| server | rows | clients | aggregate tokens/s | vs 1 client | per-stream tokens/s "
          "| TTFT median (s) | TTFT p95 (s) | TTFT bound (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, server_rows, n, s in table:
        bound = f"{2 * (prefill + steps[n]):.3f}" if server_rows >= n else '-'  # one at a time: a queue
        ratio = f"{s['aggregate'] / base:.2f}x" if base else '-'
        print(f"| {label} | {server_rows} | {n} | {s['aggregate']:.1f} | {ratio} | {s['per_stream']:.1f} "
              f"| {s['ttft_median']:.3f} | {s['ttft_p95']:.3f} | {bound} |")
    print()
    print("TTFT bound: 2 x (one prefill + one decode step of the batch's rows), timed in-process. "
          "Targets: aggregate at 16 clients >= 6x that at 1 client; TTFT p95 at 16 clients under the bound.")


if __name__ == '__main__':
    main()
