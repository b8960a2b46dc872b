"""Gram source check on the GRPO test bed: cosines between the per-reward gradients from the exact
parameter-space Gram, from a Gram w.r.t. the per-token log-probabilities, and from the last block
only (4 batches of 16 prompts x 8 completions). Run from the repository root."""

import json
import sys

import numpy as np
import torch

sys.path.insert(0, "examples/grpo_marble")
import task
from datasets import Dataset
from trl import GRPOConfig

from marble_opt.integrations.trl import MarbleGRPOTrainer

torch.manual_seed(0)
torch.set_num_threads(1)
tok = task.build_tokenizer()
model = task.load_model()
args = GRPOConfig(
    output_dir="/tmp/gm_meas",
    max_steps=1,
    per_device_train_batch_size=128,
    num_generations=8,
    max_completion_length=task.MAX_COMPLETION,
    use_cpu=True,
    bf16=False,
    report_to=[],
    save_strategy="no",
    seed=0,
    disable_tqdm=True,
)
tr = MarbleGRPOTrainer(
    model=model,
    reward_funcs=[task.REWARDS[n] for n in task.REWARD_NAMES],
    args=args,
    train_dataset=Dataset.from_dict(task.rows(task.splits()["rl"])),
    processing_class=tok,
)
tr.model.train()
tr.current_gradient_accumulation_steps = 1
cap = {}
orig = tr._per_reward_losses


def spy(logps, *a, **k):
    out = orig(logps, *a, **k)
    cap["logps"] = logps
    cap["losses"] = out[0]
    return out


tr._per_reward_losses = spy
tr.balancer.weights = lambda losses, **kw: {n: 1.0 for n in losses}
params = [p for p in tr.model.parameters() if p.requires_grad]
last = [
    p for n, p in tr.model.named_parameters() if n.startswith("transformer.h.2") or n.startswith("transformer.ln_f")
]


def gram(vecs):
    M = torch.stack(vecs).double()
    return (M @ M.T).numpy()


def cos(G):
    d = np.sqrt(np.clip(np.diag(G), 1e-30, None))
    return G / np.outer(d, d)


res = []
it = iter(tr.get_train_dataloader())
for b in range(4):
    inputs = tr._prepare_inputs(next(it))
    tr._step += 1
    tr._buffered_inputs = None
    tr.compute_loss(tr.model, inputs)
    L = cap["losses"]
    names = list(L)
    ex, sh, pa = [], [], []
    for n in names:
        g = torch.autograd.grad(L[n], params + [cap["logps"]], retain_graph=True, allow_unused=True)
        ex.append(torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g[:-1], params)]))
        sh.append(g[-1].flatten())
        gl = torch.autograd.grad(L[n], last, retain_graph=True, allow_unused=True)
        pa.append(torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(gl, last)]))
    Ce, Cs, Cp = cos(gram(ex)), cos(gram(sh)), cos(gram(pa))
    iu = np.triu_indices(len(names), 1)
    ok = np.isfinite(Ce[iu]) & np.isfinite(Cs[iu]) & np.isfinite(Cp[iu])
    res.append(
        {
            "batch": b,
            "cos_exact": Ce[iu][ok].round(3).tolist(),
            "cos_logps": Cs[iu][ok].round(3).tolist(),
            "cos_lastblock": Cp[iu][ok].round(3).tolist(),
            "mad_logps": float(np.abs(Ce[iu] - Cs[iu])[ok].mean()),
            "mad_lastblock": float(np.abs(Ce[iu] - Cp[iu])[ok].mean()),
            "corr_logps": float(np.corrcoef(Ce[iu][ok], Cs[iu][ok])[0, 1]),
            "corr_lastblock": float(np.corrcoef(Ce[iu][ok], Cp[iu][ok])[0, 1]),
        }
    )
    print(json.dumps(res[-1]))
print(
    json.dumps(
        {k: float(np.mean([r[k] for r in res])) for k in ["mad_logps", "mad_lastblock", "corr_logps", "corr_lastblock"]}
    )
)
