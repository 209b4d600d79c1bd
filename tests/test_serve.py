"""`ldmkit serve`: the A1111 API through an HTTP client (FastAPI's TestClient, and the third-party
`webuiapi` client against a live uvicorn server), load and disconnects, and the page in a real headless
Chromium. Models are tiny and untrained: the tests pin the server's behaviour, not image quality."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from ldmkit.autoencoder import AutoencoderConfig  # noqa: E402
from ldmkit.checkpoint import save_checkpoint  # noqa: E402
from ldmkit.cli import main  # noqa: E402
from ldmkit.conditioning import ConditionerConfig  # noqa: E402
from ldmkit.control import ControlNet  # noqa: E402
from ldmkit.pipeline import ConcatConfig, LatentDiffusion, LatentDiffusionConfig  # noqa: E402
from ldmkit.serve import create_app  # noqa: E402
from ldmkit.serve.app import check_host  # noqa: E402
from ldmkit.serve.worker import Job  # noqa: E402
from ldmkit.unet import UNetConfig  # noqa: E402

SIZE = 16


def tiny_ldm(inpaint: bool = False) -> LatentDiffusion:
    """An untrained text-conditioned model (the bundled MiniLM encoder), 16x16, f = 2."""
    torch.manual_seed(0)
    ae = AutoencoderConfig(base_channels=8, channel_mult=(1, 2), norm_groups=4)
    concat = ConcatConfig(kind="inpaint", drop=0.0) if inpaint else None
    unet = UNetConfig(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), mid_attention=False,
                      num_heads=2, norm_groups=4, context_dim=384,
                      concat_channels=concat.channels(ae.latent_channels) if concat else 0)
    cfg = LatentDiffusionConfig(autoencoder=ae, unet=unet, conditioner=ConditionerConfig(text_encoder="minilm"),
                                image_size=SIZE, concat=concat)
    return LatentDiffusion.from_config(cfg)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-models")
    text, inpaint, cn = root / "text", root / "inpaint", root / "cn"
    ldm = tiny_ldm()
    save_checkpoint(text, 1, "latent_diffusion", ldm, ldm.config)
    ldm_i = tiny_ldm(inpaint=True)
    save_checkpoint(inpaint, 1, "latent_diffusion", ldm_i, ldm_i.config)
    net = ControlNet.from_unet(ldm.unet, hint_channels=1, latent_factor=ldm.config.autoencoder.downsample_factor)
    save_checkpoint(cn, 1, "controlnet", net, net.config, meta={"base": str(text)})
    return {"text": str(text), "inpaint": str(inpaint), "cn": str(cn)}


@pytest.fixture(scope="module")
def client(models):
    app = create_app([models["text"], models["inpaint"], models["cn"]], queue_size=2, preview_every=1)
    with TestClient(app) as c:
        yield c


def b64_png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def switch(c, title: str) -> None:
    r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": title})
    assert r.status_code == 200, r.text
    assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == title


def square_image() -> Image.Image:
    """A 16x16 picture: a red square on grey."""
    a = np.full((SIZE, SIZE, 3), 128, np.uint8)
    a[2:8, 2:8] = (230, 40, 40)
    return Image.fromarray(a)


TXT = {"prompt": "a red circle in the top left", "negative_prompt": "blue", "steps": 3, "cfg_scale": 2,
       "sampler_name": "DPM++ 2M", "width": SIZE, "height": SIZE}


# --- the API -----------------------------------------------------------------------------------------
def test_txt2img_same_seed_same_images_with_parameters_chunk(client):
    switch(client, "text")
    a = client.post("/sdapi/v1/txt2img", json={**TXT, "seed": 7, "batch_size": 2}).json()
    b = client.post("/sdapi/v1/txt2img", json={**TXT, "seed": 7, "batch_size": 2, "unknown_field": [1, 2]}).json()
    c = client.post("/sdapi/v1/txt2img", json={**TXT, "seed": 8, "batch_size": 2}).json()
    assert len(a["images"]) == 2 and a["images"] == b["images"] and a["images"] != c["images"]
    img = decode(a["images"][1])
    assert img.size == (SIZE, SIZE)
    params = img.info["parameters"]
    assert params.startswith("a red circle in the top left\nNegative prompt: blue\nSteps: 3, Sampler: DPM++ 2M, CFG scale: 2, Seed: 7")
    assert "Size: 16x16" in params and "Model hash: " in params and "Batch pos: 1" in params
    info = json.loads(a["info"])  # A1111: info is a JSON string
    assert info["seed"] == 7 and info["all_seeds"] == [7, 7] and info["infotexts"][1] == params
    assert info["sd_model_name"] == "text" and info["not_honoured"] == [] and a["parameters"]["steps"] == 3
    # seed -1: a random seed, reported
    r = json.loads(client.post("/sdapi/v1/txt2img", json={**TXT, "seed": -1}).json()["info"])
    assert r["seed"] >= 0 and f"Seed: {r['seed']}," in r["infotexts"][0]


def test_fields_ldmkit_cannot_honour_are_reported_in_info(client):
    switch(client, "text")
    # (enable_hr was here until issue 28: the hires fix is honoured now, tests below)
    r = client.post("/sdapi/v1/txt2img", json={**TXT, "restore_faces": True, "subseed_strength": 0.5, "tiling": False,
                                                "alwayson_scripts": {"ADetailer": {"args": [True]}}})
    info = json.loads(r.json()["info"])
    assert r.status_code == 200
    assert {n.split(":")[0] for n in info["not_honoured"]} == {"restore_faces", "subseed_strength", "alwayson_scripts.ADetailer"}


@pytest.mark.parametrize("body, field", [
    ({"steps": 0}, "steps"), ({"steps": 1000}, "steps"), ({"cfg_scale": 99}, "cfg_scale"), ({"batch_size": 64}, "batch_size"),
    ({"width": 64}, "width"), ({"height": 512}, "height"), ({"sampler_name": "Heun"}, "sampler_name"),
    ({"sampler_index": "nope", "sampler_name": None}, "sampler_index"), ({"scheduler": "beta"}, "scheduler"),
    ({"batch_size": 16, "n_iter": 16}, "n_iter"), ({"seed": "x"}, "seed"), ({"seed": 2**64}, "seed"),
])
def test_txt2img_refuses_bad_fields_before_queuing_naming_them(client, body, field):
    switch(client, "text")
    before = client.app.state.worker.completed
    r = client.post("/sdapi/v1/txt2img", json={**TXT, **body})
    assert r.status_code == 422, r.text
    assert any(d["loc"][:2] == ["body", field] for d in r.json()["detail"]), r.json()
    assert client.app.state.worker.completed == before  # nothing ran


def test_img2img_refuses_undecodable_oversized_and_missing_images(client):
    switch(client, "text")
    huge = Image.new("L", (4200, 4200))  # 17.6 M pixels: more than the server reads
    cases = [({"init_images": ["not base64 at all!"]}, ["body", "init_images", "0"]),
             ({"init_images": [base64.b64encode(b"GIF89a-not-really").decode()]}, ["body", "init_images", "0"]),
             ({"init_images": [b64_png(huge)]}, ["body", "init_images", "0"]),
             ({"init_images": []}, ["body", "init_images"]),
             ({"init_images": [b64_png(square_image())], "mask": b64_png(square_image())}, ["body", "mask"]),
             ({"init_images": [b64_png(square_image())], "denoising_strength": 1.5}, ["body", "denoising_strength"])]
    for body, loc in cases:
        r = client.post("/sdapi/v1/img2img", json={**TXT, **body})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc, (loc, r.text)


def test_img2img_and_inpainting_keep_the_pixels_outside_the_mask(client):
    switch(client, "text")
    init = square_image()
    r = client.post("/sdapi/v1/img2img", json={**TXT, "init_images": ["data:image/png;base64," + b64_png(init)],
                                               "denoising_strength": 0.5, "seed": 1})
    assert r.status_code == 200, r.text
    assert "Denoising strength: 0.5" in decode(r.json()["images"][0]).info["parameters"]

    switch(client, "inpaint")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:, 8:] = 255  # repaint the bottom-right quarter
    body = {**TXT, "init_images": [b64_png(init)], "mask": b64_png(Image.fromarray(mask)), "denoising_strength": 1.0,
            "mask_blur": 4, "seed": 2}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    out = np.asarray(decode(r.json()["images"][0]).convert("RGB"))
    keep = mask == 0
    assert np.abs(out[keep].astype(int) - np.asarray(init)[keep]).max() <= 1  # pasted back exactly (±rounding)
    info = json.loads(r.json()["info"])
    assert info["is_using_inpainting_conditioning"] and any(n.startswith("mask_blur") for n in info["not_honoured"])
    # strokes on a transparent layer (RGBA) are read by their alpha, as A1111 reads them; inverted on request
    strokes = np.zeros((SIZE, SIZE, 4), np.uint8)
    strokes[8:, 8:] = (255, 0, 0, 255)
    body = {**body, "mask": b64_png(Image.fromarray(strokes, "RGBA"))}
    assert client.post("/sdapi/v1/img2img", json=body).json()["images"] == r.json()["images"]
    inv = client.post("/sdapi/v1/img2img", json={**body, "mask": b64_png(Image.fromarray(255 - mask)),
                                                 "inpainting_mask_invert": 1}).json()
    assert inv["images"] == r.json()["images"]
    # an inpainting model needs its image and mask
    assert client.post("/sdapi/v1/txt2img", json=TXT).json()["detail"][0]["loc"] == ["body", "init_images"]
    assert client.post("/sdapi/v1/img2img", json={**TXT, "init_images": [b64_png(init)]}).json()["detail"][0]["loc"] == ["body", "mask"]


def test_controlnet_map_through_alwayson_scripts(client):
    switch(client, "cn")
    r = client.post("/sdapi/v1/txt2img", json=TXT)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "alwayson_scripts", "controlnet"]
    edge = Image.new("L", (32, 32))
    unit = {"image": b64_png(edge), "weight": 0.8, "module": "none", "model": "cn"}
    r = client.post("/sdapi/v1/txt2img", json={**TXT, "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
    assert r.status_code == 200, r.text
    switch(client, "text")
    r = client.post("/sdapi/v1/txt2img", json={**TXT, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:3] == ["body", "alwayson_scripts", "controlnet"]


def test_models_options_and_samplers(client, models):
    titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert titles == ["text", "inpaint", "cn"]
    switch(client, "inpaint")
    m = client.get("/sdapi/v1/sd-models").json()[1]
    assert len(m["hash"]) == 10 and m["sha256"].startswith(m["hash"])
    assert client.get("/ldmkit/v1/model").json()["inpainting"] is True
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "sd_model_checkpoint"]
    # A1111 titles read "name [hash]": that names the model too
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": f"text [{client.get('/sdapi/v1/sd-models').json()[0]['hash']}]"})
    assert r.status_code == 200 and client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "text"
    names = {s["name"] for s in client.get("/sdapi/v1/samplers").json()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC", "DDPM"} <= names
    # "DPM++ 2M Karras" (older A1111 names carry the schedule) works
    r = client.post("/sdapi/v1/txt2img", json={**TXT, "sampler_name": "DPM++ 2M Karras"})
    assert "Schedule type: Karras" in json.loads(r.json()["info"])["infotexts"][0]
    # A1111's even-in-timestep schedules run on the model's own spacing, and say so
    r = client.post("/sdapi/v1/txt2img", json={**TXT, "sampler_name": "Euler", "scheduler": "SGM Uniform"})
    assert r.status_code == 200 and json.loads(r.json()["info"])["not_honoured"][0].startswith("scheduler SGM Uniform")
    assert client.get("/docs").status_code == 200 and "/sdapi/v1/txt2img" in client.get("/openapi.json").text


def test_queue_full_gives_503_with_retry_after(models):
    app = create_app([models["text"]], queue_size=1)
    release = threading.Event()
    with TestClient(app) as c:
        worker = app.state.worker
        running = Job(lambda w: release.wait(30))
        worker.submit(running)
        while not running.future.running():
            time.sleep(0.01)
        waiting = worker.submit(Job(lambda w: release.wait(30)))  # the one free place
        r = c.post("/sdapi/v1/txt2img", json=TXT)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert c.get("/sdapi/v1/progress").json()["state"]["job_count"] == 2  # /progress answers meanwhile
        release.set()
        waiting.result(10)
        assert c.post("/sdapi/v1/txt2img", json=TXT).status_code == 200


def test_progress_preview_and_interrupt_at_the_next_step(client):
    switch(client, "text")
    body = {**TXT, "steps": 150, "batch_size": 4, "n_iter": 16, "sampler_name": "Euler"}
    with ThreadPoolExecutor(1) as pool:
        t0 = time.perf_counter()
        fut = pool.submit(client.post, "/sdapi/v1/txt2img", json=body)
        p = {}
        for _ in range(600):
            p = client.get("/sdapi/v1/progress").json()
            if p["state"]["sampling_step"] >= 2 and p["current_image"]:
                break
            time.sleep(0.02)
        assert 0 < p["progress"] < 1 and p["eta_relative"] > 0 and p["state"]["sampling_steps"] == 150 * 16
        assert decode(p["current_image"]).size[0] >= SIZE  # the current estimate, decoded
        assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
        assert client.post("/sdapi/v1/interrupt").json() == {}
        r = fut.result(60)
        took = time.perf_counter() - t0
    info = json.loads(r.json()["info"])
    assert r.status_code == 200 and info["interrupted"] and 1 <= len(r.json()["images"]) < 64
    assert took < 30
    # the next request runs normally
    assert json.loads(client.post("/sdapi/v1/txt2img", json=TXT).json()["info"])["interrupted"] is False


def test_basic_auth_guards_page_api_and_docs(models):
    app = create_app([models["text"]], auth="ann:s3cret,bob:pw")
    with TestClient(app) as c:
        for path in ("/", "/sdapi/v1/sd-models", "/docs"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
        assert c.get("/sdapi/v1/sd-models", auth=("ann", "wrong")).status_code == 401
        assert c.get("/sdapi/v1/sd-models", auth=("ann", "s3cret")).status_code == 200
        assert c.post("/sdapi/v1/txt2img", json=TXT, auth=("bob", "pw")).status_code == 200


def test_non_loopback_host_needs_auth_or_an_explicit_flag(models, capsys):
    rc = main(["serve", "--checkpoint", models["text"], "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--api-auth" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    check_host("0.0.0.0", "u:p", False)
    check_host("0.0.0.0", None, True)
    check_host("::1", None, False)
    check_host("localhost", None, False)
    assert main(["serve", "--checkpoint", models["text"], "--api-auth", "nocolon"]) == 2
    assert "user:password" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(Path(models["text"]) / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    with socket.socket() as taken:  # a port in use: one line, before any model is loaded
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--checkpoint", models["text"], "--port", str(taken.getsockname()[1])]) == 2
        assert "pick another --port" in capsys.readouterr().err


# --- issue 28: sizes, hires fix, the checkpoint's own sampling defaults ------------------------------
def resolved(client, body: dict, images: bool = False):
    """The request as the server resolves it against the current model, before anything is queued."""
    from ldmkit.serve.schema import Img2ImgRequest, Txt2ImgRequest, resolve

    req = (Img2ImgRequest if images else Txt2ImgRequest)(**body)
    return resolve(req, client.app.state.store, images)


def test_any_multiple_of_the_granularity_is_a_size_others_are_refused_naming_the_nearest(client):
    switch(client, "text")
    # the tiny model: f = 2, U-Net levels 2 → granularity 2 · 2 = 4 px; sides up to 3 × 16 = 48 px
    caps = client.get("/ldmkit/v1/model").json()  # what the page builds its width and height choices from
    assert caps["granularity"] == 4 and caps["max_side"] == 48 == 3 * SIZE
    assert (resolved(client, {**TXT, "width": caps["max_side"]}).width) == 48  # the page's largest choice is valid
    gen = resolved(client, {**TXT, "width": 24, "height": 12})
    assert (gen.width, gen.height) == (24, 12) and gen.parameters["width"] == 24 and gen.parameters["height"] == 12
    gen = resolved(client, {"prompt": "x"})
    assert (gen.width, gen.height) == (SIZE, SIZE)  # omitted: the model's size
    for body, field, words in [({"width": 18}, "width", "nearest: 16 or 20"), ({"height": 50}, "height", "at most 48"),
                               ({"width": 8, "height": 2 * SIZE + 2}, "height", "nearest: 32 or 36")]:
        r = client.post("/sdapi/v1/txt2img", json={**TXT, **body})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field] and words in r.json()["detail"][0]["msg"], r.text


def test_img2img_images_and_control_maps_are_fitted_with_a1111_resize_modes(client):
    from ldmkit.serve.schema import to_tensor

    a = np.zeros((16, 32, 3), np.uint8)  # 32 wide, 16 high: left half black, right half white, red top row
    a[:, 16:] = 255
    a[0] = (255, 0, 0)
    img = Image.fromarray(a)
    stretch = to_tensor(img, (16, 16), 3, False, 0)
    crop = to_tensor(img, (16, 16), 3, False, 1)
    fill = to_tensor(img, (16, 16), 3, False, 2)
    assert stretch.shape == crop.shape == fill.shape == (1, 3, 16, 16)
    # crop and resize: the centre 16×16 of the 32×16 picture (cols 8..24), no resampling needed at scale 1
    assert torch.equal(crop, torch.from_numpy(a[:, 8:24].astype(np.float32) / 255).permute(2, 0, 1)[None])
    # resize and fill: the whole picture at 16×8, the rows above and below copies of its edge rows
    inner = to_tensor(img, (16, 8), 3, False, 0)
    assert torch.equal(fill[:, :, 4:12], inner) and torch.equal(fill[:, :, :4], inner[:, :, :1].expand(-1, -1, 4, -1))
    assert torch.equal(fill[:, :, 12:], inner[:, :, -1:].expand(-1, -1, 4, -1))
    gen = resolved(client, {**TXT, "width": 24, "height": 16, "init_images": [b64_png(img)], "resize_mode": 1}, images=True)
    assert gen.init_image.shape == (1, 3, 16, 24) and gen.resize_mode == 1
    gen = resolved(client, {**TXT, "init_images": [b64_png(img)], "resize_mode": 3}, images=True)
    assert gen.resize_mode == 0 and gen.not_honoured[0].startswith("resize_mode 3")


def test_hires_fix_fields_become_the_hires_pass_and_its_target_is_checked(client):
    from ldmkit.generation.request import HiresPass

    switch(client, "text")
    body = {**TXT, "width": 16, "height": 12, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent (nearest)",
            "hr_second_pass_steps": 2, "denoising_strength": 0.5}
    gen = resolved(client, body)
    assert gen.hires == HiresPass(scale=1.5, upscaler="latent-nearest", second_pass_steps=2, denoising_strength=0.5)
    assert gen.hires_size == (24, 16)  # int(12 · 1.5) = 18, rounded down to the granularity 4
    assert gen.steps_per_batch == 3 + 2  # A1111 runs hr_second_pass_steps exactly (its schedule stretched)
    assert resolved(client, {**TXT, "enable_hr": True}).hires == HiresPass(scale=2.0, upscaler="latent", denoising_strength=0.7)
    assert resolved(client, {**TXT, "enable_hr": False, "hr_scale": 8}).hires is None
    gen = resolved(client, {**TXT, "enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+", "hr_resize_x": 40})
    assert gen.hires.upscaler == "bicubic" and gen.hires_size == (40, 40)
    assert gen.not_honoured == ["hr_upscaler R-ESRGAN 4x+: upscaled bicubic in pixels (ldmkit has no R-ESRGAN 4x+)"]
    assert resolved(client, {**TXT, "enable_hr": True, "hr_upscaler": "Lanczos", "hr_resize_y": 20}).hires_size == (20, 20)
    for extra, field in [({"hr_scale": 4}, "hr_scale"), ({"hr_resize_x": 64}, "hr_resize_x"), ({"hr_scale": 9}, "hr_scale"),
                         ({"hr_second_pass_steps": 151}, "hr_second_pass_steps")]:
        before = client.app.state.worker.completed
        r = client.post("/sdapi/v1/txt2img", json={**TXT, "enable_hr": True, **extra})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], r.text
        assert client.app.state.worker.completed == before
    gen = resolved(client, {**TXT, "init_images": [b64_png(square_image())], "enable_hr": True}, images=True)
    assert gen.hires is None and gen.not_honoured[0].startswith("enable_hr: hires fix is a txt2img option")


def test_sdxl_micro_conditioning_fields_reach_the_request_and_other_models_refuse_them(client):
    """diffusers' names for SDXL's size/crop values (A1111's API has none) become the GenerationRequest's fields;
    a model without micro-conditioning refuses them with 422 and the reason, before generating anything."""
    from ldmkit.serve.generate import request_of

    switch(client, "text")
    gen = resolved(client, {**TXT, "original_size": [32, 48], "negative_crops_coords_top_left": [0, 8]})
    assert gen.micro == {"original_size": (32, 48), "negative_crops_coords_top_left": (0, 8)}
    req = request_of(gen, client.app.state.store.get(gen.entry))
    assert req.original_size == (32, 48) and req.negative_crops_coords_top_left == (0, 8) and req.target_size is None
    r = client.post("/sdapi/v1/txt2img", json={**TXT, "negative_original_size": [8, 8]})
    assert r.status_code == 422 and "no SDXL micro-conditioning" in r.json()["detail"][0]["msg"], r.text


@pytest.fixture(scope="module")
def student(models, tmp_path_factory):
    """A checkpoint that asks to be sampled its own way (meta.sampling, as `ldmkit distill` writes it)."""
    folder = tmp_path_factory.mktemp("serve-student") / "student"
    ldm = tiny_ldm()
    save_checkpoint(folder, 1, "latent_diffusion", ldm, ldm.config,
                    meta={"sampling": {"sampler": "lcm", "steps": 4, "guidance": 1.0, "grid_steps": 50}})
    return str(folder)


def test_the_checkpoint_sampling_defaults_fill_what_the_request_leaves_out(student, models):
    """Issue 28, defect 5: a distilled student got CFG 7 and 50 steps of another sampler on top of its
    folded-in guidance; with no sampler named and none in the checkpoint, A1111's API uses Euler."""
    app = create_app([student, models["text"]], queue_size=2)
    with TestClient(app) as c:
        info = json.loads(c.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 1}).json()["info"])
        assert (info["sampler_name"], info["steps"], info["cfg_scale"]) == ("LCM", 4, 1.0)
        assert "Steps: 4, Sampler: LCM, CFG scale: 1," in info["infotexts"][0]
        asked = {"prompt": "a red circle", "seed": 1, "steps": 3, "cfg_scale": 2.5, "sampler_name": "DDIM"}
        info = json.loads(c.post("/sdapi/v1/txt2img", json=asked).json()["info"])
        assert (info["sampler_name"], info["steps"], info["cfg_scale"]) == ("DDIM", 3, 2.5)  # what the client says wins
        switch(c, "text")  # no meta.sampling: A1111's API defaults (sampler_index "Euler", cfg 7)
        info = json.loads(c.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 1, "steps": 2}).json()["info"])
        assert (info["sampler_name"], info["steps"], info["cfg_scale"]) == ("Euler", 2, 7.0)


def test_lora_and_embedding_routes(models, tmp_path, monkeypatch, capsys):
    """GET /sdapi/v1/loras lists --lora-dir as A1111 does, refresh-loras rescans it; without the folders both
    lists are empty; the embeddings library (another module) is listed and attached to each loaded model."""
    import types

    from ldmkit.interop.lora import Adapter, save_lora

    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    ldm = tiny_ldm()
    q = ldm.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q").weight
    adapter = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q":
               Adapter(torch.ones(2, q.shape[1]), torch.ones(q.shape[0], 2), 2.0)}
    save_lora(adapter, lora_dir / "ink.safetensors")
    attached = []

    class Embeddings:  # the interface of ldmkit.conditioning.embeddings.EmbeddingLibrary that the server uses
        def __init__(self, folder):
            self.folder = folder

        def a1111_listing(self):
            return {"loaded": {"cat-toy": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                           "shape": 384, "vectors": 2}}, "skipped": {}}

    fake = types.ModuleType("ldmkit.conditioning.embeddings")
    fake.EmbeddingLibrary, fake.attach_embeddings = Embeddings, lambda conditioner, lib: attached.append((conditioner, lib))
    monkeypatch.setitem(sys.modules, "ldmkit.conditioning.embeddings", fake)
    app = create_app([models["text"]], lora_dir=str(lora_dir), embeddings_dir=str(tmp_path))
    with TestClient(app) as c:
        store = app.state.store
        assert store.networks.names() == ["ink"]  # serve/generate.py reads store.networks
        listed = c.get("/sdapi/v1/loras").json()
        assert [(e["name"], e["alias"]) for e in listed] == [("ink", "ink")] and listed[0]["metadata"]["format"] == "diffusers"
        save_lora(adapter, lora_dir / "more.safetensors")
        assert len(c.get("/sdapi/v1/loras").json()) == 1  # until refreshed, as A1111
        assert c.post("/sdapi/v1/refresh-loras").status_code == 200
        assert [e["name"] for e in c.get("/sdapi/v1/loras").json()] == ["ink", "more"]
        assert c.get("/sdapi/v1/embeddings").json()["loaded"]["cat-toy"]["vectors"] == 2
        # <lora:name:w> tags are checked before the request is queued: the name, the weight; 422 naming the prompt
        before = app.state.worker.completed
        for prompt, words in [("a cat <lora:nope:0.5>", f"<lora:nope:0.5>: no LoRA named 'nope' in {lora_dir} (have: ink, more)"),
                              ("a cat <lora:ink:12>", "<lora:ink:12>: the weight must be a number in [-10, 10]"),
                              ("a cat <lora:ink:strong>", "<lora:ink:strong>: the weight 'strong' is not a number")]:
            r = c.post("/sdapi/v1/txt2img", json={**TXT, "prompt": prompt})
            assert r.status_code == 422 and r.json()["detail"] == [{"loc": ["body", "prompt"], "msg": words, "type": "value_error"}]
        assert app.state.worker.completed == before
        assert resolved(c, {**TXT, "prompt": "a cat <lora:ink> <lora:more:-0.5> <hypernet:x:1>"}).prompt.startswith("a cat")
        assert attached == [(store.get(store.current).ldm.conditioner, store.embeddings)]
    app = create_app([models["text"]])
    with TestClient(app) as c:
        assert c.get("/sdapi/v1/loras").json() == [] and c.post("/sdapi/v1/refresh-loras").status_code == 200
        assert c.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
        r = c.post("/sdapi/v1/txt2img", json={**TXT, "prompt": "a cat <lora:ink:0.5>"})
        assert r.status_code == 422 and "no LoRA folder; start it with --lora-dir" in r.json()["detail"][0]["msg"]
    for flag in ("--lora-dir", "--embeddings-dir"):  # a missing folder: one line, before any model is loaded
        assert main(["serve", "--checkpoint", models["text"], flag, str(tmp_path / "nowhere")]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {tmp_path / 'nowhere'} is not a folder" in err and len(err.strip().splitlines()) == 1


# --- a live server -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(models):
    """A real uvicorn server on a free port, in a thread."""
    import uvicorn

    app = create_app([models["text"], models["inpaint"]], queue_size=4, preview_every=1)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(300):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    yield app, port
    server.should_exit = True
    thread.join(30)


def test_the_webuiapi_client_generates_through_the_server(live):
    webuiapi = pytest.importorskip("webuiapi")
    app, port = live
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=3)
    assert [m["title"] for m in api.get_sd_models()] == ["text", "inpaint"]
    api.util_set_model("text")
    r = api.txt2img(prompt="a red circle in the top left", negative_prompt="green", seed=5, cfg_scale=2,
                    width=SIZE, height=SIZE, batch_size=2)
    assert len(r.images) == 2 and r.image.size == (SIZE, SIZE)
    assert r.info["seed"] == 5 and r.image.info["parameters"].startswith("a red circle in the top left\nNegative prompt: green")
    again = api.txt2img(prompt="a red circle in the top left", negative_prompt="green", seed=5, cfg_scale=2,
                        width=SIZE, height=SIZE, batch_size=2)
    assert np.array_equal(np.asarray(again.image), np.asarray(r.image))
    api.util_set_model("inpaint")
    mask = Image.new("L", (SIZE, SIZE))
    mask.paste(255, (0, 0, 8, 8))
    r = api.img2img(images=[square_image()], mask_image=mask, prompt="a blue square", seed=3, width=SIZE, height=SIZE,
                    denoising_strength=1.0, cfg_scale=2)
    assert r.image.size == (SIZE, SIZE) and "Denoising strength: 1.0" in r.image.info["parameters"]
    assert "progress" in api.get_progress() and api.interrupt() == {}
    with pytest.raises(RuntimeError, match="422"):  # A1111's default 512 px is not this model's size: refused, named
        api.txt2img(prompt="x")
    api.util_set_model("text")


def _post(port: int, body: dict, timeout: float = 120) -> int:
    """The status of one txt2img request; a 200 must carry every image asked for."""
    import requests

    r = requests.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json=body, timeout=timeout)
    if r.status_code == 200:
        assert len(r.json()["images"]) == body.get("batch_size", 1) * body.get("n_iter", 1)
    elif r.status_code == 503:
        assert int(r.headers["Retry-After"]) >= 1
    return r.status_code


def test_ten_clients_forty_requests_each_get_an_image_or_503(live):
    app, port = live
    body = {**TXT, "steps": 2, "batch_size": 2}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(lambda i: _post(port, {**body, "seed": i}), range(40)))
    assert set(codes) <= {200, 503} and codes.count(200) >= 5, codes
    assert time.perf_counter() - t0 < 120  # none hung
    assert _post(port, body) == 200


def test_a_client_killed_mid_request_leaves_the_server_serving(live):
    app, port = live
    payload = json.dumps({**TXT, "steps": 150, "batch_size": 8}).encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
            time.sleep(0.3)  # it is generating (or waiting) when the client vanishes
    with socket.create_connection(("127.0.0.1", port)) as s:  # and one that dies halfway through its body
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{\"prompt\"")
    t0 = time.perf_counter()  # nobody waits for those jobs: they are dropped or stopped, not run to the end
    while app.state.worker.progress()["state"]["job_count"] and time.perf_counter() - t0 < 30:
        time.sleep(0.05)
    assert time.perf_counter() - t0 < 10
    assert _post(port, {**TXT, "steps": 2}) == 200
    assert app.state.worker._thread.is_alive()


def rss_mb() -> float:
    """This process's resident memory now (the server runs in it), in MB."""
    status = Path("/proc/self/status")
    if status.exists():
        return int(next(ln for ln in status.read_text().splitlines() if ln.startswith("VmRSS")).split()[1]) / 1024
    import resource  # elsewhere: the peak, an upper bound

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1024)


@pytest.mark.slow
def test_memory_is_flat_over_200_requests(live):
    import requests

    app, port = live
    s = requests.Session()

    def burst(n, start):
        for i in range(n):
            r = s.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img",
                       json={**TXT, "steps": 1, "cfg_scale": 1, "negative_prompt": "", "prompt": f"prompt number {start + i}",
                             "seed": i}, timeout=60)
            assert r.status_code == 200

    burst(20, 0)  # warm: allocator pools, caches
    before = rss_mb()
    burst(100, 20)
    middle = rss_mb()
    burst(100, 120)
    after = rss_mb()
    assert after - before < 40 and after - middle < 20, f"memory {before:.0f} → {middle:.0f} → {after:.0f} MB"


# --- the page in a real browser ----------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason="no chromium browser: apt-get install chromium chromium-driver (.ci/run does it as root)")
def test_the_page_generates_and_inpaints_in_headless_chromium(live, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    app, port = live
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: "16 px" in d.find_element(By.ID, "caps").text)
        Select(driver.find_element(By.ID, "model")).select_by_visible_text("text")
        wait.until(lambda d: "inpainting" not in d.find_element(By.ID, "caps").text)
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a green square in the bottom right")
        for field, value in (("steps", "3"), ("batch", "2"), ("seed", "11")):
            el = driver.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        width = Select(driver.find_element(By.ID, "width"))  # multiples of the granularity 4, up to 3 × 16
        assert [o.get_attribute("value") for o in width.options] == [str(v) for v in range(4, 49, 4)]
        assert width.first_selected_option.get_attribute("value") == str(SIZE)  # the model's size by default
        width.select_by_value("24")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .card img")) == 2)
        params = driver.find_element(By.CSS_SELECTOR, "#gallery .card .params").text
        assert params.startswith("a green square in the bottom right") and "Steps: 3" in params and "Seed: 11" in params
        assert driver.execute_script("return document.querySelector('#gallery .card img').naturalWidth") == 24
        assert driver.execute_script("return document.querySelector('#gallery .card img').naturalHeight") == SIZE
        assert "Size: 24x16" in params
        link = driver.find_element(By.CSS_SELECTOR, "#gallery .card a[download]")
        assert link.get_attribute("href").startswith("data:image/png;base64,")

        # inpainting: switch model, upload an image, paint a mask on the canvas, generate
        Select(driver.find_element(By.ID, "model")).select_by_visible_text("inpaint")
        wait.until(lambda d: "inpainting" in d.find_element(By.ID, "caps").text)
        picture = tmp_path / "init.png"
        square_image().save(picture)
        driver.find_element(By.ID, "initFile").send_keys(str(picture))
        canvas = driver.find_element(By.ID, "maskCanvas")
        wait.until(EC.visibility_of(canvas))
        ActionChains(driver).move_to_element_with_offset(canvas, 40, 40).click_and_hold() \
            .move_by_offset(60, 10).move_by_offset(10, 60).release().perform()
        driver.find_element(By.ID, "prompt").send_keys(" and a blue circle")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .card img")) == 4)
        assert driver.find_element(By.ID, "error").text == ""
        newest = driver.find_element(By.CSS_SELECTOR, "#gallery .card .params").text
        assert "Denoising strength" in newest and "Model: inpaint" in newest
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()
