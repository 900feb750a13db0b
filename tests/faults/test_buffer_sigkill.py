"""The replay buffer survives its writer being SIGKILLed at random moments during writes.

A writer process adds samples, commits batches and marks some acknowledged, in a tight
loop on one real SQLite file (WAL, synchronous=FULL). It reports each sample id, batch
and ack on its stdout only after the call that committed it returned. The test kills it
with SIGKILL at a random moment, at least 50 times; after every kill it checks that
``PRAGMA integrity_check`` is ``ok``, that every reported sample, batch claim and ack is
there, and that the buffer still opens, decrypts and continues the sequence.

The storage key is a fixed 32-byte software key: where the key comes from (the TPM in
production) is irrelevant to SQLite's crash safety, which is what this test is about;
tests/integration/test_buffer_restart.py covers the TPM-sealed key across a SIGKILL.

Writers are forked from one pre-imported "zygote" process so that 50+ kills fit in a
few seconds; every writer is still a separate process that opens its own connection.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from edge_daemon.buffer import ReplayBuffer
from fleet_protocol.features import N_BANDS, N_FRAMES

KILLS = 55
KEY = bytes(range(7, 39))  # fixed software key (see the module docstring)

ZYGOTE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import numpy as np
    from edge_daemon.buffer import ReplayBuffer
    from fleet_protocol.batch import SampleMeta
    from fleet_protocol.features import N_BANDS, N_FRAMES

    KEY = bytes(range(7, 39))

    def writer(run: int, db: Path, out: Path) -> None:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)  # the report goes to this process's stdout

        def report(*words: object) -> None:
            os.write(1, (" ".join(map(str, words)) + "\\n").encode())

        buf = ReplayBuffer(db, KEY, max_bytes=1 << 40)
        rng = np.random.default_rng(run)
        report("ready")
        i = 0
        while True:
            sid = f"{run:08x}{i:024x}"
            meta = SampleMeta(sample_id=sid, captured_at_ms=i, stream_offset_s=float(i), predicted="horn", score=0.5, model_sha256="ab" * 32, reason="audit")
            if buf.add(meta, np.full((N_BANDS, N_FRAMES), i % 2048, dtype=np.float16)):
                report("S", sid)
            i += 1
            if i % 3 == 0:
                claim = [m.sample_id for m, _ in buf.unbatched(int(rng.integers(1, 5)))]
                bid, seq = os.urandom(16).hex(), buf.next_seq()
                envelope = os.urandom(int(rng.integers(64, 40_000)))
                buf.commit_batch(bid, seq, i, envelope, claim)
                report("B", bid, seq, *claim)
                if rng.random() < 0.5 and buf.mark_acked(bid):
                    report("A", bid)

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
    for line in sys.stdin:
        run, db, out = line.split()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                writer(int(run), Path(db), Path(out))
            finally:
                os._exit(1)
        sys.stdout.write(f"{pid}\\n")
        sys.stdout.flush()
    """
)


def _wait_for(cond: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.002)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _complete_lines(path: Path) -> list[list[str]]:
    text = path.read_text() if path.exists() else ""
    return [line.split() for line in text.split("\n")[:-1]]  # a torn last line is dropped


def _check(
    db_path: Path, samples: set[str], batches: dict[str, tuple[int, list[str]]], acked: set[str]
) -> None:
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = {r[0]: r[1] for r in db.execute("SELECT sample_id, batch_id FROM samples")}
        rows = {r[0]: (r[1], r[2]) for r in db.execute("SELECT batch_id, seq, acked FROM batches")}
    missing = samples - stored.keys()
    assert not missing, f"{len(missing)} committed samples lost"
    for bid, (seq, claim) in batches.items():
        assert rows[bid][0] == seq
        assert all(stored[s] == bid for s in claim)
    assert all(rows[b][1] == 1 for b in acked)


def test_committed_samples_survive_sigkill_at_random_moments(tmp_path: Path) -> None:
    db_path = tmp_path / "buffer.sqlite3"
    rnd = random.Random(1234)
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert zygote.stdin is not None and zygote.stdout is not None
    samples: set[str] = set()
    batches: dict[str, tuple[int, list[str]]] = {}
    acked: set[str] = set()
    killed_after: list[int] = []  # reports each writer made before it was killed
    try:
        for run in range(KILLS):
            out = tmp_path / f"writer-{run}.out"
            zygote.stdin.write(f"{run} {db_path} {out}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            # writes have begun once the first sample is reported; kill at a random moment after
            _wait_for(lambda out=out: any(w[0] == "S" for w in _complete_lines(out)), 30)
            time.sleep(rnd.uniform(0.0, 0.1))
            os.kill(pid, signal.SIGKILL)
            _wait_for(lambda pid=pid: _gone(pid), 30)
            lines = _complete_lines(out)
            killed_after += [sum(w[0] in "SBA" for w in lines)]
            for words in lines:
                if words[0] == "S":
                    samples.add(words[1])
                elif words[0] == "B":
                    batches[words[1]] = (int(words[2]), words[3:])
                elif words[0] == "A":
                    acked.add(words[1])
            _check(db_path, samples, batches, acked)
    finally:
        zygote.kill()
        zygote.wait(10)
    assert len(killed_after) == KILLS >= 50
    assert len(set(killed_after)) > 10, "kills must land at varied moments of the write loop"
    buf = ReplayBuffer(db_path, KEY, max_bytes=1 << 40)
    assert buf.next_seq() > max(seq for seq, _ in batches.values())
    unsent = buf.unbatched(1_000_000)
    assert all(f.shape == (N_BANDS, N_FRAMES) and np.all(f == f[0, 0]) for _, f in unsent)
    buf.close()
