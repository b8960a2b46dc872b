"""The README's quickstart runs as written and prints what the README says it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def quickstart_blocks() -> tuple[str, str]:
    """The quickstart's python block and the ``text`` block that shows its output."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Quickstart.*?$(.*?)^## ", text, flags=re.S | re.M)
    assert match, "README.md has no '## Quickstart' section"
    section = match.group(1)
    code = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    output = re.findall(r"^```text\n(.*?)^```", section, flags=re.S | re.M)
    assert len(code) == 1 and len(output) == 1, "the quickstart needs one python and one text block"
    return code[0], output[0]


def test_readme_quickstart_prints_what_the_readme_says(tmp_path: Path) -> None:
    code, expected = quickstart_blocks()
    script = tmp_path / "quickstart.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [line.rstrip() for line in proc.stdout.strip().splitlines()]
    assert printed == [line.rstrip() for line in expected.strip().splitlines()], proc.stdout
