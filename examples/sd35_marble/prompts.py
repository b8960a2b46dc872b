"""Prompt sets and the prompt sampler of the SD3.5 MARBLE example.

Formats (the ones DiffusionNFT and Flow-GRPO train on):

- **text lines** (``*.txt``, e.g. Flow-GRPO's ``pickscore/train.txt``, ``ocr/train.txt``): one
  prompt per line; blank lines and lines starting with ``#`` are skipped;
- **GenEval-style metadata** (``*.jsonl``, e.g. Flow-GRPO's ``geneval/train_metadata.jsonl``):
  one JSON object per line with at least ``prompt``; ``tag`` (``single_object``,
  ``two_object``, ``counting``, ``colors``, ``position``, ``color_attr``), ``include``
  (objects that must appear: ``{"class", "count", "color"?, "position"?: [relation, index]}``)
  and ``exclude`` (``{"class", "count"}``: at least that many would be wrong) are kept as the
  prompt's metadata for a GenEval-style reward.

Bundled sets, generated deterministically (``builtin:NAME`` in ``--prompt-files``):

- ``geneval``: GenEval's six templates over the 80 COCO classes (``a photo of a bench``,
  ``a photo of a bench and a dog``, ``a photo of three dogs``, ``a photo of a red bench``,
  ``a photo of a bench left of a dog``, ``a photo of a red bench and a blue dog``) with the
  metadata above; every single-object, counting and colour prompt, and seeded subsets of the
  pair templates: 8,620 prompts;
- ``ocr``: quoted text in templated scenes (``a wooden sign in a forest that says "open"``):
  8,000 prompts;
- ``general``: style × subject × setting compositions: 8,000 prompts.

``PromptSampler`` draws prompts without replacement within each set's epoch, equally from the
sets, and returns the same prompts on every process for the same seed and step.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_SETS",
    "COCO_CLASSES",
    "GENEVAL_COLORS",
    "Prompt",
    "PromptFileError",
    "PromptSampler",
    "general_prompts",
    "geneval_prompts",
    "group_ids",
    "load_prompt_source",
    "load_prompt_sources",
    "load_text_prompts",
    "load_metadata_prompts",
    "ocr_prompts",
]


class PromptFileError(ValueError):
    """A prompt file cannot be used; the message names the file (and line)."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: its ``text``, the ``source`` set it came from, optional GenEval ``metadata``."""

    text: str
    source: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


# ---- loaders ----------------------------------------------------------------------------------
def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 prompt file; ``PromptFileError`` naming it if it cannot be read."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PromptFileError(f"prompt file {str(path)!r}: cannot read it ({exc})") from exc


def load_text_prompts(path: str | Path, source: str | None = None) -> list[Prompt]:
    """Prompts of a text file, one per line (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    name = source or path.stem
    lines = _read_lines(path)
    out = [Prompt(ln.strip(), name) for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not out:
        raise PromptFileError(
            f"prompt file {str(path)!r} is empty (no prompts after skipping blank lines and # comments)"
        )
    return out


def load_metadata_prompts(path: str | Path, source: str | None = None) -> list[Prompt]:
    """Prompts of a GenEval-style ``jsonl`` file: one object per line with a ``prompt`` string.

    Raises ``PromptFileError`` naming the file and line for invalid JSON, a line that is not an
    object, a missing or empty ``prompt``, or an ``include``/``exclude`` that is not a list.
    """
    path = Path(path)
    name = source or path.stem
    lines = _read_lines(path)
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise PromptFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
        text = record.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise PromptFileError(f"{where}: key 'prompt' must be a non-empty string, got {text!r}")
        for key in ("include", "exclude"):
            if key in record and not isinstance(record[key], list):
                raise PromptFileError(f"{where}: key {key!r} must be a list, got {record[key]!r}")
        out.append(Prompt(text.strip(), name, {k: v for k, v in record.items() if k != "prompt"}))
    if not out:
        raise PromptFileError(f"prompt file {str(path)!r} is empty (no JSON lines)")
    return out


def load_prompt_source(spec: str) -> list[Prompt]:
    """``builtin:NAME`` (a bundled set), a ``.jsonl`` metadata file or a text file."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_SETS:
            raise PromptFileError(
                f"unknown bundled prompt set {spec!r}; choose one of builtin:{', builtin:'.join(BUILTIN_SETS)}"
            )
        return BUILTIN_SETS[name]()
    if spec.endswith(".jsonl"):
        return load_metadata_prompts(spec)
    return load_text_prompts(spec)


def load_prompt_sources(specs: Sequence[str]) -> dict[str, list[Prompt]]:
    """One prompt list per spec, keyed by the spec (raises on an empty list or a repeat)."""
    if not specs:
        raise PromptFileError("no prompt source given: pass at least one file or builtin:NAME")
    repeated = sorted({s for s in specs if list(specs).count(s) > 1})
    if repeated:
        raise PromptFileError(f"prompt source(s) {repeated} given more than once")
    return {spec: load_prompt_source(spec) for spec in specs}


# ---- bundled sets -----------------------------------------------------------------------------
#: The 80 COCO object classes, as GenEval names them.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
#: GenEval's ten colours.
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_POSITIONS = ("left of", "right of", "above", "below")
_NUMBERS = {2: "two", 3: "three", 4: "four"}
_PLURAL = {
    "person": "people", "sheep": "sheep", "skis": "skis", "scissors": "scissors", "knife": "knives",
    "bus": "buses", "wine glass": "wine glasses", "bench": "benches", "couch": "couches", "sandwich": "sandwiches",
    "toothbrush": "toothbrushes", "tv": "tvs", "computer mouse": "computer mice", "hair drier": "hair driers",
}  # fmt: skip


def _plural(noun: str) -> str:
    return _PLURAL.get(noun, noun + "s")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def geneval_prompts(seed: int = 0, pairs_per_tag: int = 2500) -> list[Prompt]:
    """GenEval's six templates over the COCO classes, with GenEval metadata (deterministic).

    Every single-object (80), counting (80 × 2..4 = 240) and colour (80 × 10 = 800) prompt, and
    ``pairs_per_tag`` seeded samples of each pair template (two objects, position, colour
    attribution): 8,620 prompts by default.
    """
    rng = random.Random(f"geneval-{seed}")
    out: list[Prompt] = []

    def add(text: str, tag: str, include: list[dict[str, Any]], exclude: list[dict[str, Any]] | None = None) -> None:
        meta: dict[str, Any] = {"tag": tag, "include": include}
        if exclude is not None:
            meta["exclude"] = exclude
        out.append(Prompt(text, "geneval", meta))

    for c in COCO_CLASSES:
        add(f"a photo of {_a(c)}", "single_object", [{"class": c, "count": 1}])
    for c, n in itertools.product(COCO_CLASSES, _NUMBERS):
        add(
            f"a photo of {_NUMBERS[n]} {_plural(c)}",
            "counting",
            [{"class": c, "count": n}],
            [{"class": c, "count": n + 1}],
        )
    for c, col in itertools.product(COCO_CLASSES, GENEVAL_COLORS):
        add(f"a photo of {_a(col)} {c}", "colors", [{"class": c, "count": 1, "color": col}])
    pairs = [(a, b) for a, b in itertools.permutations(COCO_CLASSES, 2)]
    for a, b in rng.sample([p for p in pairs if p[0] < p[1]], pairs_per_tag):
        add(f"a photo of {_a(a)} and {_a(b)}", "two_object", [{"class": a, "count": 1}, {"class": b, "count": 1}])
    for a, b in rng.sample(pairs, pairs_per_tag):
        rel = rng.choice(GENEVAL_POSITIONS)
        include = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}]
        add(f"a photo of {_a(a)} {rel} {_a(b)}", "position", include)
    for a, b in rng.sample(pairs, pairs_per_tag):
        ca, cb = rng.sample(GENEVAL_COLORS, 2)
        include = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
        add(f"a photo of {_a(ca)} {a} and {_a(cb)} {b}", "color_attr", include)
    return out


_OCR_SCENES = (
    'a wooden sign in a forest that says "{}"', 'a neon sign above a bar that reads "{}"',
    'a chalkboard menu outside a cafe with the words "{}"', 'a t-shirt printed with the text "{}"',
    'a coffee mug with "{}" written on it', 'a street sign that says "{}"', 'a book cover titled "{}"',
    'a birthday cake with "{}" written in icing', 'a protest placard reading "{}"',
    'graffiti on a brick wall that says "{}"', 'a vintage movie poster with the title "{}"',
    'a license plate that reads "{}"', 'a shop window with "{}" painted on the glass',
    'a billboard on a highway that says "{}"', 'a handwritten note on a fridge that says "{}"',
    'a road sign in the desert reading "{}"', 'a cereal box with the brand name "{}"',
    'a banner at a stadium that says "{}"', 'a doormat with the word "{}"', 'a label on a glass jar that reads "{}"',
    'a sticky note on a laptop that says "{}"', 'a sandwich board on a sidewalk that reads "{}"',
    'a tattoo on an arm that says "{}"', 'a wooden crate stamped with "{}"', 'a poster in a classroom that reads "{}"',
    'a sign on a bakery door that says "{}"', 'a bus destination display showing "{}"',
    'a game screen that reads "{}"', 'a flag waving in the wind with the word "{}"',
    'a cardboard box labelled "{}"', 'a sign hanging in a hotel lobby that says "{}"',
    'a price tag that reads "{}"', 'letters made of balloons spelling "{}"', 'a sand drawing on a beach that says "{}"',
    'a lighted marquee of a theatre that reads "{}"', 'a notebook cover with the word "{}"',
    'a hand-painted sign at a farm stand that says "{}"', 'a subway station sign that reads "{}"',
    'a baseball cap embroidered with "{}"', 'a ribbon on a gift box that says "{}"',
)  # fmt: skip
_OCR_WORDS = (
    "open", "closed", "welcome", "hello", "exit", "sale", "coffee", "bakery", "books", "love", "peace", "hope",
    "stop", "danger", "quiet", "fresh", "garden", "music", "dream", "happy", "sunday", "home", "pizza", "tacos",
    "ocean", "river", "summit", "north", "south", "library", "museum", "station", "market", "cinema", "hotel",
    "park", "school", "diner", "bar", "gym", "studio", "repair", "bikes", "flowers", "honey", "apples", "bread",
    "tea", "juice", "jazz", "rock", "games", "toys", "pets", "vote", "free", "joy", "thanks", "sorry", "yes",
)  # fmt: skip
_OCR_PHRASES = (
    "good morning", "open late", "no parking", "fresh bread", "happy birthday", "best coffee", "thank you",
    "keep calm", "go team", "hot soup", "new arrivals", "day one", "save water", "be kind", "lost cat",
    "for rent", "live music", "grand opening", "stay home", "welcome back", "sold out", "wet paint", "dead end",
    "one way", "ice cream", "fish market", "last chance", "free wifi", "big sale", "hello world",
)  # fmt: skip


def ocr_prompts(seed: int = 0, size: int = 8000) -> list[Prompt]:
    """``size`` distinct prompts with quoted text: a scene template × a word or short phrase."""
    texts = list(_OCR_WORDS) + list(_OCR_PHRASES)
    texts += [f"{a} {b}" for a, b in itertools.permutations(_OCR_WORDS[:24], 2)]
    combos = list(itertools.product(_OCR_SCENES, texts))
    if size > len(combos):
        raise ValueError(f"ocr_prompts: size {size} exceeds the {len(combos)} combinations")
    rng = random.Random(f"ocr-{seed}")
    return [Prompt(scene.format(text), "ocr", {"text": text}) for scene, text in rng.sample(combos, size)]


_STYLES = (
    "a photo of", "a watercolor painting of", "an oil painting of", "a pencil sketch of", "a 3d render of",
    "a studio photograph of", "a cinematic still of", "an illustration of", "a pixel art image of",
    "a claymation scene of", "an ukiyo-e print of", "a charcoal drawing of", "a macro photograph of",
    "a vintage postcard of", "a children's book illustration of", "a low-poly render of",
)  # fmt: skip
_SUBJECTS = (
    "a red fox", "an old lighthouse", "a cup of coffee", "a sleeping cat", "a steam locomotive", "a wooden cabin",
    "a bowl of ramen", "a hot air balloon", "an astronaut", "a vintage car", "a golden retriever", "a koi fish",
    "a snowy owl", "a bicycle", "a medieval castle", "a violin", "a sunflower field", "a robot", "a pirate ship",
    "a stack of pancakes", "an elephant", "a glass teapot", "a windmill", "a dragon", "a jellyfish",
    "a mountain village", "a street musician", "a paper boat", "a cactus in a pot", "a hummingbird",
    "a tiger", "a treehouse", "a bonsai tree", "a grand piano", "a fishing boat", "a lantern", "a deer",
    "a bowl of cherries", "a motorcycle", "a penguin", "a greenhouse", "a knight in armor", "a sailboat",
    "a chess board", "a snow leopard", "a candle", "a pair of sneakers", "a telescope", "a waterfall", "a barn owl",
)  # fmt: skip
_SETTINGS = (
    "at sunset", "in the rain", "on a misty morning", "under a starry sky", "in a snowy forest", "on a sunny beach",
    "in a busy city street", "on a kitchen table", "in a quiet library", "in autumn", "at night with neon lights",
    "in a field of flowers", "on the moon", "in a cozy living room", "by a calm lake", "in the desert",
)  # fmt: skip


def general_prompts(seed: int = 0, size: int = 8000) -> list[Prompt]:
    """``size`` distinct style × subject × setting prompts (a stand-in for Pick-a-Pic prompts)."""
    combos = list(itertools.product(_STYLES, _SUBJECTS, _SETTINGS))
    if size > len(combos):
        raise ValueError(f"general_prompts: size {size} exceeds the {len(combos)} combinations")
    rng = random.Random(f"general-{seed}")
    return [Prompt(f"{s} {x} {w}", "general") for s, x, w in rng.sample(combos, size)]


#: ``builtin:NAME`` sets for ``--prompt-files``.
BUILTIN_SETS = {"general": general_prompts, "ocr": ocr_prompts, "geneval": geneval_prompts}


# ---- sampling ---------------------------------------------------------------------------------
class PromptSampler:
    """Draws ``per_step`` prompts per step, equally from the sources, without replacement per epoch.

    Each source is shuffled once per epoch (seeded by ``seed``, the source's index and the
    epoch) and read in order; when it runs out its next epoch starts with a fresh shuffle. With
    ``n`` sources a step takes ``per_step // n`` prompts from each and one more from
    ``per_step % n`` of them, rotating which ones, so every source gets the same share over
    ``n`` steps. The draw depends only on ``seed`` and the number of steps drawn so far, so
    every process draws the same prompts and ``state_dict`` resumes a run exactly.
    """

    def __init__(
        self, sources: Mapping[str, Sequence[Prompt]] | Sequence[Sequence[Prompt]], per_step: int, seed: int = 0
    ):
        items = list(sources.values()) if isinstance(sources, Mapping) else list(sources)
        if not items:
            raise ValueError("PromptSampler: no prompt source")
        for i, src in enumerate(items):
            if not src:
                raise ValueError(f"PromptSampler: source {i} is empty")
        if int(per_step) < 1:
            raise ValueError(f"PromptSampler: per_step must be >= 1, got {per_step!r}")
        self.sources = [list(s) for s in items]
        self.per_step = int(per_step)
        self.seed = int(seed)
        self.step = 0
        self._cursor = [0] * len(self.sources)
        self._epoch = [0] * len(self.sources)
        self._order = [self._shuffle(i, 0) for i in range(len(self.sources))]

    def _shuffle(self, source: int, epoch: int) -> list[int]:
        order = list(range(len(self.sources[source])))
        random.Random(f"{self.seed}-{source}-{epoch}").shuffle(order)
        return order

    def shares(self, step: int) -> list[int]:
        """How many prompts each source gives at ``step``."""
        n = len(self.sources)
        base, extra = divmod(self.per_step, n)
        return [base + (((i - step) % n) < extra) for i in range(n)]

    def _take(self, source: int, count: int) -> list[Prompt]:
        out = []
        for _ in range(count):
            if self._cursor[source] == len(self._order[source]):
                self._epoch[source] += 1
                self._cursor[source] = 0
                self._order[source] = self._shuffle(source, self._epoch[source])
            out.append(self.sources[source][self._order[source][self._cursor[source]]])
            self._cursor[source] += 1
        return out

    def draw(self) -> list[Prompt]:
        """The next step's ``per_step`` prompts, source by source."""
        out = []
        for source, count in enumerate(self.shares(self.step)):
            out.extend(self._take(source, count))
        self.step += 1
        return out

    def epochs(self) -> list[int]:
        """Completed epochs of each source."""
        return list(self._epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step, "cursor": list(self._cursor), "epoch": list(self._epoch)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"PromptSampler: state has seed {state['seed']!r}, this sampler {self.seed!r}")
        if len(state["cursor"]) != len(self.sources):
            raise ValueError(
                f"PromptSampler: state has {len(state['cursor'])} sources, this sampler {len(self.sources)}"
            )
        self.step = int(state["step"])
        self._epoch = [int(e) for e in state["epoch"]]
        self._cursor = [int(c) for c in state["cursor"]]
        self._order = [self._shuffle(i, e) for i, e in enumerate(self._epoch)]


def group_ids(prompts: Sequence[Prompt | str]) -> list[int]:
    """Group index of each prompt, keyed by its text (first appearance order): equal texts share one."""
    index: dict[str, int] = {}
    return [index.setdefault(p.text if isinstance(p, Prompt) else p, len(index)) for p in prompts]
