"""Which study runs shared this machine: every run (of any driver, any output root) records its interval in one
machine-wide folder, so a run's ``concurrent_runs`` counts the runs that really ran beside it, not only those of
its own ``--parallel``.

A record is ``<pid>-<start ms>-<serial>.json`` holding ``{"pid", "output_dir", "start", "end"}`` (seconds since the epoch); a running
run keeps touching its file (the heartbeat), so a run killed before it could write ``end`` is known to have run
until its file's last modification."""
import itertools
import json
import os
import tempfile
import threading
import time
from typing import Dict, List, Optional

HEARTBEAT_S = 60.0
# a record whose process still exists but whose heartbeat is older than this belongs to a reused pid
STALE_S = 5 * HEARTBEAT_S
KEEP_S = 14 * 24 * 3600.0  # finished records older than this are deleted
_SERIAL = itertools.count()  # two records of one process never share a name


def default_registry() -> str:
    return os.environ.get("RUN_STUDY_REGISTRY") or os.path.join(tempfile.gettempdir(), f"semiseg_d2_study_runs_{os.getuid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def read_records(registry: str, now: Optional[float] = None) -> List[Dict]:
    """Every record of ``registry`` with a known ``end``: written by a finished run, the heartbeat's time for a run
    that died without finishing, ``now`` for a live one. Unreadable files are skipped (a record being replaced)."""
    now = time.time() if now is None else now
    records = []
    if not os.path.isdir(registry):
        return records
    for name in sorted(os.listdir(registry)):
        if not name.endswith(".json"):
            continue
        path = os.path.join(registry, name)
        try:
            with open(path) as f:
                record = json.load(f)
            mtime = os.path.getmtime(path)
            start = float(record["start"])
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        end = record.get("end")
        if end is None:
            end = now if (_alive(pid) and now - mtime <= STALE_S) else mtime
        records.append(dict(record, start=start, end=float(end), path=path))
    return records


def max_concurrent(records: List[Dict], start: float, end: float) -> int:
    """The largest number of ``records`` whose intervals overlap one instant of ``[start, end]`` (at least 1: the run
    itself, which is one of the records)."""
    events = []
    for r in records:
        lo, hi = max(r["start"], start), min(r["end"], end)
        if lo <= hi:
            events += [(lo, 1), (hi, -1)]
    events.sort(key=lambda e: (e[0], -e[1]))  # an interval that starts where another ends overlaps it
    best = running = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return max(best, 1)


class RunRecord:
    """This process's record: written at ``__enter__``, its heartbeat kept while the run lasts, ``end`` written at
    ``close``; ``close`` returns the largest number of study runs that ran at once during it, this one included."""

    def __init__(self, output_dir: str, registry: Optional[str] = None):
        self.registry = registry or default_registry()
        self.path = None
        self.record = {"pid": os.getpid(), "output_dir": os.path.abspath(output_dir), "start": None, "end": None}
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        os.makedirs(self.registry, mode=0o700, exist_ok=True)
        now = time.time()
        for r in read_records(self.registry, now):
            if r["end"] < now - KEEP_S:
                try:
                    os.remove(r["path"])
                except OSError:
                    pass
        self.record["start"] = now
        self.path = os.path.join(self.registry, f"{os.getpid()}-{int(now * 1000)}-{next(_SERIAL)}.json")
        self._save()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="study-run-heartbeat")
        self._thread.start()
        return self

    def _save(self):
        from semiseg_d2.engine.checkpoint import atomic_write_text  # imports torch: not at the driver's start-up

        atomic_write_text(json.dumps(self.record), self.path)

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def close(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        end = time.time()
        self.record["end"] = end
        self._save()
        return max_concurrent(read_records(self.registry, end), self.record["start"], end)

    def __exit__(self, *exc):
        if self.record["end"] is None:
            self.close()
        return False
