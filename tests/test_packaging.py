"""The sdist carries what its tests need, and tests run from it; the wheel carries the LICENSE.

Built with ``python -m build --no-isolation`` (the ``build`` package is a dev dependency and
setuptools is already installed), so no network is needed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SDIST_MUST_HAVE = [
    "LICENSE",
    "CITATION.cff",
    "CHANGELOG.md",
    "README.md",
    "mkdocs.yml",
    "pyproject.toml",
    "src/marble_opt/__init__.py",
    "src/marble_opt/py.typed",
    "tests/conftest.py",
    "tests/_dist_worker.py",
    "tests/test_optimizer.py",
    "tests/test_packaging.py",
    "examples/sd35_marble/train.py",
    "examples/sd35_marble/prompts/general.txt",
    "benchmarks/step_overhead.py",
    "benchmarks/_common.py",
    "docs/index.md",
    "docs/distributed.md",
    "docs/guides/logging.md",
]


def _build(kind: str, out: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "build", f"--{kind}", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (artifact,) = out.glob("*.tar.gz" if kind == "sdist" else "*.whl")
    return artifact


def test_sdist_carries_its_tests_and_they_run_from_it(tmp_path: Path) -> None:
    sdist = _build("sdist", tmp_path / "dist")
    with tarfile.open(sdist) as tar:
        top = f"{sdist.name[: -len('.tar.gz')]}/"
        names = {m.name[len(top) :] for m in tar.getmembers()}
        missing = [f for f in SDIST_MUST_HAVE if f not in names]
        assert missing == [], f"the sdist lacks {missing}"
        # every test module of the checkout is in it
        for test in (ROOT / "tests").glob("*.py"):
            assert f"tests/{test.name}" in names, test.name
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            tar.extractall(tmp_path / "unpacked", filter="data")
        else:  # pragma: no cover - our own freshly built archive
            tar.extractall(tmp_path / "unpacked")
    unpacked = tmp_path / "unpacked" / top
    env = {**os.environ, "PYTHONPATH": str(unpacked / "src"), "OMP_NUM_THREADS": "1"}
    # the package imported by the sdist's tests is the sdist's own
    where = subprocess.run(
        [sys.executable, "-c", "import marble_opt; print(marble_opt.__file__)"],
        capture_output=True,
        text=True,
        cwd=unpacked,
        env=env,
        timeout=120,
    )
    assert Path(where.stdout.strip()).resolve().is_relative_to(unpacked.resolve()), where.stdout + where.stderr
    # tests run there: one reads the docs, the QP ones use conftest's hypothesis profile
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:xdist",
            "-p",
            "no:cacheprovider",
            "tests/test_guides.py::test_the_logging_guide_flattens_a_report_into_json_ready_scalars",
            "tests/test_qp.py",
            "-k",
            "logging or closed_form or bad_gram",
        ],
        capture_output=True,
        text=True,
        cwd=unpacked,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"\b\d+ passed\b", proc.stdout) and not re.search(r"\b\d+ (failed|errors?)\b", proc.stdout), (
        proc.stdout[-2000:]
    )


def test_wheel_carries_the_license_and_no_tests(tmp_path: Path) -> None:
    wheel = _build("wheel", tmp_path / "dist")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        licenses = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert len(licenses) == 1, names
        assert "MIT License" in zf.read(licenses[0]).decode()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata
    assert "License-File: LICENSE" in metadata
    assert "Framework :: Pytest" not in metadata
    assert "marble_opt/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/", "docs/"))]
