"""The OpenVINO backend's cache keyed by the files a model was read from (`generation.openvino.source_key`): a
hit is known before loading, so the parts OpenVINO replaces are built on the meta device and never read; a
rewritten or touched file is a miss (a new conversion, never the stale IR); a model built in memory is keyed
by its weights as before."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldmkit
from ldmkit.errors import LdmkitError
from ldmkit.generation import GenerationRequest, generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cpu_speed import OV_BF16_MAX, OV_BF16_MEAN, OV_F32_MAX  # noqa: E402
from test_interop import make_tiny_sd_folder, perturb  # noqa: E402

pytest.importorskip("openvino", reason="the OpenVINO backend's tests need openvino (pip install 'ldmkit[openvino]')")

from ldmkit.checkpoint import source_files  # noqa: E402
from ldmkit.generation import openvino as gov  # noqa: E402
from ldmkit.sample import load_skip  # noqa: E402

PARTS = {"unet", "decoder", "text"}


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return make_tiny_sd_folder(tmp_path_factory.mktemp("ovkey") / "sd")


def request():
    return GenerationRequest(prompt=["a cat"], steps=2, sampler="dpmpp_2m", guidance=2.0, seed=3, height=32, width=32)


def counted() -> dict:
    return {k: gov.CONVERSIONS.get(k, 0) for k in PARTS}


def converted_since(before: dict) -> dict:
    return {k: gov.CONVERSIONS.get(k, 0) - before[k] for k in PARTS}


def no_weights(module) -> bool:
    return all(p.is_meta for p in module.parameters())


def refuse_reading(monkeypatch, read: list):
    """Record the diffusers parts read from their folders, and fail on any CLIP text model read."""
    import transformers

    from ldmkit.interop import diffusers as dif

    real = dif._from_pretrained
    monkeypatch.setattr(dif, "_from_pretrained", lambda cls, folder: (read.append(Path(folder).name), real(cls, folder))[1])

    def refuse(*a, **k):
        raise AssertionError("the CLIP text model's weights were read on a cache hit")

    monkeypatch.setattr(transformers.CLIPTextModel, "from_pretrained", refuse)


def test_a_cache_hit_reads_none_of_the_replaced_weights(sd_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    key, skip = load_skip("openvino", sd_folder, None, cache, precision="fp32")
    assert key is not None and skip == frozenset()  # nothing cached yet: the whole model is read
    ldm = ldmkit.load(str(sd_folder), skip=skip)
    ref = generate(ldm, request()).images
    before = counted()
    first = generate(gov.openvino_model(ldm, cache, "fp32", key), request()).images
    assert converted_since(before) == {"unet": 1, "decoder": 1, "text": 1}
    assert {p.name for p in cache.glob("*.xml")} == {f"{n}-src-{key[:24]}.xml" for n in PARTS}
    assert (first - ref).abs().max() <= OV_F32_MAX

    # the second process: the same files, so the same key, and every part's IR is there
    read: list[str] = []
    refuse_reading(monkeypatch, read)
    again, skip = load_skip("openvino", sd_folder, None, cache, precision="fp32")
    assert again == key and skip == PARTS
    bare = ldmkit.load(str(sd_folder), skip=skip)
    assert read == []  # no part through diffusers: the VAE's encoder straight from its file, the rest not at all
    assert no_weights(bare.unet) and no_weights(bare.conditioner.text_encoder.model)
    assert no_weights(bare.autoencoder.decoder) and no_weights(bare.autoencoder.post_quant_conv)
    assert not any(p.is_meta for p in bare.autoencoder.encoder.parameters())  # img2img's encoder stays in torch
    before = counted()
    out = generate(gov.openvino_model(bare, cache, "fp32", key), request()).images
    assert converted_since(before) == {"unet": 0, "decoder": 0, "text": 0}
    assert torch.equal(out, first)

    # the IR went away between the check and the conversion: said in one line, never a meta-tensor trace
    for f in cache.glob("unet-*"):
        f.unlink()
    with pytest.raises(LdmkitError, match="no longer in the cache"):
        gov.openvino_model(bare, cache, "fp32", key)


def test_a_rewritten_or_touched_weights_file_is_converted_again(sd_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sd"
    os.system(f"cp -r {sd_folder} {folder}")
    cache = tmp_path / "cache"
    key, _ = load_skip("openvino", folder, None, cache, precision="fp32")
    old = generate(gov.openvino_model(ldmkit.load(str(folder)), cache, "fp32", key), request()).images

    weights = next((folder / "unet").glob("*.safetensors"))
    sd = load_file(str(weights))
    g = torch.Generator().manual_seed(5)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sd.items()}, str(weights),
              metadata={"format": "pt"})  # the same size: only the time tells the change
    new_key, skip = load_skip("openvino", folder, None, cache, precision="fp32")
    assert new_key != key and skip == frozenset()
    ldm = ldmkit.load(str(folder), skip=skip)
    before = counted()
    out = generate(gov.openvino_model(ldm, cache, "fp32", new_key), request()).images
    assert converted_since(before)["unet"] == 1
    assert (out - generate(ldm, request()).images).abs().max() <= OV_F32_MAX and (out - old).abs().max() > 1e-3

    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: a new key too
    assert gov.source_key(source_files(folder)) != new_key


def test_an_ldmkit_folder_is_keyed_by_its_files_and_skips_the_unet_and_text(sd_folder, tmp_path):
    from ldmkit.interop.convert import save_ldmkit

    folder = save_ldmkit(ldmkit.load(str(sd_folder)), tmp_path / "native")
    cache = tmp_path / "cache"
    key, skip = load_skip("openvino", folder, None, cache, precision="fp32")
    first = generate(gov.openvino_model(ldmkit.load(str(folder)), cache, "fp32", key), request()).images
    again, skip = load_skip("openvino", folder, None, cache, precision="fp32")
    assert again == key and skip == PARTS
    bare = ldmkit.load(str(folder), skip=skip)
    assert no_weights(bare.unet) and no_weights(bare.conditioner.text_encoder.model)
    before = counted()
    assert torch.equal(generate(gov.openvino_model(bare, cache, "fp32", key), request()).images, first)
    assert converted_since(before) == {"unet": 0, "decoder": 0, "text": 0}


def test_a_model_in_memory_is_keyed_by_its_weights(sd_folder, tmp_path):
    cache = tmp_path / "cache"
    ldm = ldmkit.load(str(sd_folder))
    gov.openvino_model(ldm, cache, "fp32")  # no source: the weights' digest names the IR
    names = {p.name for p in cache.glob("*.xml")}
    assert len(names) == 3 and not any("-src-" in n for n in names)
    assert source_files(sd_folder, config=ldm.config) is None and gov.source_key(None) is None  # a config object
    assert load_skip("torch", sd_folder, None, cache) == (None, frozenset())
    assert load_skip("openvino", sd_folder, None, cache, device="meta")[1] == frozenset()
    perturb(ldm.unet, scale=0.01, seed=9)
    before = counted()
    gov.openvino_model(ldm, cache, "fp32")
    assert converted_since(before) == {"unet": 1, "decoder": 0, "text": 0}


def test_sample_cli_reuses_the_files_key_and_a_lora_falls_back_to_the_weights(sd_folder, tmp_path, monkeypatch):
    from ldmkit.cli import main
    from ldmkit.interop import lora

    cache = tmp_path / "cache"
    args = ["sample", "--checkpoint", str(sd_folder), "--prompt", "a cat", "--steps", "2", "--seed", "2", "--quiet",
            "--device", "cpu", "--precision", "fp32", "--backend", "openvino", "--backend-cache", str(cache)]
    before = counted()
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert converted_since(before) == {"unet": 1, "decoder": 1, "text": 1}
    before = counted()
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert converted_since(before) == {"unet": 0, "decoder": 0, "text": 0}
    assert (tmp_path / "a" / "0000.png").read_bytes() == (tmp_path / "b" / "0000.png").read_bytes()
    assert gov.source_key(source_files(sd_folder), ema=False) != gov.source_key(source_files(sd_folder))  # other weights of the same files

    # img2img on a cache hit: the encoder, read without the decoder, is the one torch runs
    i2i = ["--init-image", str(tmp_path / "a" / "0000.png"), "--strength", "0.6"]
    assert main(args + ["--out", str(tmp_path / "i"), *i2i]) == 0
    assert main(args[:-4] + ["--out", str(tmp_path / "t"), *i2i]) == 0  # --backend torch
    i, t = (np.asarray(Image.open(tmp_path / d / "0000.png")).astype(int) for d in ("i", "t"))
    assert np.abs(i - t).max() <= 1  # f32: the same 8-bit image, up to a rounding

    # a merged LoRA changes the weights, not the files: the U-Net is loaded whole and keyed by its weights
    monkeypatch.setattr(lora, "apply_loras", lambda ldm, files: perturb(ldm.unet, scale=0.02, seed=4))
    before = counted()
    assert main(args + ["--out", str(tmp_path / "l"), "--lora", str(tmp_path / "any.safetensors")]) == 0
    assert converted_since(before) == {"unet": 1, "decoder": 1, "text": 1}
    assert (tmp_path / "l" / "0000.png").read_bytes() != (tmp_path / "a" / "0000.png").read_bytes()


def test_the_vae_read_without_diffusers_is_the_one_diffusers_reads(sd_folder, tmp_path):
    from ldmkit.interop import diffusers as dif

    cfg, _ = dif.pipeline_config(sd_folder)
    theirs = dif.vae_from_diffusers(dif._from_pretrained(dif._diffusers().AutoencoderKL, sd_folder / "vae")).state_dict()
    ours = dif._vae_from_file(sd_folder / "vae", cfg.autoencoder, skip_decoder=False).state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    half = dif._vae_from_file(sd_folder / "vae", cfg.autoencoder, skip_decoder=True)
    assert no_weights(half.decoder) and torch.equal(half.encoder.conv_in.weight, ours["encoder.conv_in.weight"])
    assert dif._vae_from_file(tmp_path, cfg.autoencoder, skip_decoder=False) is None  # no such file: diffusers reads it


_HIT_IMPORTS = """
import sys
import ldmkit
from ldmkit.sample import load_skip
key, skip = load_skip("openvino", sys.argv[1], None, sys.argv[2], precision="fp32")
ldm = ldmkit.load(sys.argv[1], skip=skip)
print(sorted(skip), sorted(m for m in ("diffusers", "transformers") if m in sys.modules))
"""


def test_a_cache_hit_imports_neither_diffusers_nor_transformers(sd_folder, tmp_path):
    """Those imports were seconds of a warm `ldmkit sample --backend openvino` once no weights were read (the
    tokenizer comes from `tokenizers` alone: `conditioning.clip_tokenizer`)."""
    import subprocess

    cache = tmp_path / "cache"
    key, _ = load_skip("openvino", sd_folder, None, cache, precision="fp32")
    gov.openvino_model(ldmkit.load(str(sd_folder)), cache, "fp32", key)
    res = subprocess.run([sys.executable, "-c", _HIT_IMPORTS, str(sd_folder), str(cache)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-1500:]
    assert res.stdout.split("\n")[0] == "['decoder', 'text', 'unet'] []"


def test_serve_loads_a_cached_model_by_its_files_and_still_refuses_a_lora_library(sd_folder, tmp_path):
    from ldmkit.serve.models import ModelStore

    cache = str(tmp_path / "cache")
    first = ModelStore([str(sd_folder)], backend="openvino", backend_cache=cache, precision="fp32")
    ref = generate(first.current.loaded.ldm, request()).images
    before = counted()
    store = ModelStore([str(sd_folder)], backend="openvino", backend_cache=cache, precision="fp32")
    assert converted_since(before) == {"unet": 0, "decoder": 0, "text": 0}
    assert torch.equal(generate(store.current.loaded.ldm, request()).images, ref)
    (tmp_path / "loras").mkdir()
    with pytest.raises(LdmkitError, match="cannot take --lora-dir"):
        ModelStore([str(sd_folder)], backend="openvino", backend_cache=cache, lora_dir=str(tmp_path / "loras"))


def test_a_precision_has_its_own_ir_and_bf16_keeps_fp16_weights(sd_folder, tmp_path):
    """The U-Net and decoder compiled for bf16 read IR whose weights are fp16 (half the bytes to read and repack on
    a cached compile); f32 keeps f32 weights. So a cache hit is per precision: the bf16 IR skips nothing for an
    fp32 run, which converts its own, and the text transformer (always f32) is shared."""
    cache = tmp_path / "cache"
    key, skip = load_skip("openvino", sd_folder, None, cache, precision="bf16")
    assert skip == frozenset()
    ldm = ldmkit.load(str(sd_folder))
    ref = generate(ldm, request()).images
    out = generate(gov.openvino_model(ldm, cache, "bf16", key), request()).images
    assert {p.name for p in cache.glob("*.xml")} == {f"{n}-src-{key[:24]}.xml" for n in ("unet-w16", "decoder-w16", "text")}
    diff = (out - ref).abs()
    assert torch.isfinite(out).all() and diff.mean() <= OV_BF16_MEAN and diff.max() <= OV_BF16_MAX
    assert load_skip("openvino", sd_folder, None, cache, precision="bf16")[1] == PARTS
    assert load_skip("openvino", sd_folder, None, cache, precision="fp32")[1] == {"text"}
    before = counted()
    gov.openvino_model(ldmkit.load(str(sd_folder), skip=frozenset({"text"})), cache, "fp32", key)
    assert converted_since(before) == {"unet": 1, "decoder": 1, "text": 0}
    w16, w32 = (cache / f"unet{s}-src-{key[:24]}.bin" for s in ("-w16", ""))
    assert 0.45 < w16.stat().st_size / w32.stat().st_size < 0.55


def test_compiled_blobs_are_kept_per_part_and_shape_and_the_least_recent_go_past_the_budget(sd_folder, tmp_path,
                                                                                            monkeypatch):
    """OpenVINO's compiled blobs live in one folder per part, precision and input shape (compiled-{hint}/…), so
    each use is known: past `COMPILED_BUDGET` bytes the least recently used folders are removed (an SD 1.5 U-Net's
    blob is 1.7 GB a shape). A model compiled before keeps running; blobs of the older one-folder layout go."""
    cache = tmp_path / "cache"
    key, _ = load_skip("openvino", sd_folder, None, cache, precision="fp32")
    model = gov.openvino_model(ldmkit.load(str(sd_folder)), cache, "fp32", key)
    ref = generate(model, request()).images
    root = cache / "compiled-f32"
    first = {d.name for d in root.iterdir()}
    assert len(first) == 3 and all(any(f.suffix == ".blob" for f in (root / d).iterdir()) for d in first)
    assert {d.rsplit("-", 1)[0] for d in first} == {f"{n}-src-{key[:24]}" for n in ("unet", "decoder", "text")}
    (root / "123.blob").write_bytes(b"old layout")

    wide = GenerationRequest(prompt=["a cat"], steps=2, sampler="dpmpp_2m", guidance=2.0, seed=3, height=32, width=64)
    generate(model, wide)
    names = {d.name for d in root.iterdir()}
    assert len(names) == 5 and first < names  # the U-Net and the decoder at the new shape; the text's reused
    assert not (root / "123.blob").exists()

    monkeypatch.setattr(gov, "COMPILED_BUDGET", 0)  # nothing fits: each compile leaves only its own folder
    again = generate(model, request()).images  # compiled in this process already: no compile, nothing removed
    assert torch.equal(again, ref) and {d.name for d in root.iterdir()} == names
    fresh = gov.openvino_model(ldmkit.load(str(sd_folder)), cache, "fp32", key)
    assert torch.equal(generate(fresh, request()).images, ref)
    left = [d.name for d in root.iterdir()]
    assert len(left) == 1 and left[0].startswith(f"decoder-src-{key[:24]}")  # the last part compiled
    assert torch.equal(generate(model, wide).images, generate(fresh, wide).images)  # evicted or not, same images


def test_irs_past_the_budget_go_least_recent_first_with_their_blobs_but_never_under_a_live_model(sd_folder, tmp_path,
                                                                                                monkeypatch):
    """Each model changed in memory (a fine-tune, a merged LoRA) converts a new IR set (2.3 GB for SD 1.5): past
    `IR_BUDGET` the least recently used IRs are removed, .xml and .bin with their compiled blobs, except those behind
    a part of a model still alive in the process. A model whose IR went is converted again, to the same images."""
    import gc

    cache = tmp_path / "cache"
    key, _ = load_skip("openvino", sd_folder, None, cache, precision="fp32")
    first = gov.openvino_model(ldmkit.load(str(sd_folder)), cache, "fp32", key)
    ref = generate(first, request()).images
    by_source = {x.name for x in cache.glob("*-src-*.xml")}
    assert len(by_source) == 3 and len(list((cache / "compiled-f32").iterdir())) == 3

    dead, writing = cache / f".unet-src-{key[:24]}.{(1 << 22) + 1}.bin", cache / f".unet-x.{os.getpid()}.bin"
    dead.write_bytes(b"a conversion killed mid-write"), writing.write_bytes(b"one in flight")  # pid > pid_max: dead
    monkeypatch.setattr(gov, "IR_BUDGET", 0)  # nothing fits but what is in use
    second = gov.openvino_model(ldmkit.load(str(sd_folder)), cache, "fp32")  # keyed by its weights: a new IR set
    generate(second, request())
    assert {x.name for x in cache.glob("*-src-*.xml")} == by_source  # `first` is alive: its IRs stay
    assert not dead.exists() and writing.exists()
    assert len(list(cache.glob("*.xml"))) == 6

    del first
    gc.collect()
    before = dict(gov.CONVERSIONS)
    third = gov.openvino_model(ldmkit.load(str(sd_folder)), cache, "fp32")  # the same weights: read, not converted
    assert converted_since(before) == {"unet": 0, "decoder": 0, "text": 0}
    assert not list(cache.glob("*-src-*")) and len(list(cache.glob("*.xml"))) == 3  # `first`'s: .xml and .bin
    assert all("-src-" not in d.name for d in (cache / "compiled-f32").iterdir())  # and its blobs
    assert gov.cached_parts(cache, key, "fp32") == frozenset()  # so the next load reads every weight again
    again = gov.openvino_model(ldmkit.load(str(sd_folder)), cache, "fp32", key)
    assert torch.equal(generate(again, request()).images, ref)
    assert torch.equal(generate(third, request()).images, ref)
