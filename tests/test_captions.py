"""Automatic captions: the embedded captioner reads scenes back; other bases use BLIP or fall back cleanly."""

from __future__ import annotations

import random
import re

import pytest
import torch
from PIL import Image

from embedded import EMBEDDED_ID, captioner, examples, scenes
from models import captions

SEED = 4242  # neither the captioner's training seed nor its evaluation seed

_ONE_OF = "|".join
GRAMMAR = re.compile(
    rf"(?P<count>an?|two|three)(?: (?P<size>small|big))?(?: (?P<texture>{_ONE_OF(scenes.TEXTURES)}))?"
    rf"(?: (?P<colour>{_ONE_OF(scenes.COLOURS)}))? (?P<noun>{_ONE_OF([*scenes.SHAPES, *scenes.PLURALS.values()])})"
    r"(?: at the (?P<position>left|right|top|bottom))?"
    rf"(?: on an? (?P<background>{_ONE_OF(scenes.COLOURS)}) background)?"
)
SINGULAR = {plural: shape for shape, plural in scenes.PLURALS.items()} | {shape: shape for shape in scenes.SHAPES}


def rendered(count: int, seed: int = SEED) -> list[tuple[scenes.Scene, Image.Image, Image.Image]]:
    rng = random.Random(seed)
    result = []
    for _ in range(count):
        scene = scenes.random_scene(rng, allow_held_out=True)
        result.append((scene, *scenes.render(scene, rng)))
    return result


def parse(caption: str) -> dict[str, str | None]:
    """The parts of a caption in the scene grammar (fails the test when it is not in the grammar)."""
    match = GRAMMAR.fullmatch(caption)
    assert match, f"not in the scene grammar: {caption!r}"
    words = caption.split()
    assert set(words) <= set(scenes.vocabulary()), caption
    for word, following in zip(words, words[1:]):
        if word in ("a", "an"):
            assert (word == "an") == (following[0] in "aeiou"), caption
    return match.groupdict() | {"shape": SINGULAR[match["noun"]]}


def test_it_reads_fresh_renders_back():
    scenes_and_images = rendered(60)
    read = [parse(c) for c in captioner.caption_images([image for _, image, _ in scenes_and_images])]
    shapes = sum(r["shape"] == s.shape for r, (s, _, _) in zip(read, scenes_and_images)) / len(read)
    colours = sum(r["colour"] == s.colour for r, (s, _, _) in zip(read, scenes_and_images)) / len(read)
    assert shapes >= 0.9 and colours >= 0.8, (shapes, colours)


def test_it_still_reads_the_shape_under_polka_dots():
    scenes_and_images = rendered(60)
    read = captioner.caption_images([examples.polka(image, mask) for _, image, mask in scenes_and_images])
    shapes = sum(parse(r)["shape"] == s.shape for r, (s, _, _) in zip(read, scenes_and_images)) / len(read)
    assert shapes >= 0.8, shapes


@pytest.mark.parametrize("look", ["sunset", "ink"])
def test_captions_of_styled_pictures_and_odd_sizes_stay_in_the_grammar(look):
    images = [examples.EXAMPLES[look].transform(image, mask) for _, image, mask in rendered(12)]
    images += [images[0].resize((200, 200)), Image.new("RGBA", (30, 50), (0, 0, 0, 0)), Image.new("L", (64, 64))]
    for caption in captioner.caption_images(images):
        parse(caption)


def confident(scene: scenes.Scene, certainty: float = 0.9) -> dict[str, list[float]]:
    """Hand-made head probabilities that point at `scene`'s labels with `certainty`."""
    values = {"count": scene.count, "shape": scene.shape, "colour": scene.colour, "background": scene.background,
              "size": scene.size, "position": scene.position, "texture": scene.texture}
    probs = {}
    for head, labels in captioner.HEADS.items():
        rest = (1 - certainty) / (len(labels) - 1)
        probs[head] = [certainty if label == values[head] else rest for label in labels]
    return probs


def test_confident_heads_write_exactly_the_scene_caption():
    rng = random.Random(SEED)
    for scene in [scenes.Scene("star", "orange", "orange")] + [scenes.random_scene(rng) for _ in range(50)]:
        assert captioner.caption_from_probabilities(confident(scene)) == scene.caption()


def test_unsure_words_are_left_out():
    scene = scenes.Scene("cross", "red", "orange", count=2, size="small", position="top", texture="striped")
    probs = confident(scene)
    assert captioner.caption_from_probabilities(probs) == (
        "two small striped red crosses at the top on an orange background")
    unsure = confident(scene, certainty=0.5)  # below CONFIDENCE everywhere
    # Count and shape are always said (the most likely ones); every other word goes.
    assert captioner.caption_from_probabilities(unsure) == "two crosses"
    assert captioner.caption_from_probabilities(probs | {"background": unsure["background"]}) == (
        "two small striped red crosses at the top")
    assert captioner.caption_from_probabilities(probs | {"colour": unsure["colour"], "size": unsure["size"]}) == (
        "two striped crosses at the top on an orange background")
    orange = confident(scenes.Scene("ring", "orange", "blue"))
    assert captioner.caption_from_probabilities(orange) == "an orange ring on a blue background"
    assert captioner.caption_from_probabilities(orange | {"colour": unsure["colour"]}) == "a ring on a blue background"


def test_the_embedded_base_gets_the_scene_captioner():
    images = [image for _, image, _ in rendered(3)]
    texts, note = captions.auto_captions(images, EMBEDDED_ID, "sd1")
    assert len(texts) == 3 and all(isinstance(text, str) for text in texts) and "embedded" in note
    assert captions.auto_captions([], EMBEDDED_ID, "sd1")[0] == []


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """No network and an empty Hugging Face cache, whatever this machine has cached."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(captions.ONLINE_ENV, raising=False)
    monkeypatch.delenv(captions.MODEL_ENV, raising=False)
    # huggingface_hub reads these once, at import: an earlier test may have imported it already.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    captions._load_blip.cache_clear()
    yield tmp_path
    captions._load_blip.cache_clear()


def test_other_bases_without_a_cached_blip_fall_back_to_the_template(empty_hub):
    texts, note = captions.auto_captions([Image.new("RGB", (64, 64))] * 2, "runwayml/stable-diffusion-v1-5", "sd1")
    assert texts == [None, None]
    assert captions.BLIP_ID in note and "cache" in note and f"{captions.ONLINE_ENV}=1" in note and ".txt" in note


def test_a_broken_captioner_model_is_a_note_not_a_crash(empty_hub, monkeypatch):
    folder = empty_hub / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    monkeypatch.setenv(captions.MODEL_ENV, str(folder))
    texts, note = captions.auto_captions([Image.new("RGB", (64, 64))], "some/sdxl-model", "sdxl")
    assert texts == [None] and str(folder) in note and ".txt" in note


def test_a_cached_blip_captions_other_bases(empty_hub, monkeypatch):
    folder = save_tiny_blip(empty_hub / "tiny-blip")
    monkeypatch.setenv(captions.MODEL_ENV, str(folder))
    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (300, 200), "blue")]
    texts, note = captions.auto_captions(images, "stabilityai/stable-diffusion-2-1", "sd2")
    assert len(texts) == 2 and all(isinstance(text, str) and text for text in texts), texts
    assert str(folder) in note


def save_tiny_blip(folder):
    """A randomly initialised BLIP captioner a few kB big, with its processor, saved like a downloaded one."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "blue", "star", "on", "background"]
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(words)}, bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = BlipConfig(
        text_config=small | {"vocab_size": len(words), "encoder_hidden_size": 16, "max_position_embeddings": 40,
                             "bos_token_id": 5, "eos_token_id": 3, "sep_token_id": 3, "pad_token_id": 0},
        vision_config=small | {"image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
