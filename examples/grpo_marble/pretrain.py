"""Pretrain the test bed's GPT-2 on two-digit addition, from scratch, on one CPU thread.

    python examples/grpo_marble/pretrain.py            # writes examples/grpo_marble/model.safetensors

Deterministic (seeded data order and initialisation, one thread). It stops early on purpose: the
shipped model is mediocre (about half of the held-out sums right), so that RL has room to improve.
Only the ``pretrain`` split is used; ``--log-every`` prints the held-out judge's accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import task  # noqa: E402


def encode(tokenizer, pairs):
    texts = [task.prompt(a, b) + str(a + b) for a, b in pairs]
    ids = [tokenizer(t)["input_ids"] + [task.VOCAB[task.EOS]] for t in texts]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), task.VOCAB[task.PAD])
    labels = torch.full((len(ids), width), -100)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        labels[i, 6 : len(x)] = torch.tensor(x[6:])  # the answer and the end token only
    return input_ids, labels


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=350, help="AdamW steps (default 350)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle schedule")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=200)
    ap.add_argument("--out", default=str(task.WEIGHTS), help="where the safetensors go")
    args = ap.parse_args(argv)

    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    tokenizer = task.build_tokenizer()
    model = task.build_model(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    input_ids, labels = encode(tokenizer, task.splits()["pretrain"])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    history = []
    model.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(input_ids), (args.batch_size,), generator=gen)
        out = model(input_ids=input_ids[idx], labels=labels[idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == args.steps:
            acc = task.judge(model, tokenizer)
            model.train()
            history.append({"step": step, "loss": out.loss.item(), "judge": acc, "seconds": time.perf_counter() - t0})
            print(json.dumps(history[-1]), flush=True)
    model.eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(
        state,
        args.out,
        metadata={"command": " ".join(["python examples/grpo_marble/pretrain.py", *(argv or sys.argv[1:])])},
    )
    summary = {"params": n_params, "judge": history[-1]["judge"], "seconds": time.perf_counter() - t0, "out": args.out}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
