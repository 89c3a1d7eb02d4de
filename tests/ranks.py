"""Start the ranks of a test worker (torchrun's environment contract, without torchrun's agent)
and wait for them, so that a failure says why instead of waiting out a timeout:

- a rank that exits with an error stops the others at once (they would wait in a collective
  for the dead rank until gloo's 30-minute timeout);
- a run still going at `timeout` gets every rank's thread stacks (tests/dist/harness.py
  registers SIGUSR1 with faulthandler) before it is killed;
- the one failure that is the launcher's, not the code's: rank 0 could not bind the store port
  that free_port() had just seen free (another process took it in between). That run starts
  again once on a new port."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from netutil import free_port

ROOT = Path(__file__).resolve().parents[1]
PORT_TAKEN = "address already in use"


class RanksFailed(RuntimeError):
    """A run of ranks that failed, hung or wrote no results; the message holds every rank's log."""


def _start(world: int, script: Path, args: list[str], out: Path, logs: list[Path]) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
        with open(logs[rank], "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(script), "--out", str(out), *args], env=env,
                                          cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    """Every rank still running prints its threads' stacks, then is killed."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGUSR1)
    time.sleep(3)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _wait(procs: list[subprocess.Popen], timeout: float) -> str:
    """'ok', 'failed' (a rank exited non-zero) or 'hung'."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            time.sleep(5)   # the other ranks' own errors, if any, reach their logs
            _stop(procs)
            return "failed"
        if all(c == 0 for c in codes):
            return "ok"
        time.sleep(0.2)
    _stop(procs)
    return "hung"


def launch(world: int, script: Path, args: list[str], out: Path, timeout: float = 600) -> dict:
    """Start `world` ranks of `script` (each gets `--out out` and `args`); rank 0 writes `out`
    (JSON), which is returned. Raises RanksFailed."""
    logs = [out.parent / f"{out.stem}.rank{r}.log" for r in range(world)]
    for attempt in (1, 2):
        state = _wait(_start(world, script, args, out, logs), timeout)
        text = [log.read_text(errors="replace") for log in logs]
        port_race = state == "failed" and PORT_TAKEN in text[0].lower()
        if not (port_race and attempt == 1):
            break
    if state != "ok" or not out.exists():
        why = {"hung": f"still running after {timeout:.0f} s (each rank's stacks follow its output)",
               "failed": "a rank exited with an error; the others were stopped"}.get(state, "wrote no results")
        raise RanksFailed(f"{script.name} world={world}: {why}\n"
                          + "\n".join(f"--- rank {r}\n{t[-6000:]}" for r, t in enumerate(text)))
    return json.loads(out.read_text())
