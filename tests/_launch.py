"""Start a test worker script as the ranks of a gloo job on 127.0.0.1 and collect their results.

A worker is called as ``python WORKER RANK WORLD PORT OUTDIR [MODE...]`` and saves what it
measured to ``OUTDIR/rank{RANK}.pt``. Used by the DDP tests (``test_distributed.py``) and the
FSDP2 tests (``test_fsdp2.py``, ``test_fsdp2_optimizer.py``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(worker: Path, outdir: Path, world: int, timeout_s: float, mode: tuple[str, ...]) -> tuple[list[int], str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(rank), str(world), str(port), str(outdir), *mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        for rank in range(world)
    ]
    deadline = time.monotonic() + timeout_s
    logs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, _ = proc.communicate()
            out += f"\n[timed out after {timeout_s} s]"
        logs.append(out)
    return [p.returncode for p in procs], "\n".join(f"--- rank {r} ---\n{log}" for r, log in enumerate(logs))


def run_workers(
    tmp_path_factory: pytest.TempPathFactory, worker: str, *mode: str, world: int = 2, timeout_s: float = 240
) -> list[dict[str, Any]]:
    """Start ``tests/<worker> RANK WORLD PORT OUTDIR *mode`` as ranks 0..world-1 (a hang fails
    after ``timeout_s``); their saved results, in rank order."""
    path = Path(__file__).with_name(worker)
    for attempt in range(2):  # a second try only if the probed port was taken meanwhile
        outdir = tmp_path_factory.mktemp(path.stem)
        codes, log = _launch(path, outdir, world, timeout_s, mode)
        if codes == [0] * world:
            return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world)]
        if "Address already in use" not in log or attempt:
            pytest.fail(f"{worker} failed (exit codes {codes}):\n{log[-8000:]}")
    raise AssertionError("unreachable")


def worker_main(run: Callable[[int, int, str], dict[str, Any]], pg_timeout_s: float = 30) -> None:
    """The body of a worker script (``python WORKER RANK WORLD PORT OUTDIR [MODE]``): join the
    gloo group (a short timeout: a collective that hangs fails the run in seconds), save
    ``run(rank, world, mode)`` to ``OUTDIR/rank{RANK}.pt``, and on any exception print it and
    exit 1 at once (without waiting for the other rank's collectives)."""
    try:
        rank, world, port, outdir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        mode = sys.argv[5] if len(sys.argv) > 5 else ""
        torch.set_num_threads(1)
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
        )  # fmt: skip
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout_s))
        results = run(rank, world, mode)
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
