"""Serve a model over the OpenAI API (chat and text completions, streaming) with a playground at /.

    gpt2ft serve runs/demo/sft --name sft                # http://127.0.0.1:8000/ in a browser
    gpt2ft serve gpt2 --lora shake=runs/lora --lora poet=runs/poet   # adapters chosen by `model`
    gpt2ft serve gpt2 --host 0.0.0.0 --api-key "$KEY"     # reachable from other machines

Any OpenAI client works: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything").
SIGTERM finishes the requests in flight (up to --shutdown-timeout seconds) and exits 0.
"""
from __future__ import annotations

import os

from ..argtypes import ranged
from . import add_common, add_decoding, decoding_options, load_model


def _ranged(group, flag: str, kind, lo, default, help: str, **open_ends) -> None:
    """A flag checked by argparse where it is parsed, its range shown in --help."""
    convert = ranged(kind, lo, open_ends.pop("hi", None), **open_ends)
    group.add_argument(flag, type=convert, default=default, help=f"{help} ({convert.range})")


def add_args(p):
    add_common(p, adapter_flag=False)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (a non-loopback one needs --api-key)")
    _ranged(p, "--port", int, 0, 8000, "TCP port", hi=65535)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but / and /health; printable ASCII "
                        "(when not given: $GPT2FT_API_KEY, if set)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --api-key")
    p.add_argument("--allowed-origins", nargs="+", default=(), metavar="ORIGIN",
                   help="web pages of these origins may call the API from a browser (CORS), e.g. "
                        "http://localhost:3000; * for any (default: none, same origin only)")
    p.add_argument("--name", default=None, help="the model's id in the API (when not given: MODEL as given)")
    p.add_argument("--lora", dest="adapters", action="append", default=None, metavar="NAME=DIR",
                   help="also serve MODEL + this LoRA adapter as model NAME (repeatable; base weights shared)")
    g = p.add_argument_group("limits")
    _ranged(g, "--max-batch", int, 1, 8, "most completions of one model decoded together")
    _ranged(g, "--max-queue", int, 0, 64, "most completions waiting; past it 429 + Retry-After")
    _ranged(g, "--max-tokens", int, 1, 1024, "cap on a request's max_tokens")
    _ranged(g, "--max-n", int, 1, 8, "cap on a request's n")
    _ranged(g, "--max-body", int, 1, 1 << 20, "largest request body in bytes; 413 past it")
    _ranged(g, "--timeout", float, 0, 300.0, "seconds one request may take; 503 past it", lo_open=True)
    _ranged(g, "--shutdown-timeout", float, 0, 30.0,
            "on SIGTERM, seconds to let requests in flight finish before cancelling them", lo_open=True)
    add_decoding(p)


def _check(args):
    from ..errors import UserError
    from ..serve import check_api_key, check_bind, check_origin

    for origin in args.allowed_origins:
        check_origin(origin)
    if args.api_key is not None:
        check_api_key(args.api_key)
    elif os.environ.get("GPT2FT_API_KEY"):
        args.api_key = os.environ["GPT2FT_API_KEY"]
        check_api_key(args.api_key, "$GPT2FT_API_KEY")
    check_bind(args.host, args.api_key, args.insecure)
    adapters = {}
    for spec in args.adapters or []:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise UserError(f"--lora {spec!r}: expected NAME=ADAPTER_DIR")
        if name in adapters:
            raise UserError(f"--lora {spec!r}: the name {name!r} is given twice")
        adapters[name] = folder
    if adapters and args.quantize:
        raise UserError("--quantize merges weights, so it cannot serve --lora adapters beside the base: export a "
                        "merged model per adapter (gpt2ft export --merge-lora) and serve each quantized")
    return adapters


def run(args):
    import signal

    adapters = _check(args)
    try:
        import uvicorn

        from ..serve import ServeConfig, create_app, served_model, share_base
        from ..speculative import make_engine
    except ImportError as e:
        from ..errors import UserError
        raise UserError(f"gpt2ft serve needs {e.name}: pip install 'gpt2ft[serve]'") from None

    import torch

    # Torch's parallel work runs on one thread only, the scheduler's: once two threads have each run
    # multi-threaded torch work, both OpenMP teams share the cores and decoding is ~25% slower (44.8 vs 34.4
    # tok/s for GPT-2 124M on 2 cores). So loading runs single-threaded and the threads come back for serving.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loaded = load_model(args)
    name = args.name or str(args.model).rstrip("/")
    if name in adapters:
        from ..errors import UserError
        raise UserError(f"--lora {name}=...: {name!r} is already the base model's name; pick another")
    models = [served_model(name, loaded.model, loaded.tokenizer, loaded.template, {"source": str(loaded.source)})]
    for adapter, folder in adapters.items():
        model, template = share_base(loaded.model, folder)
        models.append(served_model(adapter, model, loaded.tokenizer, template or loaded.template,
                                   {"base": name, "lora": folder}))
    config = ServeConfig(api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                         max_tokens=args.max_tokens, max_n=args.max_n, max_body=args.max_body, timeout=args.timeout,
                         allowed_origins=args.allowed_origins)
    options = decoding_options(args, loaded)
    app = create_app(models, config, lambda s: make_engine(s.model, s.tokenizer, config.max_batch, **options))
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    print(f"serving {', '.join(m.name for m in models)} on http://{args.host}:{args.port}/ "
          f"(OpenAI base URL http://{args.host}:{args.port}/v1)", flush=True)
    # uvicorn re-raises the SIGTERM it handled once it has shut down; a no-op handler makes that a clean exit 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    torch.set_num_threads(threads)  # before uvicorn's start-up starts the scheduler's thread
    server.run()
    if not server.started:
        from ..errors import UserError
        raise UserError(f"could not listen on {args.host}:{args.port} (in use? see the log above)")
    return 0
