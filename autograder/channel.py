"""The grader's end of the guard's channel: a FIFO of numbered, signed records.

The guard (autograder/guard.py) writes one JSON record per line, signed with a key that only
the grader and the guard know. Here the grader reads them as they come, checks each
signature and that the numbers run 1, 2, 3, ... without a gap: a record that was forged,
replayed or swallowed on the way (the FIFO is in the sandbox, where student code could also
open it) is a finding in itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from pathlib import Path


class GuardChannel:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.key = secrets.token_bytes(32)
        self.fifo = self.folder / "guard.fifo"
        os.mkfifo(self.fifo, 0o600)
        # Opened non-blocking so that this does not wait for the writer; reads then block in the thread.
        self._fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        # A writer of our own keeps the FIFO from reading as closed before (and after) the guard's.
        self._keepalive = os.open(self.fifo, os.O_WRONLY)
        self.records: list[dict] = []
        self.problems: list[str] = []
        self._expected_seq = 1
        self._buffer = b""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def write_config(self, config: dict) -> Path:
        """The guard's configuration, with the key; the guard deletes the file when it has read it."""
        path = self.folder / f"guard-{secrets.token_hex(8)}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dict(config, key=self.key.hex(), channel=str(self.fifo)), f)
        return path

    def _run(self) -> None:
        import select

        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.2)
            if ready:
                self._read_available()

    def _read_available(self) -> None:
        with self._lock:
            self._read_locked()

    def _read_locked(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except (BlockingIOError, OSError):
                return
            if not chunk:
                return
            self._buffer += chunk
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                self._accept(line)
            if len(self._buffer) > 1 << 20:
                self._problem("the guard's channel carried an unreadable flood of data")
                self._buffer = b""

    def _accept(self, line: bytes) -> None:
        try:
            body, mac = line.rsplit(b"\t", 1)
        except ValueError:
            self._problem("a line on the guard's channel was not a signed record")
            return
        expected = hmac.new(self.key, body, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(expected, mac.strip()):
            self._problem("a record on the guard's channel had a wrong signature (forged)")
            return
        try:
            record = json.loads(body)
        except ValueError:
            self._problem("a signed record on the guard's channel was not JSON")
            return
        seq = record.get("seq")
        if seq != self._expected_seq:
            self._problem(f"records on the guard's channel went missing or were replayed "
                          f"(expected number {self._expected_seq}, got {seq})")
            if isinstance(seq, int) and seq > self._expected_seq:
                self._expected_seq = seq + 1
            return
        self._expected_seq += 1
        self.records.append(record)

    def _problem(self, message: str) -> None:
        if message not in self.problems:
            self.problems.append(message)

    def drain(self) -> list[dict]:
        """Everything received so far (reads what is waiting first)."""
        self._read_available()
        with self._lock:
            return list(self.records)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._read_available()
        for fd in (self._fd, self._keepalive):
            try:
                os.close(fd)
            except OSError:
                pass
