"""MarbleGRPOTrainer on a tiny GPT-2 built from a config, with a character tokenizer built in memory."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from marble_opt.integrations.trl import MarbleGRPOTrainer, per_reward_advantages  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "grpo_marble"))
import task  # noqa: E402


def short(prompts, completions, **kw):
    return [-float(len(c)) for c in completions]


def has_one(prompts, completions, **kw):
    return [float("1" in c) for c in completions]


def even_only(prompts, completions, **kw):  # applies to prompts whose first operand is even
    return [float(c.count("2")) if int(p[:2]) % 2 == 0 else None for p, c in zip(prompts, completions)]


REWARDS = [short, has_one, even_only]
NAMES = ["short", "has_one", "even_only"]


def make_trainer(tmp_path, steps=2, marble=None):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = task.build_tokenizer()
    config = GPT2Config(
        vocab_size=len(task.VOCAB),
        n_layer=1,
        n_head=2,
        n_embd=16,
        n_positions=16,
        eos_token_id=1,
        bos_token_id=1,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    data = Dataset.from_dict(task.rows(task.splits()["rl"][:32]))
    args = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-3,
        seed=0,
        bf16=False,
    )
    return MarbleGRPOTrainer(
        model=model, reward_funcs=REWARDS, args=args, train_dataset=data, processing_class=tok, marble=marble
    )


def test_trains_and_logs_weights_per_reward(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train()
    rows = [r for r in trainer.state.log_history if any("weight/" in k for k in r)]
    assert len(rows) == 2
    for row in rows:
        for name in NAMES:
            assert any("weight" in k and name in k for k in row), (name, row)
        alpha = [row[f"weight/{n}"] for n in NAMES]
        assert all(a >= -1e-9 for a in alpha)
        assert math.isclose(sum(alpha), 1.0, abs_tol=1e-6), alpha
    assert trainer.balancer.num_steps == 2


def test_weighted_loss_gradient_is_the_weighted_sum_of_gradients(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train otherwise
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = trainer._prepare_inputs(batch)
    assert inputs["marble_advantages"].shape[1] == 3
    seen = {}
    real = trainer.balancer.weights

    def spy(losses, **kw):
        seen["losses"], seen["w"] = losses, real(losses, **kw)
        return seen["w"]

    trainer.balancer.weights = spy
    total = trainer.compute_loss(trainer.model, inputs)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    g_total = torch.autograd.grad(total, params, retain_graph=True)
    expected = [torch.zeros_like(p) for p in params]
    for name, loss in seen["losses"].items():
        if seen["w"][name] != 0.0:
            for e, g in zip(expected, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)):
                if g is not None:
                    e += seen["w"][name] * g
    for a, b in zip(g_total, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(v != 0.0 for v in seen["w"].values())


def test_per_reward_advantages_mask_and_normalise():
    r = torch.tensor([[1.0, float("nan")], [3.0, float("nan")], [2.0, 5.0], [2.0, 7.0]])
    a = per_reward_advantages(r, 2, "group")
    assert torch.isnan(a[:2, 1]).all()
    assert a[0, 0] < 0 < a[1, 0] and abs(a[0, 0] + a[1, 0]) < 1e-6
    assert a[2, 0] == 0 and a[3, 0] == 0  # constant group: no signal
    assert a[2, 1] < 0 < a[3, 1]
    with pytest.raises(ValueError, match="num_generations"):
        per_reward_advantages(r, 3)


def test_bad_marble_option_is_refused(tmp_path):
    with pytest.raises(TypeError, match="marble must be a dict"):
        make_trainer(tmp_path, steps=1, marble=["exact"])
