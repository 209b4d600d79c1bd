"""LoRAs by name (`<lora:name:w>`, GET /sdapi/v1/loras): the library's listing and A1111 hashes, and that
applying for one request equals `merge_lora` of the same files and is undone bit for bit."""

from __future__ import annotations

import copy
import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from ldmkit.autoencoder import AutoencoderConfig
from ldmkit.errors import LdmkitError
from ldmkit.interop import lora as L
from ldmkit.interop import lora_library as LL
from ldmkit.interop.lora_library import LoraLibrary
from ldmkit.pipeline import LatentDiffusion, LatentDiffusionConfig
from ldmkit.unet import UNetConfig


def tiny() -> LatentDiffusion:
    torch.manual_seed(0)
    ae = AutoencoderConfig(base_channels=8, channel_mult=(1, 2), norm_groups=4)
    unet = UNetConfig(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), mid_attention=False,
                      num_heads=2, norm_groups=4)
    return LatentDiffusion.from_config(LatentDiffusionConfig(autoencoder=ae, unet=unet, image_size=16)).eval()


def random_lora(model, seed: int, targets=("to_q", "to_v", "conv1")) -> L.Lora:
    """Rank-2 adapters with random A and B (B non-zero, so every adapted weight moves)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.unet.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            w = m.weight
            down = torch.randn((2, *w.shape[1:]), generator=g)
            up = torch.randn((w.shape[0], 2, *([1, 1] if w.ndim == 4 else [])), generator=g)
            out[f"unet.{name}"] = L.Adapter(0.1 * down, 0.1 * up, alpha=1.0)
    return out


@pytest.fixture()
def folder(tmp_path):
    model = tiny()
    L.save_lora(random_lora(model, 1), tmp_path / "alpha.safetensors", "diffusers")
    (tmp_path / "styles").mkdir()
    L.save_lora(random_lora(model, 2, ("to_k", "to_v")), tmp_path / "styles" / "beta.safetensors", "kohya")
    (tmp_path / "readme.txt").write_text("not a LoRA")
    return tmp_path


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_names_paths_listing_and_the_a1111_hash(folder):
    lib = LoraLibrary(folder)
    assert lib.names() == ["alpha", "beta"] and lib.path("beta") == folder / "styles" / "beta.safetensors"
    raw = (folder / "alpha.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]  # safetensors: u64 header length, the JSON header, then the tensor bytes
    assert lib.hash("alpha") == hashlib.sha256(raw[8 + n:]).hexdigest()[:12]
    # the metadata is outside the hashed bytes (A1111's addnet hash); the tensors are inside
    sd, meta = L.read_lora(folder / "alpha.safetensors")
    save_file(sd, folder / "same.safetensors", metadata={**meta, "ss_output_name": "Same Alpha"})
    save_file({k: v + 1 for k, v in sd.items()}, folder / "other.safetensors", metadata=meta)
    lib.refresh()
    assert lib.names() == ["alpha", "beta", "other", "same"]
    assert lib.hash("same") == lib.hash("alpha") != lib.hash("other")
    listing = {e["name"]: e for e in lib.a1111_listing()}
    assert listing["same"]["alias"] == "Same Alpha" and listing["alpha"]["alias"] == "alpha"
    assert listing["beta"]["metadata"]["format"] == "kohya" and listing["beta"]["path"].endswith("styles/beta.safetensors")
    json.dumps(listing)  # the route returns it as it is


def test_applied_equals_merge_lora_and_is_undone_exactly(folder):
    model, reference = tiny(), tiny()
    original = copy.deepcopy(model.state_dict())
    lib = LoraLibrary(folder)
    with lib.applied(model, [("alpha", 0.7)]) as hashes:
        inside = copy.deepcopy(model.state_dict())
    assert hashes == {"alpha": lib.hash("alpha")}
    L.merge_lora(reference, folder / "alpha.safetensors", 0.7)
    assert same(inside, reference.state_dict()) and not same(inside, original)
    assert same(model.state_dict(), original)  # bit for bit, not within a tolerance


def test_two_loras_at_once_equal_merging_both(folder):
    model, reference = tiny(), tiny()
    original = copy.deepcopy(model.state_dict())
    lib = LoraLibrary(folder)
    with lib.applied(model, [("alpha", 0.5), ("beta", -1.25)]) as hashes:
        inside = copy.deepcopy(model.state_dict())
    L.merge_lora(reference, folder / "alpha.safetensors", 0.5)
    L.merge_lora(reference, L.load_lora(folder / "styles" / "beta.safetensors", reference), -1.25)  # kohya: needs the model
    assert same(inside, reference.state_dict()) and set(hashes) == {"alpha", "beta"}
    assert same(model.state_dict(), original)


def test_a_file_is_read_once_and_again_after_it_changed(folder, monkeypatch):
    reads = []
    real = LL.read_lora
    monkeypatch.setattr(LL, "read_lora", lambda p: reads.append(p) or real(p))
    model = tiny()
    lib = LoraLibrary(folder)
    for _ in range(3):
        with lib.applied(model, [("alpha", 1.0)]):
            pass
    assert len(reads) == 1
    L.save_lora(random_lora(model, 7), folder / "alpha.safetensors", "diffusers")  # a new version of the file
    lib.refresh()
    with lib.applied(model, [("alpha", 1.0)]):
        pass
    assert len(reads) == 2


def test_bad_names_files_and_weights_are_one_line_and_change_nothing(folder):
    model = tiny()
    original = copy.deepcopy(model.state_dict())
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    lib = LoraLibrary(folder)
    cases = [([("gamma", 1.0)], f"no LoRA named 'gamma' in {folder} (have: alpha, beta, broken)"),
             ([("alpha", 1.0), ("broken", 1.0)], f"<lora:broken> ({folder / 'broken.safetensors'}): cannot read LoRA"),
             ([("alpha", 11.0)], "<lora:alpha:11.0>: the weight must be a number in [-10, 10]"),
             ([("alpha", float("nan"))], "<lora:alpha:nan>: the weight must be a number in [-10, 10]")]
    for loras, words in cases:
        with pytest.raises(LdmkitError) as e:
            with lib.applied(model, loras):
                pytest.fail("the block must not run")
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert same(model.state_dict(), original)
    with pytest.raises(RuntimeError, match="mid-request"):  # a generation that fails inside: restored all the same
        with lib.applied(model, [("alpha", 1.0)]):
            raise RuntimeError("mid-request")
    assert same(model.state_dict(), original)
    with pytest.raises(LdmkitError, match="is not a folder"):
        LoraLibrary(folder / "nowhere")
