"""`lmforge serve RUN`: its options and the command that checks them and starts the server."""

from __future__ import annotations

from jsonargparse import ArgumentParser, Namespace

from lmforge.errors import ConfigError


def serve_options(p: ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run dir, checkpoint dir or Hugging Face dir of a decoder (GPT, Llama)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the "
                        "network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 = any free port)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health and the "
                                     "chat page's files")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter (lmforge run or peft folder) served as model NAME over the same base; "
                        "repeat for more")
    p.add_argument("--model-name", help="the base model's name in /v1/models and requests (default: the dir's name)")
    p.add_argument("--template", help="chat template: lmforge | llama2 | alpaca | hf (default: the one the run "
                                      "trained with, a Hugging Face dir's own, else lmforge)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (engine slots; default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; beyond it the server answers 429 (default 64)")
    p.add_argument("--prefix-cache-tokens", type=int, default=0,
                   help="KV cache budget, in tokens, for prompt prefixes shared across requests (0 = off)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds in-flight requests get to finish before they are cut (default 30)")
    p.add_argument("--ssl-certfile", help="TLS certificate (PEM): serve https")
    p.add_argument("--ssl-keyfile", help="TLS private key (PEM) of --ssl-certfile")


def _adapter_dirs(specs: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise ConfigError(f"--adapter {spec!r} must be NAME=DIR, e.g. --adapter support=runs/sft-lora")
        if name in adapters:
            raise ConfigError(f"--adapter names {name!r} twice; give each adapter its own name")
        adapters[name] = directory
    return adapters


def cmd_serve(args: Namespace) -> None:
    from lmforge.serve.server import serve

    for option, value, least in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                                 ("--port", args.port, 0), ("--prefix-cache-tokens", args.prefix_cache_tokens, 0),
                                 ("--shutdown-timeout", args.shutdown_timeout, 0)):
        if value < least:
            raise ConfigError(f"{option} must be >= {least}, got {value}")
    if args.port > 65535:
        raise ConfigError(f"--port must be at most 65535, got {args.port}")
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        raise ConfigError("--ssl-certfile and --ssl-keyfile go together; give both")
    adapters = _adapter_dirs(args.adapter)
    if args.model_name is not None and args.model_name in adapters:
        raise ConfigError(f"--model-name {args.model_name!r} is also an --adapter name; names must differ")
    serve(args.checkpoint, host=args.host, port=args.port, api_key=args.api_key, adapters=adapters,
          max_batch=args.max_batch, max_queue=args.max_queue, shutdown_timeout=args.shutdown_timeout,
          name=args.model_name, template=args.template, prefix_cache_tokens=args.prefix_cache_tokens,
          ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
