"""Prompt sets, the prompt sampler and the reward adapters of the SD3.5 example (CPU, offline)."""

from __future__ import annotations

import collections
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sd35_marble"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

import prompts as pr  # noqa: E402
import rewards as rw  # noqa: E402

torch.set_num_threads(1)


# ---- bundled sets -------------------------------------------------------------------------------
def test_bundled_sets_are_large_distinct_and_deterministic():
    for name, make in pr.BUILTIN_SETS.items():
        first, again = make(), make()
        assert [p.text for p in first] == [p.text for p in again], name
        assert len(first) >= 8000, name
        assert len({p.text for p in first}) == len(first), f"{name} repeats a prompt"
        assert {p.source for p in first} == {name}
    assert [p.text for p in pr.general_prompts(seed=1)] != [p.text for p in pr.general_prompts(seed=0)]


def test_geneval_set_follows_the_benchmark_templates_over_the_coco_classes():
    prompts = pr.geneval_prompts()
    assert len(pr.COCO_CLASSES) == len(set(pr.COCO_CLASSES)) == 80
    tags = collections.Counter(p.metadata["tag"] for p in prompts)
    assert tags == {
        "single_object": 80,
        "counting": 240,
        "colors": 800,
        "two_object": 2500,
        "position": 2500,
        "color_attr": 2500,
    }
    by_text = {p.text: p.metadata for p in prompts}
    assert by_text["a photo of an apple"]["include"] == [{"class": "apple", "count": 1}]
    assert by_text["a photo of four people"] == {
        "tag": "counting",
        "include": [{"class": "person", "count": 4}],
        "exclude": [{"class": "person", "count": 5}],
    }
    assert by_text["a photo of an orange cat"]["include"] == [{"class": "cat", "count": 1, "color": "orange"}]
    for p in prompts:
        classes = [obj["class"] for obj in p.metadata["include"]]
        assert all(c in pr.COCO_CLASSES for c in classes), p.text
        if p.metadata["tag"] == "position":
            rel = p.metadata["include"][1]["position"][0]
            assert rel in pr.GENEVAL_POSITIONS and f" {rel} " in p.text
        if p.metadata["tag"] == "color_attr":
            a, b = p.metadata["include"]
            assert a["color"] != b["color"] and a["color"] in p.text and b["color"] in p.text


def test_ocr_set_quotes_the_text_it_records():
    for p in pr.ocr_prompts()[:500]:
        assert rw.quoted_text(p.text) == p.metadata["text"]


# ---- loaders ------------------------------------------------------------------------------------
def test_text_loader_skips_comments_and_blank_lines(tmp_path):
    f = tmp_path / "train.txt"
    f.write_text("# header\n\na cat\n  a dog  \n", encoding="utf-8")
    assert [p.text for p in pr.load_text_prompts(f)] == ["a cat", "a dog"]
    assert {p.source for p in pr.load_prompt_source(str(f))} == {"train"}


def test_metadata_loader_keeps_geneval_fields(tmp_path):
    f = tmp_path / "train_metadata.jsonl"
    rows = [
        {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}], "prompt": "a photo of two dogs"},
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    ]  # fmt: skip
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    loaded = pr.load_prompt_source(str(f))
    assert [p.text for p in loaded] == ["a photo of two dogs", "a photo of a cat"]
    assert loaded[0].metadata == {k: v for k, v in rows[0].items() if k != "prompt"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"tag": "colors"}', "key 'prompt' must be a non-empty string, got None"),
        ('{"prompt": "  "}', "key 'prompt' must be a non-empty string"),
        ('{"prompt": "a cat", "include": "cat"}', "key 'include' must be a list"),
    ],
)
def test_metadata_loader_errors_name_the_file_and_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a photo of a cat"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(pr.PromptFileError) as info:
        pr.load_metadata_prompts(f)
    assert f"{f}:3: " in str(info.value) and message in str(info.value)


def test_loader_errors_for_empty_missing_and_unknown_sources(tmp_path):
    (tmp_path / "empty.txt").write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(pr.PromptFileError, match=r"empty\.txt' is empty"):
        pr.load_prompt_source(str(tmp_path / "empty.txt"))
    with pytest.raises(pr.PromptFileError, match=r"missing\.txt'.*cannot read"):
        pr.load_prompt_source(str(tmp_path / "missing.txt"))
    with pytest.raises(pr.PromptFileError, match="unknown bundled prompt set 'builtin:pickapic'.*builtin:general"):
        pr.load_prompt_source("builtin:pickapic")
    with pytest.raises(pr.PromptFileError, match="given more than once"):
        pr.load_prompt_sources(["builtin:ocr", "builtin:ocr"])


# ---- sampler ------------------------------------------------------------------------------------
def _sources(sizes):
    return {f"s{i}": [pr.Prompt(f"s{i}-{j}", f"s{i}") for j in range(n)] for i, n in enumerate(sizes)}


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    per_step=st.integers(1, 30),
    steps=st.integers(1, 25),
    seed=st.integers(0, 2**16),
)
def test_sampler_draws_without_replacement_within_each_epoch_and_equal_shares(sizes, per_step, steps, seed):
    sampler = pr.PromptSampler(_sources(sizes), per_step, seed)
    drawn = collections.defaultdict(list)
    per_source_totals = collections.Counter()
    for _ in range(steps):
        batch = sampler.draw()
        assert len(batch) == per_step
        for p in batch:
            drawn[p.source].append(p.text)
            per_source_totals[p.source] += 1
    n = len(sizes)
    for i, size in enumerate(sizes):
        seq = drawn[f"s{i}"]
        for start in range(0, len(seq), size):  # each full or partial epoch: no repeat
            epoch = seq[start : start + size]
            assert len(set(epoch)) == len(epoch)
        if len(seq) >= size:
            assert set(seq[:size]) == {f"s{i}-{j}" for j in range(size)}
    # equal shares: over any run, two sources differ by at most one prompt per step class
    totals = [per_source_totals[f"s{i}"] for i in range(n)]
    assert max(totals) - min(totals) <= 1
    if steps % n == 0:
        assert len(set(totals)) == 1


def test_sampler_is_deterministic_and_resumes_from_its_state():
    sources = _sources([7, 5, 11])
    a = pr.PromptSampler(sources, 6, seed=3)
    first = [a.draw() for _ in range(4)]
    state = a.state_dict()
    rest = [a.draw() for _ in range(5)]
    b = pr.PromptSampler(sources, 6, seed=3)
    assert [b.draw() for _ in range(4)] == first
    c = pr.PromptSampler(sources, 6, seed=3)
    c.load_state_dict(json.loads(json.dumps(state)))
    assert [c.draw() for _ in range(5)] == rest
    other = pr.PromptSampler(sources, 6, seed=4)
    assert [other.draw() for _ in range(4)] != first
    with pytest.raises(ValueError, match="seed 3"):
        other.load_state_dict(state)


def test_authors_step_takes_16_unique_prompts_from_each_bundled_set():
    sources = pr.load_prompt_sources(["builtin:general", "builtin:ocr", "builtin:geneval"])
    sampler = pr.PromptSampler(sources, 48, seed=0)
    for _ in range(3):
        batch = sampler.draw()
        assert collections.Counter(p.source for p in batch) == {"general": 16, "ocr": 16, "geneval": 16}
        assert len({p.text for p in batch}) == 48


def test_group_ids_key_groups_by_prompt_text():
    ps = [pr.Prompt("a"), pr.Prompt("b"), pr.Prompt("a", "other"), "c", "b"]
    assert pr.group_ids(ps) == [0, 1, 0, 2, 1]


# ---- OCR ----------------------------------------------------------------------------------------
def test_ocr_accuracy_ignores_case_and_spaces_and_is_clipped_at_zero():
    assert rw.ocr_accuracy("Open Late", "openlate") == 1.0
    assert rw.ocr_accuracy("open", "opem") == pytest.approx(0.75)
    assert rw.ocr_accuracy("hi", "something long") == 0.0
    assert rw.ocr_accuracy("open", "") == 0.0


def test_ocr_scores_give_nan_without_quotes_and_never_read_those_images():
    reads = {0: "OPEN", 2: "stpo"}
    called = []

    def read(i):
        called.append(i)
        return reads[i]

    prompts = ['a sign that says "open"', "a cat", 'a sign that says "stop"']
    scores = rw.ocr_scores(prompts, read)
    assert called == [0, 2]
    assert scores[0] == 1.0 and math.isnan(scores[1]) and scores[2] == pytest.approx(0.5)


def test_ocr_backend_options_are_checked():
    with pytest.raises(ValueError, match="backend must be 'paddle' or 'easyocr', got 'tesseract'"):
        rw.OcrReward(backend="tesseract")
    with pytest.raises(ValueError, match="'model_dir' is for backend 'easyocr'"):
        rw.OcrReward(backend="paddle", model_dir="/x")


def test_easyocr_backend_reads_rendered_text():
    pytest.importorskip("easyocr")  # needs torchvision, which does not import next to this CPU torch
    pytest.importorskip("easyocr_en_models")
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (256, 96), "white")
    ImageDraw.Draw(img).text((20, 25), "OPEN", fill="black", font=ImageFont.load_default(size=40))
    x = torch.from_numpy(__import__("numpy").asarray(img)).permute(2, 0, 1)[None].float() / 255
    reward = rw.build_rewards(["ocr"], {"ocr": {"backend": "easyocr"}})[0]
    scores = reward(x.repeat(2, 1, 1, 1), ['a sign that says "open"', "a blank card"])
    assert scores[0] > 0.7 and math.isnan(scores[1])


# ---- model rewards from local directories --------------------------------------------------------
def _save_tiny_clip(path, words, seed):
    from tiny import build_word_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    text = dict(
        vocab_size=len(words) + 4,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    model.logit_scale.data.fill_(math.log(20.0))
    model.save_pretrained(path)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32, do_center_crop=True),
        tokenizer=build_word_tokenizer(words, max_length=16, add_bos=True),
    )
    processor.save_pretrained(path)
    return model.eval(), processor


def test_two_reward_adapters_load_from_local_directories_and_score_like_the_model(tmp_path):
    from tiny import vocabulary

    prompts = ["a red cat", 'a sign that says "open"', "a blue dog"]
    words = vocabulary(prompts)
    pick_model, pick_proc = _save_tiny_clip(tmp_path / "pick", words, seed=0)
    clip_model, clip_proc = _save_tiny_clip(tmp_path / "clip", words, seed=1)
    opts = {
        "pickscore": {"path": str(tmp_path / "pick"), "processor_path": str(tmp_path / "pick")},
        "clipscore": {"path": str(tmp_path / "clip"), "processor_path": str(tmp_path / "clip")},
    }
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pick, clip = rw.build_rewards(["pickscore", "clipscore"], opts, device="cpu", dtype="float32")
    assert pick.device == torch.device("cpu") and pick.dtype == torch.float32

    def expected(model, proc, scale):
        pil = rw.to_pil(images)
        with torch.no_grad():
            img = rw._features(model.get_image_features(**proc(images=pil, return_tensors="pt")))
            txt = rw._features(model.get_text_features(**proc(text=prompts, padding=True, return_tensors="pt")))
        return scale * torch.nn.functional.cosine_similarity(img, txt, dim=-1)

    torch.testing.assert_close(pick(images, prompts), expected(pick_model, pick_proc, 20.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clip(images, prompts), expected(clip_model, clip_proc, 1.0), rtol=1e-5, atol=1e-5)
    # different images score differently; the two adapters are different models
    assert not torch.allclose(pick(images, prompts), pick(images.flip(0), prompts))
    # bfloat16 weights: the same scores up to bf16 rounding
    (pick_bf16,) = rw.build_rewards(["pickscore"], {"pickscore": opts["pickscore"]}, dtype="bfloat16")
    assert next(pick_bf16.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(pick_bf16(images, prompts), pick(images, prompts), rtol=0.05, atol=0.3)


def test_build_rewards_passes_device_and_dtype_only_where_accepted_and_options_win():
    built = rw.build_rewards(["brightness", "text_contrast"], device="cpu", dtype="bfloat16")
    assert [r.name for r in built] == ["brightness", "text_contrast"]
    with pytest.raises(rw.RewardLoadError, match="reward 'clipscore': dtype must be one of .* got 'float8'"):
        rw.build_rewards(["clipscore"], {"clipscore": {"dtype": "float8", "path": "/nonexistent"}})
    with pytest.raises(ValueError, match="dtype must be one of"):
        rw.resolve_dtype("half")
    assert rw.resolve_dtype(torch.float16) is torch.float16
