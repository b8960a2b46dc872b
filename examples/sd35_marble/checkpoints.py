"""Crash-safe run files for ``train.py``: step-numbered checkpoints, atomic writes, append-only logs.

Layout of an output directory::

    config.json                  the resolved configuration (written atomically)
    metrics.jsonl, eval.jsonl    one JSON row per optimizer step / per evaluation (append-only)
    checkpoints/step_000050/     a complete checkpoint (the newest --checkpoints-keep are kept)
    checkpoints/.tmp-step_.../   a checkpoint being written (never read; removed at the next start)
    checkpoints/.trash-.../      a checkpoint being deleted (never read; removed at the next start)

What makes it crash-safe (a SIGKILL or power loss at any instant):

- every file is written to a temporary name in the same folder, flushed, ``fsync``-ed and
  renamed over its final name (``os.replace``), so a reader sees the old or the new file, whole;
- a checkpoint is written into ``checkpoints/.tmp-step_N`` and becomes ``checkpoints/step_N``
  by one rename once every file in it is complete, so a folder named ``step_N`` is always a
  complete checkpoint; ``trainer_state.json`` (written last) lists the size of every file;
- old checkpoints are renamed to ``.trash-...`` before they are deleted;
- the logs are only appended to; a checkpoint records how many bytes and rows of each log
  belong to it (and their SHA-256), and a resumed run truncates the log to that length
  (dropping the rows written after the checkpoint, which it writes again) instead of
  rewriting it.

For the tests, ``SD35_MARBLE_CRASH_AT_WRITE=n`` kills the process (SIGKILL) at the n-th write
point (each state a crash can leave on disk), and ``SD35_MARBLE_WRITE_LOG=FILE`` appends each
write point's label to ``FILE``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

CRASH_ENV = "SD35_MARBLE_CRASH_AT_WRITE"
WRITE_LOG_ENV = "SD35_MARBLE_WRITE_LOG"
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_write_count = 0


class RunFileError(ValueError):
    """A run file that cannot be read or does not match its checkpoint (the message says what to do)."""


def write_point(label: str) -> None:
    """One state a crash can leave on disk; the crash hook of the tests (see the module docstring)."""
    global _write_count
    _write_count += 1
    log = os.environ.get(WRITE_LOG_ENV)
    if log:
        with open(log, "a") as fh:
            fh.write(f"{_write_count} {label}\n")
    crash = os.environ.get(CRASH_ENV)
    if crash and int(crash) == _write_count:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    """Make renames and new files in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name, fsync and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        half = len(data) // 2
        fh.write(data[:half])
        fh.flush()
        write_point(f"half-written {tmp.name}")
        fh.write(data[half:])
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    write_point(f"replaced {path.name}")
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def append_line(path: Path, line: str) -> None:
    """Append one row (a crash may leave it torn; a resume truncates it away)."""
    data = (line.rstrip("\n") + "\n").encode()
    with open(path, "ab") as fh:
        half = len(data) // 2
        fh.write(data[:half])
        fh.flush()
        write_point(f"half-appended {path.name}")
        fh.write(data[half:])
        fh.flush()


def sync_file(path: Path) -> None:
    if path.exists():
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())


def log_mark(path: Path) -> dict[str, Any]:
    """How much of an append-only log belongs to a checkpoint: bytes, rows, SHA-256."""
    data = path.read_bytes() if path.exists() else b""
    return {"bytes": len(data), "rows": data.count(b"\n"), "sha256": hashlib.sha256(data).hexdigest()}


def check_log(path: Path, mark: dict[str, Any], checkpoint: Path, fix: str) -> None:
    """Raise ``RunFileError`` unless the first ``mark["bytes"]`` bytes of ``path`` are the rows
    recorded with ``checkpoint``."""
    if not isinstance(mark, dict) or not {"bytes", "rows", "sha256"} <= set(mark):
        raise RunFileError(f"{checkpoint / STATE_FILE}: no valid record of {path.name}; {fix}")
    size = path.stat().st_size if path.exists() else 0
    fix = f"restore the file, or {fix}, or start again in a new --output-dir"
    if size < mark["bytes"]:
        raise RunFileError(
            f"{path} has {size} bytes but checkpoint {checkpoint} recorded {mark['bytes']} "
            f"({mark['rows']} rows): rows from before the checkpoint are missing; {fix}"
        )
    with open(path, "rb") as fh:
        head = fh.read(mark["bytes"])
    if hashlib.sha256(head).hexdigest() != mark["sha256"]:
        raise RunFileError(f"{path}: its first {mark['rows']} rows differ from those recorded in {checkpoint}; {fix}")


def truncate_log(path: Path, mark: dict[str, Any]) -> None:
    """Cut an append-only log back to the length a checkpoint recorded (rows written after it go)."""
    size = path.stat().st_size if path.exists() else 0
    if size > mark["bytes"]:
        os.truncate(path, mark["bytes"])
        sync_file(path)
        write_point(f"truncated {path.name}")


def read_json(path: Path, fix: str) -> Any:
    """``json.loads`` of ``path``, or ``RunFileError`` naming the file and ``fix``."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunFileError(f"{path} cannot be read ({type(exc).__name__}: {exc}); {fix}") from exc


class CheckpointStore:
    """The ``checkpoints/`` folder of a run (every method but ``complete``/``newest`` on process 0 only)."""

    def __init__(self, out_dir: Path | str) -> None:
        self.out = Path(out_dir)
        self.root = self.out / CHECKPOINTS

    def complete(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            m = _STEP_DIR.match(entry.name)
            if m and entry.is_dir():
                found.append((int(m.group(1)), entry))
        return sorted(found)

    def newest(self) -> tuple[int, Path] | None:
        done = self.complete()
        return done[-1] if done else None

    def before(self, folder: Path) -> str:
        """How to fall back from ``folder``: the text of an error's fix."""
        older = [(s, p) for s, p in self.complete() if p != folder and p.name < folder.name]
        if older:
            return f"delete {folder} to resume from the checkpoint before it (step {older[-1][0]})"
        return f"delete {folder} and resume, which starts the run again (it is the only checkpoint)"

    def clean_partial(self) -> None:
        """Remove leftovers of an interrupted write: hidden folders in ``checkpoints/`` (a save or
        deletion) and temporary files in the output directory (``.NAME.tmp-PID``)."""
        if self.out.is_dir():
            for entry in self.out.glob(".*.tmp-*"):
                if entry.is_file():
                    entry.unlink()
                    write_point(f"removed {entry.name}")
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name.startswith(".") and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                write_point(f"removed {entry.name}")

    def begin(self, step: int) -> Path:
        tmp = self.root / f".tmp-step_{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        fsync_dir(self.root)
        return tmp

    def commit(self, tmp: Path, step: int, keep: int) -> Path:
        """Make the complete folder ``tmp`` the checkpoint of ``step``, then keep the newest ``keep``."""
        final = self.root / f"step_{step:06d}"
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (a run resumed from an older checkpoint)
            self._discard(final)
        os.rename(tmp, final)
        write_point(f"committed {final.name}")
        fsync_dir(self.root)
        self.prune(keep)
        return final

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` checkpoints (each hidden by a rename first)."""
        for _, old in self.complete()[:-keep] if keep > 0 else []:
            self._discard(old)

    def _discard(self, folder: Path) -> None:
        trash = self.root / f".trash-{folder.name}-{os.getpid()}"
        os.rename(folder, trash)
        write_point(f"discarded {folder.name}")
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)


def manifest(folder: Path) -> dict[str, int]:
    """``{file name: size}`` of the files in a checkpoint folder."""
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def check_manifest(folder: Path, state: dict[str, Any], fix: str) -> None:
    files = state.get("files")
    if not isinstance(files, dict):
        raise RunFileError(f"{folder / STATE_FILE} has no file list; {fix}")
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            raise RunFileError(f"{path} is missing from the checkpoint; {fix}")
        if path.stat().st_size != size:
            raise RunFileError(f"{path} has {path.stat().st_size} bytes, the checkpoint recorded {size}; {fix}")


def move_files(src: Path, dest: Path) -> list[Path]:
    """Move every file under ``src`` to the same relative path under ``dest`` (each by one
    ``os.replace``: a reader sees a whole old or a whole new file); returns the destinations."""
    moved = []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dest / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        sync_file(path)
        os.replace(path, target)
        write_point(f"moved {target.relative_to(dest)}")
        moved.append(target)
    for folder in {t.parent for t in moved}:
        fsync_dir(folder)
    return moved
