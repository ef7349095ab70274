"""The floor under a request's fixed cost on this machine: the hops alone, with no work.

A blindinfer request crosses three processes (client -> server over TLS, server -> worker
over a pipe, and back), because the worker that parses and runs untrusted models is
isolated from the server that holds the keys. This measures what those hops cost with
nothing else in them, in Python as the real code is:

  (a) pipe ping-pong between two processes, 1 byte each way (the worker hop's floor);
  (b) TLS 1.3 request/response on loopback between two processes, 256 bytes in and
      185 bytes out, blocking sockets on both sides (the client <-> server floor);
  (c) (a) and (b) chained, as a request does: client -TLS-> server -pipe-> worker and back.

Medians over `--iterations` round trips after a warm-up. Not a test: nothing asserts a time.
Run: `.venv/bin/python bench/bench_floor.py`.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import socket
import ssl
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REQUEST = b"x" * 256
RESPONSE = b"y" * 185


def _certificate(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "floor")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _worker(read_fd: int, write_fd: int) -> None:
    while True:
        data = os.read(read_fd, 65536)
        if not data:
            return
        os.write(write_fd, b"r")


def _server(listener: socket.socket, cert: Path, key: Path, via_worker: bool) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    to_worker = from_worker = -1
    if via_worker:
        a_read, a_write = os.pipe()
        b_read, b_write = os.pipe()
        process = multiprocessing.Process(target=_worker, args=(a_read, b_write), daemon=True)
        process.start()
        to_worker, from_worker = a_write, b_read
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with context.wrap_socket(connection, server_side=True) as tls:
        while True:
            data = tls.recv(65536)
            if not data:
                return
            if via_worker:
                os.write(to_worker, b"q")
                os.read(from_worker, 1)
            tls.sendall(RESPONSE)


def _tls_round_trips(iterations: int, via_worker: bool) -> list[float]:
    with tempfile.TemporaryDirectory() as folder:
        cert, key = _certificate(Path(folder))
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        server = multiprocessing.Process(  # not a daemon: it starts the worker
            target=_server, args=(listener, cert, key, via_worker)
        )
        server.start()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cert)
        context.check_hostname = False
        raw = socket.create_connection(listener.getsockname())
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        with context.wrap_socket(raw) as tls:
            for i in range(iterations + 200):
                start = time.perf_counter()
                tls.sendall(REQUEST)
                received = 0
                while received < len(RESPONSE):
                    received += len(tls.recv(65536))
                if i >= 200:
                    times.append(time.perf_counter() - start)
        server.join(timeout=5)
        if server.is_alive():
            server.terminate()
        listener.close()
        return times


def _pipe_round_trips(iterations: int) -> list[float]:
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.Process(target=_echo, args=(child,), daemon=True)
    process.start()
    times = []
    for i in range(iterations + 200):
        start = time.perf_counter()
        parent.send_bytes(b"q")
        parent.recv_bytes()
        if i >= 200:
            times.append(time.perf_counter() - start)
    parent.send_bytes(b"")
    process.join(timeout=5)
    return times


def _echo(connection: Connection) -> None:
    while True:
        data = connection.recv_bytes()
        if not data:
            return
        connection.send_bytes(b"r")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=3000)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    rows = [
        ("(a) pipe round trip between two processes", _pipe_round_trips(args.iterations)),
        ("(b) TLS request/response, client <-> server", _tls_round_trips(args.iterations, False)),
        ("(c) client -TLS-> server -pipe-> worker, back", _tls_round_trips(args.iterations, True)),
    ]
    for label, times in rows:
        ms = sorted(t * 1000 for t in times)
        p99 = ms[int(len(ms) * 0.99)]
        print(f"{label:48s} median {statistics.median(ms):.3f} ms, p99 {p99:.3f} ms")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
