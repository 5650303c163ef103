"""Blending semantics: zero scales are the base model bit for bit; a scale s adds s*(alpha/r)*B@A; styles add.

Both ways of blending must keep them: fused (the default; the blend written into the weights once
per change of scales, issue 5) and unfused (diffusers' set_adapters, every LoRA branch every step).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer

from styles import formats
from styles.blend import Blender, _blended_weight
from styles.generation import GenerationCancelled, GenerationLine, Ticket
from styles.library import StyleLibrary
from styles.metadata import lora_config
from tests.conftest import copy_styles, pattern_image, save_style, train_style

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """ink and pastel, trained once per module: training is what makes these tests slow."""
    library = StyleLibrary(tmp_path_factory.mktemp("trained"))
    train_style(library, "ink", seed=1, rank=4, alpha=8.0)  # alpha != rank on purpose
    train_style(library, "pastel", seed=2, rank=8)
    return library


@pytest.fixture
def blender(library, base, trained):
    copy_styles(trained, library)
    return Blender(base, library)


@pytest.fixture
def base_weights(base):
    """The base model's weights, taken before any style touches the UNet."""
    return _base_weights(base.pipe.unet)


@pytest.fixture(params=[True, False], ids=["fused", "unfused"])
def fuse(request):
    return request.param


def _image(blender, styles, seed=5):
    return np.asarray(blender.generate("a red circle", seed=seed, steps=8, styles=styles)[0])


def _float_image(blender, styles, seed=5):
    """The image before it is rounded to 8 bits, so that small float differences show."""
    blender.apply(styles)
    generator = torch.Generator().manual_seed(seed)
    return blender.base.pipe("a red circle", num_inference_steps=8, generator=generator, output_type="np").images[0]


def _base_weights(unet):
    """The UNet's base weights by their plain names (peft's wrapping and LoRA weights left out)."""
    return {
        name.replace(".base_layer", ""): tensor.clone()
        for name, tensor in unet.state_dict().items()
        if "lora_" not in name
    }


def _assert_base_weights(blender, base_weights):
    """Every base weight equals the base model's, bit for bit."""
    now = _base_weights(blender.base.pipe.unet)
    assert now.keys() == base_weights.keys()
    changed = [name for name in now if not torch.equal(now[name], base_weights[name])]
    assert not changed, f"{len(changed)} weights differ from the base model's, e.g. {changed[:3]}"


def _lora_delta(library, name):
    """alpha/rank * B @ A of LAYER, read straight from the style file."""
    tensors, metadata = formats.read_style(library.path_for(name))
    config = lora_config(metadata)
    a, b = tensors[f"unet.{LAYER}.lora_A.weight"], tensors[f"unet.{LAYER}.lora_B.weight"]
    return config["lora_alpha"] / config["r"] * b @ a


def _layer_delta(blender, base_weights, x):
    """What LAYER now adds to the base model's output for x, through LoRA branches or fused weights."""
    layer = blender.base.pipe.unet.get_submodule(LAYER)
    with torch.no_grad():
        return layer(x) - torch.nn.functional.linear(x, base_weights[f"{LAYER}.weight"])  # to_v has no bias


def test_all_scales_zero_is_the_base_model_bit_for_bit(blender, fuse):
    blender.fuse = fuse
    base_image = _image(blender, {})
    assert np.array_equal(_image(blender, {"ink": 0.0, "pastel": 0.0}), base_image)
    assert not np.array_equal(_image(blender, {"ink": 1.0}), base_image)
    assert np.array_equal(_image(blender, {"ink": 0, "pastel": 0}), base_image)  # and back again


@pytest.mark.parametrize("scale", [-2.0, -0.5, 0.5, 1.0, 1.7])
def test_a_style_adds_scale_times_alpha_over_rank_times_BA(blender, library, base_weights, fuse, scale):
    blender.fuse = fuse
    x = torch.randn(3, blender.base.pipe.unet.get_submodule(LAYER).in_features,
                    generator=torch.Generator().manual_seed(0))
    blender.apply({"ink": scale})
    expected = x @ (scale * _lora_delta(library, "ink")).T
    torch.testing.assert_close(_layer_delta(blender, base_weights, x), expected, rtol=1e-4, atol=1e-6)


def test_two_styles_add(blender, library, base_weights, fuse):
    blender.fuse = fuse
    x = torch.randn(2, blender.base.pipe.unet.get_submodule(LAYER).in_features,
                    generator=torch.Generator().manual_seed(1))
    blender.apply({"ink": 0.7, "pastel": -1.2})
    expected = x @ (0.7 * _lora_delta(library, "ink") - 1.2 * _lora_delta(library, "pastel")).T
    torch.testing.assert_close(_layer_delta(blender, base_weights, x), expected, rtol=1e-4, atol=1e-6)
    # Image level: two styles differ from either alone.
    both, ink = _image(blender, {"ink": 1, "pastel": 1}), _image(blender, {"ink": 1})
    assert not np.array_equal(both, ink)


def test_unknown_style_and_bad_scale_are_refused_before_anything_changes(blender):
    blender.apply({"ink": 1.0})
    active_before = blender.base.pipe.get_active_adapters()
    weight = blender.base.pipe.unet.get_submodule(LAYER).weight
    writes_before = weight._version  # bumped by every in-place write
    with pytest.raises(ValueError, match=r"Unknown style\(s\): nope. Available styles: ink, pastel"):
        blender.apply({"nope": 1.0, "pastel": 1.0})
    with pytest.raises(ValueError, match="between -2.0 and 2.0"):
        blender.apply({"pastel": 3.0})
    with pytest.raises(ValueError, match="must be a number"):
        blender.apply({"pastel": "lots"})
    assert blender.base.pipe.get_active_adapters() == active_before
    assert weight._version == writes_before


def test_deleted_and_retrained_styles_are_picked_up_live(blender, library):
    first = _image(blender, {"ink": 1})
    library.delete("ink")
    with pytest.raises(ValueError, match="Unknown style"):
        blender.apply({"ink": 1})
    train_style(library, "ink", seed=9, rank=4)
    assert not np.array_equal(_image(blender, {"ink": 1}), first)


def test_generated_images_carry_their_recipe(blender, tmp_path):
    from PIL import Image

    from styles.blend import save_png

    image = blender.generate("a blue star", negative_prompt="noise", seed=11, steps=4, styles={"pastel": 0.5})[0]
    path = save_png(image, tmp_path / "out.png")
    text = Image.open(path).text
    trigger = blender.library.get("pastel").trigger
    # the prompt actually used: the style's trigger word added (issue 17)
    assert f"a blue star, {trigger} <lora:pastel:0.5>" in text["parameters"] and "Seed: 11" in text["parameters"]
    assert '"styles": {"pastel": 0.5}' in text["style_studio"]
    plain = blender.generate("a blue star", seed=11, steps=4, styles={"pastel": 0.5}, add_triggers=False)[0]
    assert plain.info["parameters"].startswith("a blue star <lora:pastel:0.5>")


@pytest.mark.parametrize("scales", [{"ink": 0.0}, {"ink": 1.0, "pastel": -0.5}], ids=["all-zero", "fused"])
def test_training_gets_the_blenders_pipeline_only_through_lend_base(blender, library, base_weights, scales):
    """A training run in this process cannot take a pipeline the blender holds; lend_base() hands it over as it
    was loaded (whatever was fused or switched off), the run learns what it learns on a fresh base, and the
    blender draws as before afterwards."""
    from models.base import load_base
    from trainer.config import make_config
    from trainer.data import ImageSet
    from trainer.events import Failed, Finished
    from trainer.train import train

    ink, drawn = _image(blender, {"ink": 1.0}), _image(blender, scales)
    cfg = make_config("Quick", style_name="after", steps=3, num_samples=0, validation_prompts=0)
    images = ImageSet([pattern_image(9)], [None], ["a"])
    refused = list(train(cfg, images, blender.base))
    assert len(refused) == 1 and isinstance(refused[0], Failed) and "lend_base" in refused[0].message
    with blender.lend_base() as base:
        _assert_base_weights(blender, base_weights)
        assert not any(isinstance(module, LoraLayer) for module in base.pipe.unet.modules())
        events = list(train(cfg, images, base))
    assert isinstance(events[-1], Finished), events[-1]
    fresh = list(train(cfg, images, load_base()))[-1]
    assert all(torch.equal(events[-1].adapter.tensors[k], fresh.adapter.tensors[k]) for k in fresh.adapter.tensors)
    save_style(library, events[-1])
    assert "after" in library.names()
    assert np.array_equal(_image(blender, scales), drawn)
    assert np.array_equal(_image(blender, {"ink": 1.0}), ink)
    assert np.array_equal(_image(blender, {"ink": 1.0}), ink)  # and again, with no change in between


# -- fused blending (issue 5) --------------------------------------------------------------


@pytest.mark.parametrize(
    "styles",
    [{"ink": 0.8}, {"ink": -1.3}, {"ink": 0.7, "pastel": -1.2}, {"ink": 1.5, "pastel": 0.4}],
    ids=["one", "one-negative", "two-mixed", "two-positive"],
)
def test_fused_images_equal_unfused_images(blender, styles):
    """Same seed, same styles: fusing only reorders float arithmetic, so the images agree closely."""
    blender.fuse = False
    unfused, unfused_8bit = _float_image(blender, styles), _image(blender, styles)
    blender.fuse = True
    fused, fused_8bit = _float_image(blender, styles), _image(blender, styles)
    np.testing.assert_allclose(fused, unfused, rtol=0, atol=1e-4)
    assert np.abs(fused_8bit.astype(int) - unfused_8bit).max() <= 1
    assert not np.array_equal(fused, _float_image(blender, {}))  # the styles do show


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_after_many_slider_moves_all_zero_is_the_base_bit_for_bit(library, trained, precision):
    """Restoring copies the kept originals back; undoing by subtraction would drift, most in bf16."""
    from models.base import load_base

    base = load_base(precision=precision)
    copy_styles(trained, library)
    blender, base_weights = Blender(base, library), _base_weights(base.pipe.unet)
    base_image = _image(blender, {})
    rng = random.Random(0)
    for _ in range(50):
        blender.apply({name: rng.choice([0.0, round(rng.uniform(-2, 2), 2)]) for name in ("ink", "pastel")})
    assert not np.array_equal(_image(blender, {"ink": 1.2, "pastel": -0.7}), base_image)
    assert np.array_equal(_image(blender, {"ink": 0, "pastel": 0}), base_image)
    _assert_base_weights(blender, base_weights)


def test_lora_layers_are_out_of_the_unet_while_fused(blender):
    """Fused, the UNet runs its own plain layers (no peft layer, no branch); unfused, the branches run."""
    unet = blender.base.pipe.unet
    blender.fuse = False
    blender.apply({"ink": 1.0, "pastel": -0.5})  # loads the styles: now their LoRA layers exist
    calls = []
    for name, module in unet.named_modules():
        if name.endswith(("lora_A.ink", "lora_A.pastel")):
            module.register_forward_hook(lambda *_: calls.append(1))
    _image(blender, {"ink": 1.0, "pastel": -0.5})
    assert calls  # the hooks do see the branches when they run
    calls.clear()
    blender.fuse = True
    _image(blender, {"ink": 1.0, "pastel": -0.5})
    assert not calls
    assert not any(isinstance(module, LoraLayer) for module in unet.modules())
    blender.fuse = False  # unfused again: peft's layers load again, and their branches run
    _image(blender, {"ink": 1.0, "pastel": -0.5})
    assert any(isinstance(module, LoraLayer) for module in unet.modules())
    for name, module in unet.named_modules():
        if name.endswith(("lora_A.ink", "lora_A.pastel")):
            module.register_forward_hook(lambda *_: calls.append(1))
    _image(blender, {"ink": 1.0, "pastel": -0.5})
    assert calls


def test_the_same_scales_again_write_nothing(blender):
    first = _image(blender, {"ink": 0.5})
    weight = blender.base.pipe.unet.get_submodule(LAYER).weight
    writes = weight._version  # bumped by every in-place write
    assert np.array_equal(_image(blender, {"ink": 0.5, "pastel": 0}), first)
    assert weight._version == writes
    blender.apply({"ink": 0.6})
    assert weight._version > writes


def test_a_style_file_replaced_on_disk_is_picked_up(blender, library, base_weights):
    """Restore, reload, fuse: ink's file replaced by pastel's then draws pastel, and the base comes back."""
    ink, pastel = _image(blender, {"ink": 1.0}), _image(blender, {"pastel": 1.0})
    _image(blender, {"ink": 1.0})  # ink fused when its file changes
    shutil.copy(library.path_for("pastel"), library.path_for("ink"))
    now = library.get("ink").mtime
    os.utime(library.path_for("ink"), (now + 10, now + 10))  # a different mtime even on a coarse clock
    replaced = _image(blender, {"ink": 1.0})
    assert np.array_equal(replaced, pastel) and not np.array_equal(replaced, ink)
    blender.apply({})
    _assert_base_weights(blender, base_weights)


def test_a_failed_fuse_leaves_the_base_model(blender, base_weights, monkeypatch):
    calls = []

    def failing(original, contributions, mode="sum"):
        calls.append(original)
        if len(calls) == 5:
            raise torch.OutOfMemoryError("no room for the blend")
        return _blended_weight(original, contributions, mode)

    blender.apply({"pastel": 1.0})
    monkeypatch.setattr("styles.blend._blended_weight", failing)
    with pytest.raises(torch.OutOfMemoryError):
        blender.apply({"ink": 1.0})
    _assert_base_weights(blender, base_weights)
    monkeypatch.undo()
    assert blender.apply({"pastel": 1.0}) == {"pastel": 1.0}  # and it fuses again afterwards
    assert not np.array_equal(_image(blender, {"pastel": 1.0}), _image(blender, {}))


def test_generations_from_several_threads_each_get_their_own_blend(blender):
    """The lock holds a blend in the weights for a whole generation: no thread sees another's."""
    blends = [{"ink": 1.0}, {"pastel": -1.0}, {}]
    expected = [_image(blender, styles) for styles in blends]
    results, errors = {}, []

    def worker(i):
        try:
            results[i] = [_image(blender, blends[i]) for _ in range(2)]
        except Exception as err:  # reported below: a thread's exception would vanish otherwise
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(blends))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for i, images in results.items():
        assert all(np.array_equal(image, expected[i]) for image in images)


def _lora_file(rank: int = 4) -> bytes:
    """A small diffusers-layout LoRA file for one attention projection (valid header and data)."""
    import safetensors.torch

    tensors = {f"unet.{LAYER}.lora_A.weight": torch.zeros(rank, 32),
               f"unet.{LAYER}.lora_B.weight": torch.zeros(32, rank)}
    return safetensors.torch.save(tensors, metadata={"format": "pt"})


def test_damaged_style_files_are_listed_with_their_reason_and_never_reach_generation(library, base):
    """Issue 18, item 12: a file cut short after an intact header was listed as a good style; others vanished."""
    library.path_for("good").write_bytes(_lora_file())
    library.path_for("cut").write_bytes(_lora_file()[:-100])  # its header intact: it read like a good style
    library.path_for("junk").write_bytes(b"not a safetensors file")
    (library.root / ("not a name " * 20 + ".safetensors")).write_bytes(_lora_file())
    styles, problems = library.scan()
    assert [info.name for info in styles] == ["good"] and [info.name for info in library.list()] == ["good"]
    reasons = {problem.name: problem.reason for problem in problems}
    assert set(reasons) == {"cut", "junk", "not a name not a name not a name not a n…"}
    assert "cut.safetensors is damaged (truncated" in reasons["cut"] and "Delete it" in reasons["cut"]
    assert "not a safetensors file" in reasons["junk"]
    assert "not a style name" in reasons["not a name not a name not a name not a n…"]
    with pytest.raises(ValueError, match=r"Style 'cut' cannot be used: cut.safetensors is damaged \(truncated"):
        Blender(base, library).generate("a red circle", steps=1, styles={"cut": 1.0})
    library.delete("cut")  # a damaged style can be deleted, which is what listing it is for
    assert "cut" not in {problem.name for problem in library.problems()}


# -- what a request may ask for (issue 18, items 10 and 15) --------------------------------------------
HOSTILE_OPTIONS = [
    (dict(prompt="x" * 10_001), "Prompt is 10,001 characters long: too long. Use at most 10,000 characters"),
    (dict(negative_prompt="x" * 3_000_000), "Negative prompt is 3,000,000 characters long: too long"),
    (dict(prompt=["a", "list"]), "Prompt is ['a', 'list']: not text"),
    (dict(seed=2**64), "Seed is 18446744073709551616: too large. Use a whole number from 0 to 18446744073709551615"),
    (dict(seed=float("nan")), "Seed is nan: not a finite number. Use a whole number from 0"),
    (dict(seed=float("inf")), "Seed is inf: not a finite number"),
    (dict(seed=-2), "Seed is -2: too small. Use a whole number from 0 to 18446744073709551615 (2^64 - 1), or -1"),
    (dict(seed=1.5), "Seed is 1.5: not a whole number"),
    (dict(seed="seven"), "Seed is 'seven': not a number"),
    (dict(steps=float("nan")), "Steps is nan: not a finite number. Use a whole number from 1 to 100."),
    (dict(steps=1000), "Steps is 1000: too large. Use a whole number from 1 to 100."),
    (dict(steps=0), "Steps is 0: too small"),
    (dict(guidance=float("nan")), "Guidance is nan: not a finite number. Use a number from 0 to 20."),
    (dict(guidance=-1), "Guidance is -1: too small"),
    (dict(width=float("inf")), "Width is inf: not a finite number. Use 0 for this model's native 64 px, or a "
                               "multiple of 16 from 16 to 128"),
    (dict(width=1024), "Width is 1024: too large. Use 0 for this model's native 64 px, or a multiple of 16 from 16 "
                       "to 128 (width and height must be multiples of 16; 2x the native side"),
    (dict(height=65), "Height is 65: not a multiple of 16."),
    (dict(height=-64), "Height is -64: too small."),
    (dict(styles=["ink"]), "Styles is ['ink']: not a table of style names and scales. Send {\"style name\": scale"),
    (dict(styles={"<b>" + "x" * 100_000: 1.0}), "Unknown style(s): <b>xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx…. "
                                                "Available styles: none yet."),
]


@pytest.mark.parametrize("options, words", HOSTILE_OPTIONS, ids=[words[:32] for _, words in HOSTILE_OPTIONS])
def test_each_option_out_of_bounds_is_refused_naming_the_field_the_problem_and_the_range(library, base, options,
                                                                                         words):
    options = {"prompt": "a red circle", "steps": 1, **options}
    with pytest.raises(ValueError) as caught:
        Blender(base, library).generate(**options)
    assert words in str(caught.value)
    assert len(str(caught.value)) < 400  # a hostile value is echoed by a short prefix, never whole


def test_large_pictures_need_the_servers_opt_in_and_seed_minus_one_is_random(library, base):
    assert Blender(base, library).max_side() == 2 * base.resolution
    large = Blender(base, library, allow_large=True)
    assert large.check_options("a red circle", width=1024, height=0)["width"] == 1024
    with pytest.raises(ValueError, match="Width is 2056: too large. .* up to 2048 px"):
        large.check_options("a red circle", width=2056)
    blender = Blender(base, library)
    seeds = {json.loads(blender.generate("a red circle", seed=-1, steps=1)[0].info["style_studio"])["seed"]
             for _ in range(2)}
    assert len(seeds) == 2 and all(0 <= seed < 2**32 for seed in seeds)


def test_a_running_generation_stops_at_the_next_step_when_cancelled(library, base):
    blender = Blender(base, library)
    ticket, outcome = Ticket("page-1"), {}

    def draw():
        try:
            blender.generate("a red circle", steps=100, ticket=ticket)
        except GenerationCancelled as err:
            outcome["error"] = str(err)

    worker = threading.Thread(target=draw)
    worker.start()
    deadline = time.monotonic() + 60
    while ticket.step < 1 and time.monotonic() < deadline:  # running: its first denoising step is done
        time.sleep(0.01)
    assert blender.line.position("page-1") == 0 and blender.line.position("someone else") is None
    assert blender.line.cancel("someone else") == 0 and blender.line.cancel("page-1") == 1
    worker.join(timeout=60)
    assert re.fullmatch(r"Generation cancelled at step (\d+) of 100\.", outcome["error"])
    assert int(re.search(r"step (\d+)", outcome["error"])[1]) < 100
    assert blender.line.position("page-1") is None
    assert blender.generate("a red circle", steps=1)  # the pipeline serves the next one as usual


def test_waiting_generations_keep_their_place_and_leave_the_line_when_cancelled():
    line, outcome = GenerationLine(), {}

    def wait(owner):
        try:
            with line.turn(Ticket(owner)):
                outcome[owner] = "ran"
        except GenerationCancelled as err:
            outcome[owner] = str(err)

    with line.turn(Ticket("first")):
        waiters = {owner: threading.Thread(target=wait, args=(owner,)) for owner in ("second", "third")}
        for owner, waiter in waiters.items():  # one after the other: the line keeps their order
            waiter.start()
            while line.position(owner) is None:
                time.sleep(0.001)
        assert [line.position(o) for o in ("first", "second", "third")] == [0, 1, 2] and line.waiting() == 2
        assert line.cancel("second") == 1
        waiters["second"].join(timeout=10)
        assert outcome["second"] == "Generation cancelled before it started." and line.position("third") == 1
    waiters["third"].join(timeout=10)
    assert outcome["third"] == "ran" and line.waiting() == 0
