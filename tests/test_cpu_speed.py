"""The fast CPU paths of `ldmkit sample` / `serve` (issue 31, part 2): `--precision auto` (bf16 autocast where the
CPU has native bf16, fp32 elsewhere) and `--backend openvino` (converted parts, cached by weights digest)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldmkit
from ldmkit import device as D
from ldmkit.cli import main
from ldmkit.generation import GenerationRequest, generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_interop import make_tiny_sd_folder, perturb  # noqa: E402

# Stated tolerances (images in [-1, 1], or 8-bit PNG levels). bf16 keeps 8 bits of mantissa (relative error
# 2^-9 per rounding); through a tiny random U-Net, 3 steps and a decoder that is measured ~1 level mean.
BF16_PNG_MEAN, BF16_PNG_MAX = 4.0, 40  # auto (bf16) vs fp32, 8-bit levels
OV_F32_MAX = 1e-4  # OpenVINO f32 vs torch fp32: the same graph, other kernels (measured 5e-6)
OV_BF16_MEAN, OV_BF16_MAX = 0.02, 0.2  # OpenVINO bf16 U-Net and decoder vs torch fp32, in [-1, 1]


def test_auto_precision_follows_the_cpu_flags(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx512_bf16\n")
    assert "avx512_bf16" in D.cpu_flags(info) and D.cpu_flags(tmp_path / "missing") == set()
    assert D.resolve_precision("auto", "cpu", {"avx512f", "avx512_bf16"}) == "bf16"
    assert D.resolve_precision("auto", "cpu", {"amx_tile", "amx_bf16"}) == "bf16"
    assert D.resolve_precision("auto", "cpu", {"avx2", "avx512f"}) == "fp32"  # emulated bf16 is slower than fp32
    assert D.resolve_precision("auto", "cuda", {"avx512_bf16"}) == "fp32"  # the GPU path is unchanged
    assert D.resolve_precision("fp32", "cpu", {"avx512_bf16"}) == "fp32"
    assert D.resolve_precision("bf16", "cpu", set()) == "bf16"  # asked for: honoured
    monkeypatch.setattr(D, "cpu_flags", lambda *_: {"avx2"})
    assert not isinstance(D.autocast("auto", "cpu"), torch.autocast)
    monkeypatch.setattr(D, "cpu_flags", lambda *_: {"avx512_bf16"})
    amp = D.autocast("auto", "cpu")
    assert isinstance(amp, torch.autocast) and amp.fast_dtype == torch.bfloat16


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return make_tiny_sd_folder(tmp_path_factory.mktemp("cpu") / "sd")


def test_sample_defaults_to_auto_within_the_stated_bound_of_fp32(sd_folder, tmp_path, monkeypatch):
    args = ["sample", "--checkpoint", str(sd_folder), "--prompt", "a cat", "--steps", "3", "--seed", "2", "--quiet",
            "--device", "cpu"]
    monkeypatch.setattr(D, "cpu_flags", lambda *_: {"avx512_bf16"})  # bf16 on any CPU (emulated where not native)
    assert main(args + ["--out", str(tmp_path / "auto")]) == 0  # the default: auto
    assert main(args + ["--out", str(tmp_path / "fp32"), "--precision", "fp32"]) == 0
    monkeypatch.setattr(D, "cpu_flags", lambda *_: {"avx2"})
    assert main(args + ["--out", str(tmp_path / "plain")]) == 0  # auto on a CPU without bf16: fp32
    a, f, p = (np.asarray(Image.open(tmp_path / d / "0000.png")).astype(float) for d in ("auto", "fp32", "plain"))
    diff = np.abs(a - f)
    assert 0 < diff.mean() <= BF16_PNG_MEAN and diff.max() <= BF16_PNG_MAX, (diff.mean(), diff.max())
    assert np.array_equal(p, f)


ov = pytest.importorskip("openvino", reason="the OpenVINO backend's tests need openvino (pip install 'ldmkit[openvino]')")


@pytest.mark.slow
def test_openvino_matches_torch_and_its_cache_is_reused_and_invalidated(sd_folder, tmp_path, recwarn):
    from ldmkit.generation import openvino as gov

    ldm = ldmkit.load(str(sd_folder))

    def request():
        return GenerationRequest(prompt=["a cat", "a red dog"], negative_prompt="blurry", steps=3, sampler="dpmpp_2m",
                                 guidance=3.0, seed=1, height=32, width=32)

    ref = generate(ldm, request()).images
    cache = tmp_path / "cache"
    before = dict(gov.CONVERSIONS)
    f32 = gov.openvino_model(ldm, cache, precision="fp32")
    assert {k: gov.CONVERSIONS.get(k, 0) - before.get(k, 0) for k in ("unet", "decoder", "text")} == \
        {"unet": 1, "decoder": 1, "text": 1}
    assert ldm.unet is not f32.unet and type(ldm.autoencoder.decoder).__name__ == "Decoder"  # the model is untouched
    out = generate(f32, request()).images
    assert (out - ref).abs().max() <= OV_F32_MAX

    counted = dict(gov.CONVERSIONS)
    bf16 = gov.openvino_model(ldm, cache, precision="bf16")  # the U-Net and decoder again, with fp16 weights
    assert {k: gov.CONVERSIONS.get(k, 0) - counted.get(k, 0) for k in ("unet", "decoder", "text")} == \
        {"unet": 1, "decoder": 1, "text": 0}
    for part in ("unet", "decoder"):  # the bf16 compile's IR stores its weights in half the bytes
        (w32,), (w16,) = cache.glob(f"{part}-[0-9a-f]*.bin"), cache.glob(f"{part}-w16-*.bin")
        assert 0.45 < w16.stat().st_size / w32.stat().st_size < 0.55
    counted = dict(gov.CONVERSIONS)
    again = gov.openvino_model(ldm, cache, precision="bf16")  # read from the cache: nothing converted again
    assert gov.CONVERSIONS == counted and again.unet.xml == bf16.unet.xml
    out = generate(bf16, request()).images
    diff = (out - ref).abs()
    assert torch.isfinite(out).all() and diff.mean() <= OV_BF16_MEAN and diff.max() <= OV_BF16_MAX, (diff.mean(), diff.max())

    perturb(ldm.unet, scale=0.01, seed=7)  # new weights (a fine-tune, a merged LoRA): the U-Net is converted again
    moved = gov.openvino_model(ldm, cache, precision="fp32")
    assert gov.CONVERSIONS["unet"] == counted["unet"] + 1 and gov.CONVERSIONS["decoder"] == counted["decoder"]
    assert (generate(moved, request()).images - generate(ldm, request()).images).abs().max() <= OV_F32_MAX
    assert len(list(cache.glob("unet-[0-9a-f]*.xml"))) == 2


def test_sample_cli_with_openvino_and_its_refusals(sd_folder, tmp_path, capsys):
    args = ["sample", "--checkpoint", str(sd_folder), "--prompt", "a cat", "--steps", "2", "--seed", "2", "--quiet",
            "--device", "cpu", "--precision", "fp32"]
    cache = ["--backend-cache", str(tmp_path / "cache")]
    assert main(args + ["--out", str(tmp_path / "t")]) == 0
    assert main(args + ["--out", str(tmp_path / "o"), "--backend", "openvino", *cache]) == 0
    t, o = (np.asarray(Image.open(tmp_path / d / "0000.png")).astype(int) for d in ("t", "o"))
    assert np.abs(t - o).max() <= 1  # f32: the same 8-bit image, up to a rounding
    capsys.readouterr()
    (tmp_path / "loras").mkdir()
    assert main(args + ["--out", str(tmp_path / "x"), "--backend", "openvino", *cache, "--lora-dir", str(tmp_path / "loras")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--backend openvino cannot take --lora-dir" in err[0]


_SIGNAL_AFTER_A_FOREIGN_FREE = """
import gc, os, signal, sys, threading
import ldmkit
from ldmkit.generation import GenerationRequest, generate
from ldmkit.generation.openvino import openvino_model
box = [openvino_model(ldmkit.load(sys.argv[1]), sys.argv[2], precision="bf16")]
generate(box[0], GenerationRequest(prompt="a cat", steps=1, seed=0, height=32, width=32))
# the compiled parts freed in another thread (as a garbage collection in a server thread does), then a signal
t = threading.Thread(target=lambda: (box.clear(), gc.collect()))
t.start(); t.join()
signal.signal(signal.SIGUSR1, lambda *a: print("handled", flush=True))
os.kill(os.getpid(), signal.SIGUSR1)
print("alive", flush=True)
"""


def test_openvino_leaves_the_threads_signal_stack_so_a_later_signal_is_handled(sd_folder, tmp_path):
    """OpenVINO's CPU plugin swaps in an alternate signal stack of its own on the compiling thread and frees it
    with the plugin; freed from another thread, the next signal segfaulted the process (the full test suite
    died so at a DataLoader worker's SIGCHLD). The backend keeps each thread's own stack."""
    import subprocess

    res = subprocess.run([sys.executable, "-c", _SIGNAL_AFTER_A_FOREIGN_FREE, str(sd_folder), str(tmp_path / "c")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.split() == ["handled", "alive"], (res.returncode, res.stderr[-1500:])
