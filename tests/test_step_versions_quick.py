"""benchmarks/step_versions.py: an earlier version of the package is imported apart from this
checkout's, stepped on its own model copy, and the bit-identity column tells equal code from
different code. Timings are reported, not asserted."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from _scripts import load_benchmark

import marble_opt

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode != 0,
    reason="needs the git history (an unpacked sdist has none)",
)


def test_an_earlier_version_is_a_separate_package(tmp_path: Path) -> None:
    bench = load_benchmark("step_versions")
    old = bench.load_version("HEAD", tmp_path)
    assert old.__name__.startswith("marble_opt_")
    assert old.MarbleOptimizer is not marble_opt.MarbleOptimizer
    assert not Path(old.__file__).resolve().is_relative_to((ROOT / "src").resolve())


@pytest.mark.parametrize("spec", ["mlp4:exact", "tf:shared", "mlp6:params"])
def test_the_same_code_twice_steps_bit_identically(tmp_path: Path, spec: str) -> None:
    bench = load_benchmark("step_versions")
    head = bench.load_version("HEAD", tmp_path)
    row = bench.time_case(spec, {"HEAD": head, "this checkout": head}, rounds=2, quick=True)
    assert row["identical"]
    assert set(row["ratios"]) == {"HEAD", "this checkout"}
    assert all(math.isfinite(r) and r > 0 for r in row["ratios"].values())


def test_different_code_is_told_apart(tmp_path: Path) -> None:
    """Against a package whose step rescales the update, the parameters differ."""
    bench = load_benchmark("step_versions")
    head = bench.load_version("HEAD", tmp_path)

    class Halved(head.MarbleOptimizer):
        def step(self, losses=None, **kwargs):
            report = self.backward(losses, shared=kwargs.get("shared"))
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(0.5)
            self.optimizer.step()
            return report

    other = type(sys)("halved")
    other.MarbleOptimizer = Halved
    row = bench.time_case("mlp4:exact", {"HEAD": head, "this checkout": other}, rounds=2, quick=True)
    assert not row["identical"]


def test_the_script_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "versions.md"
    bench = load_benchmark("step_versions")
    assert bench.main(["--refs", "HEAD", "--quick", "--cases", "mlp4:exact", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| mlp4:exact | K backward passes" in text
    assert text.count("×") == 2  # HEAD and this checkout
