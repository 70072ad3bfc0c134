"""
python -m mingpt.serve: the web chat's command (what it serves and how: the docstring of mingpt.serve).
"""

import argparse
import logging
from pathlib import Path

from mingpt import serve
from mingpt.chat import add_sampling_args, load_chat_model, sampling_flags
from mingpt.errors import ConfigError
from mingpt.quantize import METHODS, quantize
from mingpt.serve import LOCAL_HOSTS, NEEDS, check_limits, create_app, run_server

logger = logging.getLogger('mingpt.serve')


def port_number(value):
    """ argparse type: a TCP port, 1 to 65535 """
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (1 to 65535)")
    return port


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m mingpt.serve', description=serve.__doc__.split('\n\n')[0])
    add_sampling_args(parser)  # --model, and the defaults of --temperature, --top-k, --top-p
    parser.add_argument('--host', default='127.0.0.1', help='address to bind (default 127.0.0.1: this machine only)')
    parser.add_argument('--port', type=port_number, default=8000, help='port to listen on (default 8000)')
    parser.add_argument('--allowed-hosts', default=None, metavar='NAMES',
                        help='comma-separated host names requests may be addressed to besides the loopback '
                             '(e.g. the machine\'s name with --host 0.0.0.0); "*" allows any')
    parser.add_argument('--max-tokens-limit', type=int, default=512, help='the most new tokens a request may ask for')
    parser.add_argument('--max-prompt-tokens', type=int, default=None,
                        help="longest prompt in tokens (default: the model's context less room for "
                             "the reply); older turns are dropped to fit")
    parser.add_argument('--max-concurrent', type=int, default=None,
                        help='replies generated at once, the rows of the batch (default: 16 on a CPU, 64 '
                             'on a GPU, fewer if their KV cache would pass 2 GiB); more requests wait')
    parser.add_argument('--queue-timeout', type=float, default=10.0, help='seconds a request waits for a row, then 429')
    parser.add_argument('--max-queue', type=int, default=None,
                        help='requests that may wait for a row (default 4 x --max-concurrent); more get a 429 at once')
    parser.add_argument('--quantize', choices=METHODS, default=None,
                        help='int8: the linears in int8 with per-channel scales, a quarter of the bytes (mingpt.quantize)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s', datefmt='%H:%M:%S')
    try:
        import uvicorn  # noqa: F401
        import starlette  # noqa: F401
    except ImportError:
        parser.exit(2, f"error: {NEEDS}\n")
    try:
        sampling_flags(args)
        check_limits(flags=True, max_new_tokens=args.max_tokens_limit, max_concurrent=args.max_concurrent,
                     queue_timeout=args.queue_timeout, max_prompt_tokens=args.max_prompt_tokens, max_queue=args.max_queue)
        model, tokenizer = load_chat_model(args.model, args.device)
        quantize(model, args.quantize)
        allowed = LOCAL_HOSTS + ((args.host,) if args.host not in ('0.0.0.0', '::') else ())
        if args.allowed_hosts:
            extra = [h.strip() for h in args.allowed_hosts.split(',') if h.strip()]
            allowed = None if '*' in extra else allowed + tuple(extra)
        app = create_app(model, tokenizer, model_name=Path(args.model).name or str(args.model), allowed_hosts=allowed,
                         max_new_tokens=args.max_tokens_limit, max_prompt_tokens=args.max_prompt_tokens,
                         max_concurrent=args.max_concurrent, queue_timeout=args.queue_timeout, max_queue=args.max_queue,
                         temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                         default_max_tokens=min(args.max_new_tokens, args.max_tokens_limit), engine_thread=False)
    except (ValueError, OSError) as e:  # a DownloadError is an OSError
        parser.exit(2, f"error: {e}\n")
    if args.host not in LOCAL_HOSTS:
        logger.warning("--host %s: any machine that can reach this one on port %d can now use the chat, and "
                       "it has no authentication; serve on 127.0.0.1 (the default) to keep it to this machine",
                       args.host, args.port)
    logger.info("chat with %s at http://%s:%d", args.model, args.host, args.port)
    try:
        run_server(app, args.host, args.port)
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == '__main__':
    main()
