"""Start serving: bind the port (one line when it is taken), warn about a key sent in clear text, run uvicorn, and on
SIGTERM stop accepting, let in-flight requests finish within the shutdown deadline, then return (exit status 0)."""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import socket
import sys
from typing import Any

from lmforge.errors import ConfigError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line ConfigError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise ConfigError(f"--host {host} does not resolve ({err.strerror}); give an address such as 127.0.0.1"
                          ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is already in use (another server?); choose another --port "
                              "or stop the process holding it") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror}; choose another --host or --port") from None
    return sock


def clear_text_key_warning(host: str, api_key: str | None, tls: bool) -> str | None:
    if api_key is not None and not tls and not is_loopback(host):
        return (f"lmforge: warning: --api-key on {host} without TLS sends the key and every prompt and reply in "
                "clear text over the network, where anyone on the path can read them; add --ssl-certfile/"
                "--ssl-keyfile or serve behind a TLS proxy")
    return None


def make_server(app: Any, *, shutdown_timeout: float, ssl_certfile: str | None = None,
                ssl_keyfile: str | None = None) -> Any:
    """A uvicorn Server for `app`; `server.run(sockets=[sock])` serves until SIGTERM/SIGINT or `should_exit`,
    giving in-flight requests `shutdown_timeout` seconds to finish."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                         timeout_graceful_shutdown=shutdown_timeout, ssl_certfile=ssl_certfile,
                                         ssl_keyfile=ssl_keyfile))


def engine_threads() -> int:
    """The engine process's intra-op threads: as OMP_NUM_THREADS says, else one per core but one, which the HTTP
    side keeps (the engine's threads would otherwise wait on one another whenever it runs)."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return max(1, torch.get_num_threads() - 1)


def serve(path: str, *, host: str, port: int, api_key: str | None, adapters: dict[str, str], max_batch: int,
          max_queue: int, shutdown_timeout: float, name: str | None, template: str | None,
          prefix_cache_tokens: int, ssl_certfile: str | None, ssl_keyfile: str | None) -> None:
    """`lmforge serve`: load, bind, serve until told to stop."""
    from lmforge.infer.layout import column_major_linears
    from lmforge.model.attention import Attention
    from lmforge.serve.app import create_app
    from lmforge.serve.engine_process import EngineProcess
    from lmforge.serve.metrics import Metrics
    from lmforge.serve.served import load_served
    from lmforge.serve.worker import EngineWorker

    served = load_served(path, name=name, template=template, adapters=adapters, max_batch=max_batch)
    sock = bind(host, port)  # after loading (which may fail), before announcing
    warning = clear_text_key_warning(host, api_key, tls=ssl_certfile is not None)
    if warning:
        print(warning, file=sys.stderr)
    threads = engine_threads()
    column_major_linears(served.model, threads=threads)  # before the engine process shares the weights,
    for attention in (m for m in served.model.modules() if isinstance(m, Attention)):
        attention.share_qkv_storage()  # with q|k|v one buffer again: else the engine's first decode copies them
    engine = EngineProcess(served.model, served.tokenizer, max_batch=max_batch,
                           prefix_cache_tokens=prefix_cache_tokens, threads=threads)
    worker = EngineWorker(engine, max_batch, max_queue)
    worker.start()
    bound_port = sock.getsockname()[1]
    scheme = "https" if ssl_certfile else "http"
    print(f"lmforge serve: {', '.join(served.model_names)} on {scheme}://{host}:{bound_port} (chat page at /, "
          f"OpenAI API under /v1)", file=sys.stderr, flush=True)
    server = make_server(create_app(served, worker, Metrics(), api_key), shutdown_timeout=shutdown_timeout,
                         ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    # uvicorn re-raises the SIGTERM it handled once it has shut down; with the default handler in place that would
    # kill the process (status -15) after a clean shutdown. This handler makes it a no-op: `lmforge` exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()
        engine.close()
    print("lmforge serve: stopped", file=sys.stderr)
