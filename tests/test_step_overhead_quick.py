"""benchmarks/step_overhead.py in ``--quick`` mode: it runs, writes its Markdown tables, and
what is deterministic in them holds (memory figures, K=2 weight gaps). Timings are reported,
not asserted: CI machines are shared."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "step_overhead.py"


def _tables(text: str) -> list[dict[str, list[str]]]:
    """Every Markdown table of ``text`` as {first cell: other cells}, header rows left out."""
    tables: list[dict[str, list[str]]] = []
    current = None
    for line in text.splitlines():
        if not line.startswith("| "):
            current = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if current is None:
            current = {"__header__": cells}
            tables.append(current)
        elif not line.startswith("| :---"):
            current[cells[0]] = cells[1:]
    return tables


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[str, dict]:
    """The Markdown report (its structure is asserted) and the raw figures (``--json``) that
    every numeric assertion reads: never a rounded, printed figure against a bound."""
    d = tmp_path_factory.mktemp("bench")
    out, raw = d / "step_overhead.md", d / "step_overhead.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--json", str(raw)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert text.strip() == proc.stdout.strip()
    return text, json.loads(raw.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def report(run) -> str:
    return run[0]


def test_time_table_has_every_method_and_k(report):
    bench = load_benchmark("step_overhead")
    times, targets, memory, fidelity, *_ = _tables(report)
    ks = [f"K={k}" for k in bench.QUICK.ks]
    assert times["__header__"] == ["method", *ks]
    labels = [label for label, _, unit in bench.methods(bench.QUICK.refresh) if unit == 1]
    assert set(labels) <= set(times)
    assert any("refresh_every=4: cached step" in m for m in times)
    assert any("refresh_every=4: mean over the cycle" in m for m in times)
    if bench.torchjd is not None:
        assert {"TorchJD mtl_backward + MGDA", "TorchJD mtl_backward + UPGrad"} <= set(times)
    for method, cells in times.items():
        if method == "__header__":
            continue
        assert len(cells) == len(ks)
        assert all(re.fullmatch(r"\d+\.\d{3}× \(\d+\.\d ms\)", c) for c in cells), (method, cells)
    assert all(c.startswith("1.000×") for c in times[bench.PLAIN])
    for label in ("exact ÷ K backward passes", "shared ÷ plain", "refresh_every=4, cached step ÷ plain"):
        assert all(re.fullmatch(r"\d+\.\d{3}", c) for c in targets[label]), (label, targets[label])


def test_memory_table_shows_the_gradient_buffers(run):
    bench = load_benchmark("step_overhead")
    timing = run[1]["timing"]
    for k in bench.QUICK.ks:
        mem = {row["method"]: row["mem"] for row in timing[str(k)]}
        assert mem[bench.EXACT] > mem[bench.PLAIN]  # the K×N buffer
        assert mem["marble shared"] < mem[bench.EXACT]


def test_fidelity_table(run):
    bench = load_benchmark("step_overhead")
    table = _tables(run[0])[3]
    sources = {label for label, _, _ in bench.FIDELITY_SOURCES}
    assert sources | {"refresh_every=4", "exact (reference)", "(baseline) plain sum Σ L_k"} <= set(table)
    for k in bench.QUICK.ks:
        rows = {row["source"]: row for row in run[1]["fidelity"][str(k)]}
        assert set(rows) == set(table) - {"__header__"}
        for source, row in rows.items():
            med, low, gap, worst = row["cos_median"], row["cos_min"], row["gap_max"], row["worst"]
            assert (
                -1.0 - 1e-12 <= low <= med <= 1.0 + 1e-12 and 0.0 <= gap <= 1.0 and -1.0 - 1e-12 <= worst <= 1.0 + 1e-12
            )
            assert med > 0.0, (source, k, row)
            if source == "exact (reference)":
                assert med == pytest.approx(1.0, abs=1e-12) and low == pytest.approx(1.0, abs=1e-12) and gap == 0.0
                assert worst > 0.0  # MARBLE's update moves against no objective
            elif k == 2 and source in sources:  # two unit-normalised gradients: α = (½, ½) whatever G
                assert gap <= 1e-12


def test_peak_extra_bytes_counts_what_a_step_allocates():
    bench = load_benchmark("step_overhead")
    kept = []

    def step(_batch):
        a = torch.empty(1 << 18)  # 1 MiB, freed at once
        del a
        b = torch.empty(1 << 19)  # 2 MiB, freed after c is allocated
        c = torch.empty(1 << 17)  # 0.5 MiB, kept
        del b
        kept.append(c)

    peak = bench.peak_extra_bytes(step, None, torch.device("cpu"))
    assert 2.5 * 2**20 <= peak < 2.6 * 2**20


def test_mlp_tables_have_ratios_and_host_syncs(report, run):
    """The small-step MLP cases: baseline first at 1.000×, every source with a ratio and a
    host-sync count; on CPU the baselines make no round trip and a MARBLE step at least one
    (the loss values with G) and at most two (and the combined gradient's finiteness)."""
    bench = load_benchmark("step_overhead")
    mlp = _tables(report)[4:]
    assert len(mlp) == len(bench.MLP_QUICK)
    for table, case in zip(mlp, bench.MLP_QUICK):
        assert table["__header__"] == ["method", "ms per step", "ratio", "host syncs per step"]
        rows = [m for m in table if m != "__header__"]
        baseline = {"plain": bench.PLAIN, "kpass": bench.KPASS, "plain-fused": bench.PLAIN_FUSED}
        baseline = baseline[case.baseline]
        assert rows == [baseline, *("marble " + s.replace("/", ", ") for s in case.sources)]
        assert table[baseline][1] == "1.000×" and table[baseline][2] == "0"
        for method in rows[1:]:
            ms, ratio, syncs = table[method]
            assert re.fullmatch(r"\d+\.\d{2}", ms) and re.fullmatch(r"\d+\.\d{3}×", ratio)
    for case in bench.MLP_QUICK:
        measured = run[1]["mlp"][case.label]
        assert measured[0]["syncs"] == 0 and measured[0]["ratio"] == 1.0
        for row in measured[1:]:
            assert row["ms"] > 0 and row["ratio"] > 0
            assert 1 <= row["syncs"] <= 2, row
            if row["method"].endswith("skip_on_device"):  # the finiteness flag stays on the device
                assert row["syncs"] == 1, row
