"""Training the text encoder (issue 30): `finetune.train: unet+text` and LoRA on the encoder (`lora.text_encoder`).
The grad path gives the cached path's tokens; gradients reach the encoder (CLIP and the bundled MiniLM); the trained
encoder is saved in each checkpoint and read back by `ldmkit.load`; `--resume` repeats the uninterrupted run bit for
bit; a text-encoder LoRA loads into diffusers' `load_lora_weights` and gives ldmkit's prompt embeddings; kohya's
names are `lora_te_text_model_…`."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from ldmkit.checkpoint import resolve  # noqa: E402
from ldmkit.cli import main  # noqa: E402
from ldmkit.conditioning.text import MiniLMTextEncoder  # noqa: E402
from ldmkit.interop import lora as L  # noqa: E402
from ldmkit.interop.convert import load_any  # noqa: E402
from test_convert import minilm_ckpt  # noqa: E402, F401 - the fixture
from test_interop import make_tiny_sd_folder, max_diff  # noqa: E402

CAPTIONS = ["a red square in the top left", "a cat", "", "a blue circle"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return make_tiny_sd_folder(tmp_path_factory.mktemp("text-train") / "sd")


def run(sd_folder, out, *extra, steps=3):
    return main(["train", "--config", "tiny", "--init-from", str(sd_folder), "--out", str(out), "--quiet",
                 "--set", f"optim.steps={steps}", "--set", "optim.lr=0.02", "--set", "optim.warmup_steps=0",
                 "--set", "optim.schedule=constant", *extra])


@pytest.mark.parametrize("kind", ["clip", "minilm"])
def test_the_grad_path_gives_the_cached_tokens_and_gradients_reach_every_encoder_weight(kind, sd_folder):
    enc = load_any(sd_folder).conditioner.text_encoder if kind == "clip" else MiniLMTextEncoder()
    cached, cmask = enc(CAPTIONS)
    enc.trains = True
    enc.model.requires_grad_(True)
    tokens, mask = enc(CAPTIONS)
    assert torch.equal(mask, cmask) and tokens.requires_grad
    # one batched pass against captions encoded one by one (encode_alone): equal to float rounding
    assert max_diff(tokens.detach(), cached) <= 1e-5
    (tokens * mask[..., None]).square().sum().backward()
    grads = {n: p.grad for n, p in enc.model.named_parameters()}
    unused = {n for n, g in grads.items() if g is None or not g.abs().sum() > 0}
    # CLIP's pooler-free last hidden state uses every weight; BERT's pooler is not in the token outputs
    assert unused <= {n for n in grads if "pooler" in n}, sorted(unused)[:4]
    with torch.no_grad():  # a second call is computed anew: no cache behind the weights' back
        w = enc.input_embeddings().weight
        w.add_(0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))  # (not a constant: layer norms)
        assert max_diff(enc(CAPTIONS)[0], tokens.detach()) > 1e-3


def test_unet_and_text_trains_both_saves_the_encoder_in_the_checkpoint_and_resumes_exactly(sd_folder, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--set", "finetune.train=unet+text", "--set", "logging.ckpt_every=2", "--set", "optim.ema_decay=0.5"]
    assert run(sd_folder, full, *args, steps=4) == 0
    base = load_any(sd_folder)
    ldm = load_any(full)
    ckpt = (full / "checkpoints" / "step_00000004")
    assert (ckpt / "text_encoder" / "config.json").is_file() and (ckpt / "tokenizer").is_dir()
    te, te0 = ldm.conditioner.text_encoder.model.state_dict(), base.conditioner.text_encoder.model.state_dict()
    moved = [k for k in te if not torch.equal(te[k], te0[k])]
    assert len(moved) == len(te)  # every encoder weight trained (positions and token embeddings included)
    assert any(not torch.equal(v, base.unet.state_dict()[k]) for k, v in ldm.unet.state_dict().items())
    # the checkpoint's encoder is the EMA's (ldmkit.load pairs it with the EMA U-Net); the live one is in the state
    state = torch.load(ckpt / "training_state.pt", weights_only=True)
    assert all(torch.equal(te[k], state["text_encoder_ema"][k]) for k in te)
    assert not all(torch.equal(te[k], state["text_encoder"][k]) for k in te)
    # 2 steps, then --resume to 4: the same weights, encoder (live and EMA) and U-Net, bit for bit
    assert run(sd_folder, part, *args, steps=2) == 0
    assert run(sd_folder, part, *args, "--resume", steps=4) == 0
    again = torch.load(part / "checkpoints" / "step_00000004" / "training_state.pt", weights_only=True)
    for key in ("text_encoder", "text_encoder_ema"):
        assert all(torch.equal(v, again[key][k]) for k, v in state[key].items()), key
    for f in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(ckpt / f), load_file(part / "checkpoints" / "step_00000004" / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f


def test_minilm_unet_and_text_saves_a_sentence_transformers_folder_that_loads(minilm_ckpt, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert run(minilm_ckpt, out, "--set", "finetune.train=unet+text", steps=2) == 0
    folder = out / "checkpoints" / "step_00000002" / "text_encoder"
    assert (folder / "modules.json").is_file()
    enc = load_any(out).conditioner.text_encoder
    assert isinstance(enc, MiniLMTextEncoder) and enc.model[0].auto_model.training is False
    bundled = MiniLMTextEncoder()
    a, b = enc(["a red square"])[0], bundled(["a red square"])[0]
    assert a.shape == b.shape and max_diff(a, b) > 1e-4  # the trained encoder, not the bundled one


@pytest.fixture(scope="module")
def te_lora_run(sd_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("te-lora") / "run"
    assert run(sd_folder, out, "--set", "finetune.train=lora", "--set", "lora.text_encoder=true", "--set", "lora.rank=2",
               "--set", "optim.ema_decay=null") == 0
    return out


def bigger(lora: L.Lora, seed=0) -> L.Lora:
    """The trained adapter's layers with order-0.3 random weights, so a mapping mistake cannot hide in a small B."""
    g = torch.Generator().manual_seed(seed)
    return {p: L.Adapter(0.3 * torch.randn(a.down.shape, generator=g), 0.3 * torch.randn(a.up.shape, generator=g), a.alpha)
            for p, a in lora.items()}


def test_a_text_encoder_lora_run_trains_only_adapters_and_folds_them_into_the_checkpoint(te_lora_run, sd_folder):
    lora = L.load_lora(te_lora_run / "lora.safetensors")
    te_paths = {p for p in lora if p.startswith("text_encoder.")}
    assert te_paths and all(p.startswith("text_encoder.text_model.encoder.layers.") for p in te_paths)
    assert {p.rsplit(".", 1)[1] for p in te_paths} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert any(a.up.abs().sum() > 0 for p, a in lora.items() if p in te_paths)  # B moved from its zero start
    base, ldm = load_any(sd_folder), load_any(te_lora_run)
    L.merge_lora(base, lora)  # the base with the adapter folded in is the run's model, encoder included
    te, want = ldm.conditioner.text_encoder.model.state_dict(), base.conditioner.text_encoder.model.state_dict()
    assert set(te) == set(want) and max(max_diff(te[k], want[k]) for k in te) <= 1e-6


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_text_encoder_lora_in_diffusers_load_lora_weights_gives_ldmkits_prompt_embeddings(te_lora_run, sd_folder,
                                                                                         tmp_path, layout):
    lora = bigger(L.load_lora(te_lora_run / "lora.safetensors"))
    file = L.save_lora(lora, tmp_path / f"{layout}.safetensors", layout)
    keys = load_file(file).keys()
    if layout == "kohya":
        assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    else:
        assert any(k.startswith("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A") for k in keys)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_folder), local_files_only=True)
    prompts = ["a cat", "red"]
    with torch.no_grad():
        base_ref = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    pipe.load_lora_weights(str(file))
    with torch.no_grad():
        ref = pipe.encode_prompt(prompts, "cpu", 1, False)[0]  # (2, 16, 32)
    ldm = L.merge_lora(load_any(sd_folder), L.load_lora(file, load_any(sd_folder)))
    ours = ldm.conditioner.text_encoder(prompts)[0]
    assert max_diff(ref, base_ref) > 1e-2  # the LoRA changes the embeddings
    assert max_diff(ours, ref) <= 1e-5


def test_text_encoder_lora_resumes_with_its_adapter(sd_folder, tmp_path):
    args = ["--set", "finetune.train=lora", "--set", "lora.text_encoder=true", "--set", "logging.ckpt_every=2"]
    assert run(sd_folder, tmp_path / "full", *args, steps=4) == 0
    assert run(sd_folder, tmp_path / "part", *args, steps=2) == 0
    assert run(sd_folder, tmp_path / "part", *args, "--resume", steps=4) == 0
    a, b = (L.load_lora(tmp_path / d / "lora.safetensors") for d in ("full", "part"))
    assert any(p.startswith("text_encoder.") for p in a)
    assert set(a) == set(b) and all(torch.equal(a[p].down, b[p].down) and torch.equal(a[p].up, b[p].up) for p in a)


def test_text_training_without_a_text_encoder_is_one_line(tmp_path):
    rc = main(["train", "--config", "tiny", "--out", str(tmp_path / "a"), "--quiet", "--set", "finetune.train=unet+text",
               "--set", "conditioner.text_encoder=null", "--set", "unet.context_dim=null"])
    assert rc == 2


def _live_text_and_unet(out):
    """The run's live text-encoder weights (or text adapter) from its training state, and its U-Net weights."""
    state = torch.load(resolve(out) / "training_state.pt", weights_only=True)
    text = state.get("text_encoder") or {f"{k}.{part}": v[part] for k, v in state["lora"].items() for part in ("down", "up")}
    return {k: v for k, v in text.items() if isinstance(v, torch.Tensor)}, load_file(resolve(out) / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("train", [["finetune.train=unet+text"], ["finetune.train=lora", "lora.text_encoder=true"]])
def test_text_encoder_training_under_torchrun_equals_one_process(train, sd_folder, tmp_path):
    """Two gloo processes (DDP on the U-Net, the encoder's gradients averaged beside it) give, bit for bit, the one
    process that splits each global batch into the same two pieces (grad_accum=2): the U-Net, the live encoder (or
    its adapter), the logged loss; the replicas stay equal (without the encoder's average they drift apart)."""
    import json

    from test_distributed import _assert_close, _one_thread, _torchrun

    args = ["train", "--config", "tiny", "--init-from", str(sd_folder), "--quiet", "--set", "optim.steps=3",
            "--set", "optim.lr=0.001", "--set", "optim.warmup_steps=0", "--set", "optim.schedule=constant",
            "--set", "optim.batch_size=8", "--set", "optim.grad_clip=1.0"]
    for s in train:
        args += ["--set", s]
    one, two = tmp_path / "one", tmp_path / "two"
    with _one_thread():
        assert main([*args, "--set", "optim.grad_accum=2", "--out", str(one)]) == 0
    _torchrun(2, [*args, "--out", str(two)])
    (text1, unet1), (text2, unet2) = _live_text_and_unet(one), _live_text_and_unet(two)
    _assert_close(text1, text2, atol=0)
    _assert_close(unet1, unet2, atol=0)
    if "lora" in train[0]:  # the adapter trained (B starts at zero)
        assert any(v.abs().sum() > 0 for k, v in text2.items() if k.endswith(".up"))
    else:
        base = load_any(sd_folder).conditioner.text_encoder.model.state_dict()
        assert all(not torch.equal(v, base[k]) for k, v in text2.items())
    meta = json.loads((resolve(two) / "config.json").read_text())["meta"]
    assert meta["world_size"] == 2 and meta["rank_weight_sums"][0] == meta["rank_weight_sums"][1]
    losses = [[json.loads(ln)["loss"] for ln in (f / "log.jsonl").read_text().splitlines()] for f in (one, two)]
    assert losses[0] == losses[1]
