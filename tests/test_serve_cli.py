"""`lmforge serve` from the command line: one-line refusals at start-up (a port in use, a model that cannot be served,
bad options), the clear-text key warning, and SIGTERM: in-flight requests finish, then exit status 0."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import lmforge
from cli_checks import error_line
from lmforge.cli import main
from lmforge.config import EncoderConfig
from lmforge.model import build_model
from lmforge.serve.served import load_served
from lmforge.serve.server import clear_text_key_warning, is_loopback
from lmforge.tokenizer import train_tokenizer
from serving import adapter_dir, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("serve_cli") / "tiny", max_seq_len=640)


def test_a_port_in_use_is_one_line(checkpoint: Path, capsys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(checkpoint), "--port", str(port)]) == 2
    message = error_line(capsys.readouterr().err)
    assert f"port {port}" in message and "in use" in message and "--port" in message


def test_an_encoder_is_refused_at_start_up(tmp_path: Path, capsys) -> None:
    tok = train_tokenizer(["the king rode to the castle"] * 20, vocab_size=400, show_progress=False)
    encoder = build_model(EncoderConfig(vocab_size=400, max_seq_len=32, n_layer=1, n_head=2, d_model=16, d_ff=32))
    path = lmforge.save(encoder, tok, tmp_path / "bert")
    assert main(["serve", str(path)]) == 2
    message = error_line(capsys.readouterr().err)
    assert "`serve` needs a decoder" in message and "lmforge finetune" in message  # where an encoder belongs


@pytest.mark.parametrize(("options", "named"), [
    (["--max-batch", "0"], "--max-batch"), (["--max-queue", "-1"], "--max-queue"), (["--port", "70000"], "--port"),
    (["--adapter", "nodir"], "NAME=DIR"), (["--adapter", "a=x", "--adapter", "a=y"], "twice"),
    (["--ssl-certfile", "cert.pem"], "--ssl-keyfile"), (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
    (["--host", "no.such.host.invalid"], "--host")])
def test_bad_options_are_one_line(checkpoint: Path, capsys, options: list[str], named: str) -> None:
    assert main(["serve", str(checkpoint), *options]) == 2
    assert named in error_line(capsys.readouterr().err)


def test_adapters_are_named_models_and_one_for_another_base_is_refused(checkpoint: Path, tmp_path: Path,
                                                                        capsys) -> None:
    served = load_served(checkpoint, name=None, template=None, adapters={"support": adapter_dir(tmp_path / "ok", 32)},
                         max_batch=2)
    assert served.model_names == ["tiny", "support"] and served.adapter_for("support") == "support"
    other = adapter_dir(tmp_path / "other", 16)
    assert main(["serve", str(checkpoint), "--adapter", f"wide={other}"]) == 2
    message = error_line(capsys.readouterr().err)
    assert "'wide'" in message


def test_a_key_in_clear_text_over_the_network_is_warned_about() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    warning = clear_text_key_warning("0.0.0.0", "sk-x", tls=False)
    assert warning is not None and "clear text" in warning and "TLS" in warning and "\n" not in warning
    assert clear_text_key_warning("0.0.0.0", "sk-x", tls=True) is None
    assert clear_text_key_warning("127.0.0.1", "sk-x", tls=False) is None
    assert clear_text_key_warning("0.0.0.0", None, tls=False) is None


@pytest.mark.slow  # a subprocess: ~4 s, mostly importing torch
def test_sigterm_finishes_the_request_in_flight_then_exits_0(checkpoint: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(checkpoint), "--port", "0",
                             "--shutdown-timeout", "20"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        announced = proc.stderr.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", announced)[1])
        conn = socket.create_connection(("127.0.0.1", port), timeout=30)
        body = json.dumps({"model": "tiny", "prompt": "the king", "max_tokens": 600, "temperature": 0,
                           "stream": True})
        conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        reply = conn.recv(65536)
        while b'"text"' not in reply:  # the first token has come: the request is in flight
            reply += conn.recv(65536)
        proc.send_signal(signal.SIGTERM)
        while not reply.endswith(b"0\r\n\r\n"):  # the end of the chunked body
            chunk = conn.recv(65536)
            assert chunk, "the server closed the connection before the reply ended"
            reply += chunk
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    # the chunked body's lines: chunk sizes, and the events of each write (one or more, each ending in a blank line)
    events = [json.loads(line[6:]) for line in re.split(r"\r?\n", reply.decode()) if line.startswith("data: {")]
    assert b"data: [DONE]" in reply and events[-1]["choices"][0]["finish_reason"] == "length"
    assert "lmforge serve: stopped" in proc.stderr.read()
