"""Pretrain the digits flow model and save it as safetensors.

Run from ``examples/sd35_marble``::

    python -m digits.pretrain --seed 0 --out digits/weights/digits_flow_seed0.safetensors

This is the exact command that made the shipped weights (one CPU thread, bit-for-bit reproducible).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import torch

from .model import pretrain, save_weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True, help="pretraining seed")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--steps", type=int, default=2500, help="optimizer steps (2500 for the shipped weights)")
    parser.add_argument("--log-every", type=int, default=500)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    model = pretrain(args.seed, steps=args.steps, log_every=args.log_every)
    elapsed = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"seed {args.seed}: {args.steps} steps in {elapsed:.1f} s -> {args.out} (sha256 {digest[:16]})")


if __name__ == "__main__":
    main()
