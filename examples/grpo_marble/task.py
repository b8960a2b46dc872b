"""The test bed's task: two-digit addition for a small character-level causal LM.

Everything here is deterministic and offline: the character tokenizer is built in memory, the
data splits come from a seeded permutation, and the model is a ``transformers`` GPT-2 built from
a config (its pretrained weights ship beside this file as ``model.safetensors``).

Prompts read ``"47+38="``; the answer is the sum's decimal digits (``"85"``), then the end token.
The 8,100 pairs ``a + b`` with ``10 <= a, b <= 99`` are split once (seed 0) into

- ``judge``: 800 pairs used by nothing but the judge (held-out greedy exact-match accuracy);
- ``rl``: 1,600 prompts the RL runs train on;
- ``pretrain``: the other 5,700 pairs, the only ones pretraining sees.

Rewards (TRL reward functions: ``f(prompts, completions, **columns) -> list[float | None]``),
each with its own natural scale, two of them on a subset of the prompts only:

=============  ==========  ==================  ====================================================
name           range       applies to          what it scores
=============  ==========  ==================  ====================================================
``digits``     [0, 1]      every prompt        fraction of the answer's digits right, right-aligned
``distance``   [-100, 0]   every prompt        ``-|pred - answer|`` (capped at 100; no number: -100)
``brevity``    [-L, 0]     every prompt        minus the completion's length in characters
``carry``      {0, 1}      sums with a carry   the tens digit is right (the carry was propagated)
``hundreds``   {0, 1}      sums >= 100         the completion has three digits and starts with "1"
=============  ==========  ==================  ====================================================

``brevity`` is in tension with every other reward: the empty completion maximises it and scores
the minimum on all the others.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "model.safetensors"

PAD, EOS, UNK = "[PAD]", "[EOS]", "[UNK]"
CHARS = list("0123456789+=")
VOCAB = {PAD: 0, EOS: 1, UNK: 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
MAX_COMPLETION = 5  # three answer digits, the end token, one spare
REWARD_NAMES = ("digits", "distance", "brevity", "carry", "hundreds")

MODEL_CONFIG = {
    "n_layer": 3,
    "n_head": 4,
    "n_embd": 96,
    "n_positions": 16,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}


def build_tokenizer():
    """A character tokenizer (``PreTrainedTokenizerFast`` over a ``tokenizers`` WordLevel model)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    fast.padding_side = "left"
    return fast


def build_model(seed: int = 0):
    """The GPT-2 of ``MODEL_CONFIG`` with fresh weights (seeded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(VOCAB),
        bos_token_id=VOCAB[EOS],
        eos_token_id=VOCAB[EOS],
        pad_token_id=VOCAB[PAD],
        **MODEL_CONFIG,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = VOCAB[PAD]
    model.generation_config.eos_token_id = VOCAB[EOS]
    model.generation_config.bos_token_id = VOCAB[EOS]
    return model


def load_model(path: str | Path | None = None):
    """The pretrained test-bed model (``model.safetensors`` beside this file unless ``path``)."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights not found at {path}; make them with `python examples/grpo_marble/pretrain.py`"
        )
    model = build_model()
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embedding
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the test-bed model (missing {missing}, unexpected {unexpected})"
        )
    model.tie_weights()
    return model


# ---- data -------------------------------------------------------------------------------------
def splits() -> dict[str, list[tuple[int, int]]]:
    """The fixed split of the 8,100 pairs into ``judge``, ``rl`` and ``pretrain`` (seed 0)."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(0).shuffle(pairs)
    return {"judge": pairs[:800], "rl": pairs[800:2400], "pretrain": pairs[2400:]}


def prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def rows(pairs: list[tuple[int, int]]) -> dict[str, list]:
    """Dataset columns for TRL: ``prompt`` and the integer ``answer``."""
    return {"prompt": [prompt(a, b) for a, b in pairs], "answer": [a + b for a, b in pairs]}


def has_carry(a: int, b: int) -> bool:
    return (a % 10) + (b % 10) >= 10


def _operands(p: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)\+(\d+)=", p)
    if m is None:
        raise ValueError(f"prompt {p!r} is not of the form 'A+B='")
    return int(m.group(1)), int(m.group(2))


def _text(completion) -> str:
    # TRL passes strings for plain-text prompts (conversational ones would be message lists).
    if isinstance(completion, list):
        completion = "".join(m.get("content", "") for m in completion)
    return completion


def _number(text: str) -> int | None:
    return int(text) if re.fullmatch(r"\d{1,6}", text) else None


# ---- rewards ------------------------------------------------------------------------------------
def digits(prompts, completions, **kwargs) -> list[float]:
    """Fraction of the answer's digits that the completion gets right, aligned from the right
    (positions past the shorter string count as wrong; the denominator is the longer length)."""
    out = []
    for p, c in zip(prompts, completions):
        a, b = _operands(p)
        ans, text = str(a + b), _text(c)
        n = max(len(ans), len(text))
        hits = sum(x == y for x, y in zip(reversed(ans), reversed(text)))
        out.append(hits / n)
    return out


def distance(prompts, completions, **kwargs) -> list[float]:
    """``-|pred - answer|``, capped at 100; -100 when the completion is not a number."""
    out = []
    for p, c in zip(prompts, completions):
        a, b = _operands(p)
        n = _number(_text(c))
        out.append(-100.0 if n is None else -float(min(abs(n - (a + b)), 100)))
    return out


def brevity(prompts, completions, **kwargs) -> list[float]:
    """Minus the completion's length in characters (the end token not counted)."""
    return [-float(len(_text(c))) for c in completions]


def carry(prompts, completions, **kwargs) -> list[float | None]:
    """For sums whose units produce a carry: 1 if the completion's tens digit is right, else 0.
    ``None`` (does not apply) for the other prompts."""
    out: list[float | None] = []
    for p, c in zip(prompts, completions):
        a, b = _operands(p)
        if not has_carry(a, b):
            out.append(None)
            continue
        text = _text(c)
        want = str(a + b)[-2]
        out.append(float(_number(text) is not None and len(text) >= 2 and text[-2] == want))
    return out


def hundreds(prompts, completions, **kwargs) -> list[float | None]:
    """For sums of 100 or more: 1 if the completion is a three-digit number starting with "1",
    else 0. ``None`` for the other prompts."""
    out: list[float | None] = []
    for p, c in zip(prompts, completions):
        a, b = _operands(p)
        if a + b < 100:
            out.append(None)
            continue
        text = _text(c)
        out.append(float(_number(text) is not None and len(text) == 3 and text[0] == "1"))
    return out


REWARDS = {"digits": digits, "distance": distance, "brevity": brevity, "carry": carry, "hundreds": hundreds}


def reward_table(prompts: list[str], completions: list[str]) -> dict[str, float]:
    """Each reward's mean over the prompts it applies to (NaN if none)."""
    table = {}
    for name, fn in REWARDS.items():
        vals = [v for v in fn(prompts, completions) if v is not None]
        table[name] = sum(vals) / len(vals) if vals else float("nan")
    return table


# ---- generation and the judge ---------------------------------------------------------------------
@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[str], *, greedy: bool, num_samples: int = 1, seed: int = 0, batch_size: int = 512
) -> list[str]:
    """Completions (decoded, end token removed), ``num_samples`` per prompt in prompt order."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out: list[str] = []
    todo = [p for p in prompts for _ in range(num_samples)]
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        done = torch.zeros(len(chunk), dtype=torch.bool)
        new: list[torch.Tensor] = []
        past = None
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        step_ids, step_pos = ids, pos
        for _ in range(MAX_COMPLETION):
            o = model(
                input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=past, use_cache=True
            )
            past = o.past_key_values
            logits = o.logits[:, -1, :].float()
            logits[:, VOCAB[PAD]] = -float("inf")
            if greedy:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(-1)
            nxt = torch.where(done, torch.full_like(nxt, VOCAB[PAD]), nxt)
            new.append(nxt)
            done |= nxt == VOCAB[EOS]
            if done.all():
                break
            mask = torch.cat([mask, torch.ones(len(chunk), 1, dtype=mask.dtype)], dim=1)
            step_ids = nxt.unsqueeze(1)
            step_pos = step_pos[:, -1:] + 1
        gen_ids = torch.stack(new, dim=1)
        out.extend(tokenizer.batch_decode(gen_ids, skip_special_tokens=True))
    return out


def judge(model, tokenizer, pairs: list[tuple[int, int]] | None = None) -> float:
    """Held-out exact-match accuracy of greedy completions (the ``judge`` split by default)."""
    pairs = splits()["judge"] if pairs is None else pairs
    comps = generate(model, tokenizer, [prompt(a, b) for a, b in pairs], greedy=True)
    return sum(c == str(a + b) for c, (a, b) in zip(comps, pairs)) / len(pairs)
