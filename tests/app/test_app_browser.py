"""The app as users get it: ``python app.py --tiny DIR`` on a free localhost port, driven through gradio_client
and in headless Chromium. The server and the browser are always stopped at the end."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from app_inputs import HUGE_LIMIT
from headless_chromium import Chromium, stop_process_group
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "app.png"  # README's picture; written when FACEID_UPDATE_SCREENSHOT=1
STARTUP_TIMEOUT = 300  # imports alone take minutes on a loaded 2-core machine; returns as soon as it serves


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_dir, tiny_run, tmp_path_factory):
    work = tmp_path_factory.mktemp("app_server")
    port = free_port()
    log = work / "app.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(work / "gradio"))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    # Tiny models: one thread is fastest, and on a busy 2-core machine OpenMP threads can be 100x slower.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "app.py"), "--tiny", str(tiny_dir), "--run_dir", str(tiny_run)]
    cmd += ["--server_port", str(port), "--output_dir", str(work / "out")]
    cmd += ["--min_side", "128", "--max_side", "128", "--max_pixels", str(HUGE_LIMIT)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd, cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(
                    f"app.py did not serve {url} within {STARTUP_TIMEOUT}s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.3)
        yield {"url": url, "proc": proc, "log": log, "work": work}
    finally:
        stop_process_group(proc)
    assert proc.poll() is not None


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server["url"], verbose=False)


def _generate(client, files, **kw):
    from gradio_client import handle_file

    args = dict(face_files=[handle_file(str(f)) for f in files], face_info=None, pose=None, prompt="a knight")
    args.update(steps=3, seed=11, num_images=1)
    args.update(kw)
    return client.predict(**args, api_name="/generate")


def test_server_listens_on_localhost_only(server):
    assert "Running on local URL:  http://127.0.0.1:" in server["log"].read_text()


def test_one_generation_through_gradio_client(client, photos):
    gallery, kps, settings, status = _generate(client, [photos["a"], photos["b"]], style="Snow", num_images=2)
    # 128 x 128 at most, multiples of 64, aspect of a.png (256 x 224): 128 x 64 (fit_size).
    assert status == "**Done.** 2 image(s), 128x64, seed 11, {} s.".format(settings["seconds"]), status
    assert len(gallery) == 2
    images = [Image.open(item["image"]) for item in gallery]
    assert all(im.size == (128, 64) for im in images)
    assert np.asarray(images[0]).std() > 0 and not np.array_equal(
        np.asarray(images[0]), np.asarray(images[1])
    )
    assert Image.open(kps).size == (128, 64)
    assert settings["seed"] == 11 and settings["steps"] == 3 and settings["style"] == "Snow"
    assert settings["styled_prompt"].startswith("a knight, in a snowy winter forest")
    assert settings["references"] == ["a.png", "b.png"] and [r["seed"] for r in settings["images"]] == [
        11,
        12,
    ]
    assert settings["loads"]["base_loads"] == 1
    saved = Path(settings["output_dir"]) / settings["images"][0]["file"]
    np.testing.assert_array_equal(
        np.asarray(Image.open(saved).convert("RGB")), np.asarray(images[0].convert("RGB"))
    )


def test_bad_uploads_show_a_message_and_the_app_keeps_serving(client, photos, tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(os.urandom(31 * 1024 * 1024))  # over the 30 MB upload limit
    cases = {
        "no_face": "blank.png: no face found",
        "not_image": "notes.png: not an image or unsupported format",
        "huge": "huge.png: 2600x1600 is over the 4000000-pixel limit",
    }
    for key, message in cases.items():
        gallery, kps, settings, status = _generate(client, [photos[key]])
        assert status.startswith("**Cannot generate:**") and message in status, status
        assert gallery == [] and settings is None
    with pytest.raises(Exception, match="(?i)file size|too large|exceed"):
        _generate(client, [big])
    gallery, _, settings, status = _generate(client, [photos["a"]], seed=5)
    assert status.startswith("**Done.**") and len(gallery) == 1 and settings["seed"] == 5


def test_target_photo_and_a_second_person_through_gradio_client(client, photos):
    from gradio_client import handle_file

    gallery, _, settings, status = _generate(client, [photos["a"]], target=handle_file(str(photos["pose"])))
    assert status.startswith("**Done.** 1 image(s), 320x192"), status
    assert settings["mode"] == "inpaint" and settings["target"] == "pose.png"
    target = np.asarray(Image.open(photos["pose"]).convert("RGB"))
    out = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))
    np.testing.assert_array_equal(out[:, :150], target[:, :150])  # left of the face: the target's pixels
    for upload, message in (
        (dict(target=photos["no_face"]), "target photo blank.png: no face found"),
        (dict(person2=photos["not_image"]), "person 2 photo notes.png: not an image"),
    ):
        gallery, _, settings, status = _generate(
            client, [photos["a"]], **{k: handle_file(str(v)) for k, v in upload.items()}
        )
        assert status.startswith("**Cannot generate:**") and message in status, status
        assert gallery == [] and settings is None
    gallery, _, settings, status = _generate(
        client,
        [photos["a"]],
        pose=handle_file(str(photos["two"])),
        person2=handle_file(str(photos["b"])),
        face_detail=True,
    )
    assert status.startswith("**Done.**") and len(gallery) == 1, status
    assert settings["mode"] == "people" and [p["references"] for p in settings["people"]] == [
        "a.png",
        "b.png",
    ]


def test_checkpoint_comparison_through_gradio_client(client, photos):
    from gradio_client import handle_file

    choices = client.predict(api_name="/rescan")
    gallery, _, settings, status = client.predict(
        face_files=[handle_file(str(photos["a"]))],
        face_info=None,
        pose=handle_file(str(photos["pose"])),
        weights=["base", "checkpoint-2", "final"],
        steps=2,
        seed=3,
        api_name="/compare",
    )
    assert status.startswith("**Done.** 3 image(s)"), status
    assert [g["caption"] for g in gallery] == ["base", "checkpoint-2", "final"]
    arrays = [np.asarray(Image.open(g["image"]).convert("RGB")) for g in gallery]
    assert arrays[0].shape == (64, 128, 3) and not np.array_equal(arrays[0], arrays[1])
    assert settings["loads"]["base_loads"] == 1 and settings["loads"]["swaps"] >= 2
    assert settings["pose_from"] == "pose.png" and {r["seed"] for r in settings["images"]} == {3}
    assert "checkpoint-1" in str(choices) and "checkpoint-9" not in str(choices)


def _wait_uploaded(browser, name: str) -> None:
    # The file's download link appears once the upload is on the server (clicking earlier would race it).
    browser.wait_for(f"!!document.querySelector('#face-files a[href$=\"/{name}\"]')", 60, f"{name} uploaded")


def test_page_in_headless_chromium(server, photos, tmp_path):
    browser = Chromium(tmp_path / "profile", width=1280, height=1000)
    try:
        browser.goto(server["url"])
        browser.wait_for("!!document.querySelector('#generate-btn')", 60, "the form")
        text = browser.eval("document.body.innerText")
        labels = (
            "Photos of the person",
            "face-info file",
            "Pose photo",
            "Prompt",
            "Negative prompt",
            "Style",
        )
        labels += ("Steps", "Guidance", "IdentityNet strength", "Adapter strength", "Seed", "Scheduler")
        for label in labels + (
            "Fast mode (LCM)",
            "Enhance non-face region",
            "Target photo, several people",
            "Target photo strength",
            "Face detail pass",
            "LoRA (optional)",
            "Generate",
            "Compare checkpoints",
        ):
            assert label in text, label

        # A photo without a face: a message in the page, no picture.
        browser.set_files("#face-files input[type=file]", [photos["no_face"]])
        _wait_uploaded(browser, "blank.png")
        browser.eval("document.querySelector('#generate-btn').click()")
        browser.wait_for(
            "document.querySelector('#status').innerText.includes('no face found')", 60, "the no-face message"
        )
        assert "Cannot generate: blank.png: no face found" in browser.eval(
            "document.querySelector('#status').innerText"
        )
        assert browser.eval("document.querySelectorAll('#gallery img').length") == 0

        # Add a real one (a multiple-file input adds to the list): a picture appears, the skipped photo is named.
        browser.set_files("#face-files input[type=file]", [photos["a"]])
        _wait_uploaded(browser, "a.png")
        browser.eval("document.querySelector('#generate-btn').click()")
        browser.wait_for(
            "(() => { const i = document.querySelector('#gallery img');"
            " return !!i && i.complete && i.naturalWidth === 128 && i.naturalHeight === 64; })()",
            60,
            "a generated image",
        )
        status = browser.eval("document.querySelector('#status').innerText")
        assert "Done. 1 image(s), 128x64" in status and "skipped blank.png: no face found" in status, status
        shot = browser.screenshot(tmp_path / "app.png")
    finally:
        browser.close()
    assert browser.proc.poll() is not None
    img = Image.open(shot)
    assert img.size == (1280, 1000) and np.asarray(img.convert("L")).std() > 10
    if os.environ.get("FACEID_UPDATE_SCREENSHOT"):
        shutil.copyfile(shot, SCREENSHOT)
