"""The running app, started as a real subprocess and driven through gradio_client."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import pattern_image
from tests.running_app import start_app, stop_app

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """`python -m app` on the embedded model, in its own workspace; yields (client, workspace)."""
    workspace = tmp_path_factory.mktemp("workspace")
    try:
        process, client, _ = start_app(workspace)
    except RuntimeError as err:
        pytest.fail(str(err))
    yield client, workspace
    stop_app(process)


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    """Loose PNGs and a zip with a caption file, as a user would upload them."""
    folder = tmp_path_factory.mktemp("uploads")
    files = []
    for i in range(3):
        pattern_image(i).save(folder / f"loose{i}.png")
        files.append(folder / f"loose{i}.png")
    with zipfile.ZipFile(folder / "more.zip", "w") as archive:
        for i in range(3, 5):
            archive.writestr(f"more/z{i}.png", _png(pattern_image(i)))
        archive.writestr("more/z3.txt", "a blue star, zigzag style")
    return files, folder / "more.zip"


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _train(client, name, files, **settings):
    return client.predict(
        files=[handle_file(str(f)) for f in files], style_name=name, preset="Quick", steps=8, num_samples=1,
        api_name="/train_style", **settings,
    )


def test_upload_train_generate_blend_export_delete(app, uploads, tmp_path):
    client, workspace = app
    loose, archive = uploads

    # Upload files (one style) and a zip with a caption (another), train both.
    status, _, samples = _train(client, "zigzag", [*loose[:2], archive], learning_rate=5e-3)
    assert "finished" in status and len(samples) == 1
    status, _, _ = _train(client, "pastel", loose, seed=3, learning_rate=5e-3)
    assert "finished" in status
    listed = {style["name"]: style for style in client.predict(api_name="/list_styles")}
    assert set(listed) == {"zigzag", "pastel"} and listed["zigzag"]["steps"] == 8 and listed["zigzag"]["rank"] == 8

    # Generate with no style, each style, and both at different scales: all different, base reproducible.
    def generate(styles):
        gallery, info = client.predict(prompt="a red circle", seed=7, steps=6, styles=styles, api_name="/generate")
        return Image.open(gallery[0]["image"]), info

    base_image, _ = generate({})
    zero_image, _ = generate({"zigzag": 0, "pastel": 0})
    blended, info = generate({"zigzag": 0.8, "pastel": -0.5})
    assert np.array_equal(np.asarray(base_image), np.asarray(zero_image))
    assert not np.array_equal(np.asarray(base_image), np.asarray(blended))
    assert "zigzag +0.80" in info and "pastel -0.50" in info
    recipe = json.loads(blended.text["style_studio"])
    assert recipe["styles"] == {"zigzag": 0.8, "pastel": -0.5} and recipe["seed"] == 7

    # Export: a kohya-layout safetensors (the default download) that stock diffusers loads...
    exported = client.predict(name="zigzag", api_name="/export_style")
    assert Path(exported).name == "zigzag.safetensors"  # A1111 calls a LoRA by its file name
    import torch
    from diffusers import StableDiffusionPipeline

    from embedded import MODEL_DIR

    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, dtype=torch.float32)
    plain = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(1), output_type="np").images
    pipe.load_lora_weights(exported)
    styled = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(1), output_type="np").images
    assert pipe.get_list_adapters()["unet"] and np.abs(styled - plain).max() > 1e-3
    # ...and that imports back as a style which draws what the original draws.
    message = client.predict(file=handle_file(exported), name="zigzag-back", api_name="/import_style")
    assert "Imported **zigzag-back**" in message
    again, _ = generate({"zigzag-back": 0.8, "pastel": -0.5})
    assert np.abs(np.asarray(again, dtype=int) - np.asarray(blended, dtype=int)).max() <= 1
    with pytest.raises(Exception, match="pickle"):  # a pickle is refused with the reason, never opened
        client.predict(file=handle_file(str(_pickle(tmp_path))), name="evil", api_name="/import_style")
    assert "zigzag-back" in [s["name"] for s in client.predict(api_name="/list_styles")]

    # Delete, and the style is gone from the list and from generation.
    assert "Deleted" in client.predict(name="pastel", api_name="/delete_style")
    assert [s["name"] for s in client.predict(api_name="/list_styles")] == ["zigzag", "zigzag-back"]
    with pytest.raises(Exception, match="Unknown style"):
        client.predict(prompt="x", styles={"pastel": 1}, api_name="/generate")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(style_name="../../etc"), "not allowed"),
        (dict(style_name="ok", rank=0), "rank = 0 is outside"),
        (dict(style_name="ok", junk="notes.png"), "notes.png: not an image"),  # content checked by us
        (dict(style_name="ok", junk="notes.html"), "Invalid file type"),  # refused by the upload's file types
    ],
)
def test_bad_training_input_is_refused_with_a_message_and_the_app_keeps_serving(app, uploads, tmp_path, kwargs, message):
    client, workspace = app
    files = list(uploads[0])
    junk_name = kwargs.pop("junk", None)
    if junk_name:
        junk = tmp_path / junk_name
        junk.write_text("<html>not a picture</html>")
        files = [junk]
    with pytest.raises(Exception, match=message):
        _train(client, files=files, name=kwargs.pop("style_name"), **kwargs)
    assert isinstance(client.predict(api_name="/list_styles"), list)
    assert not list((workspace / "styles").glob("*.tmp"))


def test_existing_style_is_not_overwritten(app, uploads):
    client, workspace = app
    _train(client, "keeper", uploads[0])
    before = (workspace / "styles" / "keeper.safetensors").read_bytes()
    with pytest.raises(Exception, match="already exists"):
        _train(client, "keeper", uploads[0], seed=5)
    assert (workspace / "styles" / "keeper.safetensors").read_bytes() == before


def test_bad_generation_input_is_refused(app):
    client, _ = app
    with pytest.raises(Exception, match="between -2.0 and 2.0"):
        client.predict(prompt="x", styles={"keeper": 5}, api_name="/generate")
    with pytest.raises(Exception, match="multiples of"):
        client.predict(prompt="x", width=65, api_name="/generate")
    with pytest.raises(Exception, match="Write a prompt"):
        client.predict(prompt="  ", api_name="/generate")


def test_example_style_trains_with_one_call_and_fills_the_form(app):
    client, workspace = app
    files, name, status, _, samples = client.predict(example="ink", preset="Quick", api_name="/train_example")
    assert name == "ink" and "finished" in status and samples
    assert len(files) == 48 and min(Path(f).name for f in files) == "ink_00.png"
    assert len(list((workspace / "examples" / "ink").iterdir())) == 48
    assert "ink" in [style["name"] for style in client.predict(api_name="/list_styles")]
    with pytest.raises(Exception, match="nope.*not in the list of choices"):
        client.predict(example="nope", api_name="/train_example")


def test_queue_cancel_keep_while_generation_keeps_working(app, uploads):
    """Two jobs queue behind each other; the app generates meanwhile; cancel keeps a checkpoint to keep as a style."""
    client, workspace = app
    loose, _ = uploads
    files = [handle_file(str(f)) for f in loose]
    long_job, _ = client.predict(files=files, style_name="slow", preset="Quick", steps=100_000, checkpoint_every=5,
                                 num_samples=0, api_name="/submit_training")
    queued, message = client.predict(files=files, style_name="waiting", preset="Quick", steps=4, num_samples=0,
                                     api_name="/submit_training")
    assert "position" in message
    deadline = time.monotonic() + 120
    while True:
        jobs = {job["job"]: job for job in client.predict(api_name="/list_jobs")}
        if jobs[long_job]["state"] == "running" and int(jobs[long_job]["step"].split("/")[0]) >= 6:
            break
        assert time.monotonic() < deadline, jobs
        time.sleep(0.5)
    assert jobs[queued]["state"] == "queued" and jobs[queued]["queue"] == 1
    started = time.monotonic()
    gallery, _ = client.predict(prompt="a red circle", steps=4, api_name="/generate")  # not blocked by training
    assert gallery and time.monotonic() - started < 60
    client.predict(job_id=long_job, api_name="/cancel_job")
    status, _, _ = client.predict(job_id=long_job, api_name="/follow_job")  # returns when the job has stopped
    assert "cancelled" in status and "can be kept" in status
    assert "slow-kept" in client.predict(job_id=long_job, style_name="slow-kept", api_name="/keep_job")
    status, _, _ = client.predict(job_id=queued, api_name="/follow_job")
    assert "finished" in status
    names = [style["name"] for style in client.predict(api_name="/list_styles")]
    assert "slow-kept" in names and "waiting" in names and "slow" not in names
    with pytest.raises(Exception, match="only queued or running jobs can be cancelled"):
        client.predict(job_id=queued, api_name="/cancel_job")


def test_presets_save_as_toml_and_load_back(app):
    client, workspace = app
    message, _ = client.predict(preset_name="crisp", preset="Best", rank=4, learning_rate=2e-4,
                                target_modules="to_q, to_v", api_name="/save_preset")
    assert "crisp" in message
    from trainer.config import make_config, read_settings

    values = read_settings(workspace / "presets" / "crisp.toml")  # the file the CLI's --config reads
    assert make_config(values.pop("preset"), **values).target_modules == ["to_q", "to_v"]
    loaded = client.predict(preset_name="crisp", api_name="/load_preset")
    assert loaded[0] == "Best" and "4" in loaded and "0.0002" in loaded and "to_q, to_v" in loaded
    with pytest.raises(Exception, match="not allowed"):
        client.predict(preset_name="../evil", api_name="/save_preset")
    with pytest.raises(Exception, match="No saved preset named 'nope'"):
        client.predict(preset_name="nope", api_name="/load_preset")


def _pickle(folder: Path) -> Path:
    """A .ckpt whose unpickling would run code: it must be refused unread."""
    path = folder / "evil.ckpt"
    path.write_bytes(b"cos\nsystem\n(S'touch /tmp/style-studio-pwned'\ntR.")
    return path
