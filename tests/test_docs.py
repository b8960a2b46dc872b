"""The documentation site builds with ``mkdocs build --strict``, offline.

mkdocs, mkdocs-material and mkdocstrings are dev dependencies (the ``docs`` extra), so this
test requires them rather than skipping. The build runs in a subprocess whose sockets refuse
to connect: a theme feature or plugin that fetches anything at build time fails the test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# Runs mkdocs' CLI with every outgoing connection refused.
_OFFLINE_MKDOCS = """
import socket, sys

def _refuse(*args, **kwargs):
    raise OSError(f"network access during the docs build: {args!r}")

socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse

from mkdocs.__main__ import cli

sys.exit(cli(sys.argv[1:], standalone_mode=False))
"""


def _nav_pages(nav: list) -> list[str]:
    pages: list[str] = []
    for entry in nav:
        values = entry.values() if isinstance(entry, dict) else [entry]
        for value in values:
            pages.extend(_nav_pages(value) if isinstance(value, list) else [value])
    return pages


def test_mkdocs_build_strict_offline(tmp_path: Path) -> None:
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-c", _OFFLINE_MKDOCS, "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "network access" not in proc.stderr

    # every page of the nav was rendered, and every Markdown file under docs/ is in the nav
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
    pages = _nav_pages(config["nav"])
    on_disk = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(pages) == on_disk
    for page in pages:
        html = site / page.replace("index.md", "").replace(".md", "/") / "index.html"
        assert html.is_file(), page

    # the API reference is generated from the docstrings
    def text(page: str) -> str:
        return re.sub(r"<[^>]+>", " ", (site / page / "index.html").read_text(encoding="utf-8"))

    optimizer = text("api/optimizer")
    for member in ("backward", "step", "weights", "ema_decay", "state_dict", "reset_weights"):
        assert f'id="marble_opt.MarbleOptimizer.{member}"' in (site / "api/optimizer/index.html").read_text()
    assert "nonfinite" in optimizer and "refresh_every" in optimizer
    balancer_api = (site / "api/balancer/index.html").read_text(encoding="utf-8")
    for member in ("weights", "weighted_loss", "step", "discard", "state_dict", "load_state_dict", "reset"):
        assert f'id="marble_opt.Balancer.{member}"' in balancer_api, member
    assert "gram_estimator" in text("api/balancer") and "BalanceReport" in text("api/balancer")
    assert 'id="marble_opt.Balancer._setup"' not in balancer_api  # private members filtered out
    # the example's loop, included from examples/balancer_accelerate.py (highlighted: tags dropped)
    guide = re.sub(r"<[^>]+>", "", (site / "balancer/index.html").read_text(encoding="utf-8"))
    assert "accelerator.backward(bal.weighted_loss(losses, w))" in guide
    assert "for x, y_reg, y_cls in loader:" in guide
    assert "--8&lt;--" not in guide and "[start:loop]" not in guide
    assert "update_cosine" in text("api/report") and "worst_update_cosine" in text("api/report")
    assert "warm_start" in text("api/qp") and "MinNormSolver" in text("api/qp")
    for source in ("ExactSource", "ExactLeanSource", "SharedSource", "ParamsSource", "GramSource"):
        assert source in text("api/sources")
    weightings = (site / "api/weightings/index.html").read_text(encoding="utf-8")
    for member in (
        *("Weighting", "Weighting.weigh", "Weighting.commit", "WeightingState", "WeightingResult", "loss_weights"),
        *("MarbleWeighting", "MGDAWeighting", "MeanWeighting", "UPGradWeighting", "CAGradWeighting"),
        *("IMTLGWeighting", "AlignedMTLWeighting", "CallableWeighting", "WEIGHTINGS", "GRAM_ESTIMATORS"),
        *("_src.estimators.CrossGram", "_src.estimators.split_halves"),
    ):
        assert f'id="marble_opt.{member}"' in weightings, member
    assert "floor" in text("api/weightings") and "EMA of the raw estimate" in text("api/weightings")
    guide = text("guides/weightings")
    for paper in ("1810.04650", "2406.16232", "2110.14048", "IMPnRXEWpvr", "2305.19000", "2605.06507"):
        assert paper in (site / "guides/weightings/index.html").read_text(encoding="utf-8"), paper
    assert "self_consistency" in guide and "Evidence from the digits benchmark" in guide
    for function in ("group_advantages", "reward_masks", "nft_losses", "optimality_probability"):
        assert function in text("api/rl")
    assert "reference_min_norm_weights" in text("api/testing") and "hard_gram" in text("api/testing")
    assert "## [0.1.0]" not in text("changelog") and "0.1.0" in text("changelog")  # the snippet was rendered

    # nothing on the site loads from another host (fonts, scripts, styles)
    for html in site.rglob("*.html"):
        content = html.read_text(encoding="utf-8")
        external = re.findall(r'<(?:link|script)[^>]+(?:href|src)="(https?://[^"]+)"', content)
        assert external == [], (html, external)
        assert "fonts.googleapis" not in content
