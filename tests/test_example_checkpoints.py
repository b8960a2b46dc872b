"""Crash safety of the example's checkpoints (examples/sd35_marble/checkpoints.py).

A real run of ``train.py`` (the digits preset in its smallest configuration) is killed with
SIGKILL at every write point of a fresh run (``SD35_MARBLE_CRASH_AT_WRITE=n``: every state a
crash can leave on disk: a half-written temporary file, each rename, each half-appended log
row, each moved output file, the commit and the deletion of a checkpoint), then resumed and
killed again at the same write point of the resume, then resumed to the end. Every
sequence must end with the weights, the metrics rows and the evaluation rows of a run that
was never interrupted, and no leftovers.

The runs are forked from this process (each child calls ``train.main`` and dies by SIGKILL or
exits), so that the ~70 runs take seconds rather than an interpreter start each; one
sequence also runs as real subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sd35_marble"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import checkpoints  # noqa: E402
import train  # noqa: E402

# two steps, a checkpoint after each (the second deletes the first), the smallest batches
FAST = [
    "--max-steps", "2", "--checkpoint-every", "1", "--checkpoints-keep", "1",
    "--prompts-per-step", "2", "--group-size", "2", "--sampling-steps", "2", "--train-timesteps", "1",
    "--sample-batch-size", "4", "--train-batch-size", "4", "--grid-images-per-prompt", "1",
    "--num-threads", "1",
]  # fmt: skip
TIME_KEYS = ("rollout_time", "reward_time", "train_time", "step_time")


def forked(argv: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``train.main(argv)`` in a forked child; its exit status, or -signal if killed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.environ.pop(checkpoints.CRASH_ENV, None)
            os.environ.update(env or {})
            checkpoints._write_count = 0
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the child exits below
            code = train.main(argv)
        except BaseException:  # noqa: BLE001
            code = 98
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def outcome(out: Path) -> dict:
    """What a finished run leaves: weights (exported and in the checkpoint), rows, evaluation."""
    from safetensors.torch import load_file

    (ckpt,) = sorted((out / "checkpoints").iterdir())  # one complete checkpoint and no leftovers
    assert ckpt.name == "step_000002"
    weights = {
        f"export/{f}": load_file(str(out / f)) for f in ("digits_policy.safetensors", "digits_policy_ema.safetensors")
    }
    for which in ("default", "old", "ema"):
        weights[f"ckpt/{which}"] = load_file(str(ckpt / f"weights_{which}.safetensors"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for key in TIME_KEYS:
            row.pop(key)
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    hidden = [p.name for p in out.rglob(".*")]
    return {"weights": weights, "rows": rows, "evals": evals, "hidden": hidden}


def assert_same(got: dict, want: dict, where: str) -> None:
    assert got["rows"] == want["rows"], where
    assert got["evals"] == want["evals"], where
    assert got["hidden"] == [], (where, got["hidden"])
    assert got["weights"].keys() == want["weights"].keys()
    for name, tensors in want["weights"].items():
        for key, value in tensors.items():
            assert torch.equal(got["weights"][name][key], value), (where, name, key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, list[str]]:
    """An uninterrupted run and the labels of its write points."""
    from digits.judge import DigitsJudge
    from digits.rewards import reward_classifier

    DigitsJudge(), reward_classifier()  # fitted once here, inherited by every forked run
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ref") / "run"
    log = out.parent / "writes.log"
    assert forked([*FAST, "--output-dir", str(out)], {checkpoints.WRITE_LOG_ENV: str(log)}) == 0
    labels = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    return outcome(out), labels


@pytest.mark.slow
def test_a_kill_at_any_write_of_a_run_or_of_its_resume_still_ends_with_the_uninterrupted_result(reference, tmp_path):
    want, labels = reference
    # the writes enumerated below: logs, config, samples, every checkpoint file, commit, deletion
    assert len(labels) >= 40
    assert any(x.startswith("committed step_000001") for x in labels)
    assert any(x.startswith("discarded step_000001") for x in labels)
    assert any(x.startswith("half-appended metrics.jsonl") for x in labels)
    resumed_crashes = 0
    for n in range(1, len(labels) + 1):
        out = tmp_path / f"n{n}" / "run"
        crash = {checkpoints.CRASH_ENV: str(n)}
        assert forked([*FAST, "--output-dir", str(out)], crash) == -signal.SIGKILL, (n, labels[n - 1])
        status = forked([*FAST, "--output-dir", str(out), "--resume"], crash)  # killed again, if it gets there
        assert status in (0, -signal.SIGKILL), (n, labels[n - 1], status)
        resumed_crashes += status != 0
        assert forked([*FAST, "--output-dir", str(out), "--resume"]) == 0, (n, labels[n - 1])
        assert_same(outcome(out), want, f"killed at write {n} ({labels[n - 1]})")
    assert resumed_crashes >= len(labels) // 2  # the resumes were killed too, at most of their writes


@pytest.mark.slow
def test_a_killed_subprocess_run_resumes_to_the_uninterrupted_result(reference, tmp_path):
    """The same with real interpreters: killed while a checkpoint's optimizer state is half written."""
    want, labels = reference
    n = 1 + labels.index(next(x for x in labels if x.startswith("half-written .optimizer.pt")))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", checkpoints.CRASH_ENV: str(n)}
    cmd = [sys.executable, str(EXAMPLE / "train.py"), *FAST, "--output-dir", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert list((out / "checkpoints").iterdir()) == [out / "checkpoints" / ".tmp-step_000001"]  # nothing visible
    env.pop(checkpoints.CRASH_ENV)
    proc = subprocess.run([*cmd, "--resume"], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same(outcome(out), want, "subprocess")


# ---- damaged files: errors that name the file and the way out ------------------------------------------
@pytest.fixture()
def finished(reference, tmp_path) -> Path:
    out = tmp_path / "run"
    argv = [*FAST, "--checkpoints-keep", "2", "--output-dir", str(out)]
    assert forked(argv) == 0
    return out


def _resume_error(out: Path, capsys) -> str:
    capsys.readouterr()
    assert train.main([*FAST, "--checkpoints-keep", "2", "--output-dir", str(out), "--resume", "--max-steps", "3"]) == 2
    return capsys.readouterr().err


@pytest.mark.slow
def test_a_corrupt_checkpoint_file_is_named_with_the_way_out(finished, capsys):
    weights = finished / "checkpoints" / "step_000002" / "weights_default.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    err = _resume_error(finished, capsys)
    assert str(weights) in err and "delete" in err and "step_000002" in err and "(step 1)" in err
    # following the advice resumes from the checkpoint before it
    import shutil

    shutil.rmtree(finished / "checkpoints" / "step_000002")
    capsys.readouterr()
    argv = [*FAST, "--checkpoints-keep", "2", "--output-dir", str(finished), "--resume", "--max-steps", "3"]
    assert train.main(argv) == 0
    rows = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


@pytest.mark.slow
def test_unreadable_state_config_and_metrics_are_named(finished, capsys):
    state = finished / "checkpoints" / "step_000002" / "trainer_state.json"
    saved = state.read_text()
    state.write_text("{not json")
    err = _resume_error(finished, capsys)
    assert str(state) in err and "delete" in err
    state.write_text(saved)

    config = finished / "config.json"
    saved_config = config.read_text()
    config.write_text("")
    err = _resume_error(finished, capsys)
    assert str(config) in err and "step_000002/config.json" in err
    config.write_text(saved_config)

    metrics = finished / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")  # a row from before the checkpoint lost
    err = _resume_error(finished, capsys)
    assert str(metrics) in err and "rows from before the checkpoint are missing" in err


def test_a_folder_becomes_a_checkpoint_only_when_committed(tmp_path):
    store = checkpoints.CheckpointStore(tmp_path)
    tmp = store.begin(5)
    (tmp / "a.bin").write_bytes(b"x")
    assert store.newest() is None  # still hidden
    store.commit(tmp, 5, keep=2)
    for step in (6, 7):
        store.commit(store.begin(step), step, keep=2)
    assert [s for s, _ in store.complete()] == [6, 7]
    (store.root / ".tmp-step_000008").mkdir()
    (tmp_path / ".metrics.jsonl.tmp-1").write_text("half")
    store.clean_partial()
    assert sorted(p.name for p in store.root.iterdir()) == ["step_000006", "step_000007"]
    assert not list(tmp_path.glob(".*.tmp-*"))
