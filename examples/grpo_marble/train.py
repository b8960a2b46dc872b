"""Multi-reward GRPO on the CPU test bed (two-digit addition, five rewards), with TRL.

    python examples/grpo_marble/train.py --combine marble --max-steps 60 --output-dir runs/marble

``--combine``: ``marble`` (``MarbleGRPOTrainer``: per-reward advantages and losses, balanced in
gradient space), ``weighted-sum`` (TRL's ``multi_objective_aggregation="sum_then_normalize"``) or
``gdpo`` (TRL's ``"normalize_then_sum"``). Writes ``metrics.jsonl`` (one line per step:
``reward/<name>``, and for marble ``weight/<name>`` and ``cos/<name>``) and ``summary.json`` with
the held-out judge's exact-match accuracy before and after training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import task  # noqa: E402

AGGREGATION = {"weighted-sum": "sum_then_normalize", "gdpo": "normalize_then_sum"}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--combine", choices=["marble", "weighted-sum", "gdpo"], default="marble")
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--output-dir", default="runs/grpo_marble")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gram", default="exact", help="marble: the Balancer's Gram source (exact, shared, params)")
    ap.add_argument("--ema-decay", type=float, default=0.7)
    ap.add_argument("--weights", default=None, help="pretrained safetensors (default: the shipped model)")
    ap.add_argument(
        "--eval-samples", type=int, default=2, help="sampled completions per judge prompt for the reward table"
    )
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = task.build_tokenizer()
    model = task.load_model(args.weights)
    judge_prompts = [task.prompt(a, b) for a, b in task.splits()["judge"]]

    def evaluate() -> dict:
        comps = task.generate(model, tokenizer, judge_prompts, greedy=False, num_samples=args.eval_samples, seed=1234)
        table = task.reward_table([p for p in judge_prompts for _ in range(args.eval_samples)], comps)
        return {"judge": task.judge(model, tokenizer), **{f"reward/{k}": v for k, v in table.items()}}

    before = evaluate()
    model.train()
    dataset = Dataset.from_dict(task.rows(task.splits()["rl"]))
    batch = args.prompts_per_step * args.num_generations
    config = GRPOConfig(
        output_dir=str(out),
        max_steps=args.max_steps,
        learning_rate=args.lr,
        per_device_train_batch_size=batch,
        num_generations=args.num_generations,
        max_completion_length=task.MAX_COMPLETION,
        temperature=1.0,
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        lr_scheduler_type="constant",
        beta=0.0,
        multi_objective_aggregation=AGGREGATION.get(args.combine, "normalize_then_sum"),
    )
    rewards = [task.REWARDS[n] for n in task.REWARD_NAMES]
    common = dict(model=model, reward_funcs=rewards, args=config, train_dataset=dataset, processing_class=tokenizer)
    if args.combine == "marble":
        from marble_opt.integrations.trl import MarbleGRPOTrainer

        trainer = MarbleGRPOTrainer(**common, marble={"gram": args.gram, "ema_decay": args.ema_decay})
    else:
        trainer = GRPOTrainer(**common)

    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")

    class Writer(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            logs = logs or {}
            row = {"step": state.global_step}
            for name in task.REWARD_NAMES:
                if f"rewards/{name}/mean" in logs:
                    row[f"reward/{name}"] = logs[f"rewards/{name}/mean"]
                for key in (f"weight/{name}", f"cos/{name}"):
                    if key in logs:
                        row[key] = logs[key]
            if len(row) > 1:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")

    trainer.add_callback(Writer())
    trainer.train()
    after = evaluate()
    summary = {
        "combine": args.combine,
        "seed": args.seed,
        "lr": args.lr,
        "max_steps": args.max_steps,
        "before": before,
        "after": after,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
