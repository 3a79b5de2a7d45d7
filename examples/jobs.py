"""The example experiments' job runner: a run is a set of units, each a JSON file under
OUT/units/ once it is done.

A unit that exists is read, not run again, so a stopped run continues where it was
(``--resume``). Several processes can share one run: each claims the next unit nobody holds
(a ``.claim`` file with its pid; one left by a stopped process is taken over). The
Fashion-MNIST and placement experiments (``examples/fashion_mnist.py``,
``examples/placement.py``) run on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["Units", "continue_args", "file_digest"]


class Units:
    """One JSON file per finished run, under OUT/units/."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "units"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.dir / (key.replace("/", "__") + ".json")

    def claim_path(self, key: str) -> Path:
        return self.path(key).with_suffix(".claim")

    def get(self, key: str) -> dict[str, Any] | None:
        p = self.path(key)
        return json.loads(p.read_text()) if p.is_file() else None

    def put(self, key: str, record: dict[str, Any]) -> None:
        tmp = self.path(key).with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, **record}, indent=1) + "\n")
        tmp.replace(self.path(key))

    def all(self) -> dict[str, dict[str, Any]]:
        return {r["key"]: r for r in (json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json")))}

    def claim(self, key: str) -> bool:
        """Take ``key`` for this process; False while another live process holds it. Claims
        let several processes share one run (each takes the next unit nobody holds)."""
        path = self.claim_path(key)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text())
            except (OSError, ValueError):
                return False  # being written by its owner
            if _alive(pid):
                return False
            path.unlink(missing_ok=True)  # left by a process that was stopped
            return self.claim(key)
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True

    def run(self, key: str, make: Any, report: Any, wait: bool = True) -> dict[str, Any] | None:
        """The unit ``key``: read if it exists, else ``make()`` it (timed), store it, and
        ``report()`` on the units so far. While another process makes it: None, or with
        ``wait`` its record once that process has stored it."""
        while not self.claim(key):
            got = self.get(key)
            if got is not None or not wait:
                return got
            time.sleep(15)
        try:
            got = self.get(key)
            if got is not None:
                return got
            print(f"[{time.strftime('%H:%M:%S')}] {key} ...", flush=True)
            t0, c0 = time.perf_counter(), time.process_time()
            record = make()
            record["seconds"] = round(time.perf_counter() - t0, 1)
            # CPU time of this process: what the unit cost, whatever else the machine ran
            record["cpu_seconds"] = round(time.process_time() - c0, 1)
            record["threads"] = torch.get_num_threads()
            self.put(key, record)
        finally:
            self.claim_path(key).unlink(missing_ok=True)
        msg = {k: record[k] for k in ("test_acc", "val_acc", "acc_at_insertion") if record.get(k) is not None}
        print(f"    done in {record['seconds']:.0f}s: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in msg.items()),
              flush=True)
        report()
        return record


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def file_digest(path: Path) -> str:
    """SHA-256 of a file (the weights a unit was built on)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def continue_args(argv: list[str], flags: tuple[str, ...], with_value: tuple[str, ...]) -> list[str]:
    """``argv`` without ``flags`` and without the options in ``with_value`` and their values."""
    kept, skip = [], False
    for a in argv:
        if skip or a in flags:
            skip = False
            continue
        if a in with_value:
            skip = True
            continue
        kept.append(a)
    return kept

