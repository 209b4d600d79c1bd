"""Textual inversion (issue 30): `finetune.train: embedding` trains a new word's vectors and nothing else (the U-Net,
first stage and text encoder unchanged bit for bit); the vectors start at the initialiser word's token embeddings;
they are saved in A1111's layout and diffusers' `learned_embeds.safetensors`, both read back by `load_embedding`;
diffusers' `load_textual_inversion` takes the diffusers file and gives ldmkit's prompt embeddings; `ldmkit sample
--embeddings-dir` expands the word; `--resume` is exact."""

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")

from safetensors.torch import load_file  # noqa: E402

from ldmkit.cli import main  # noqa: E402
from ldmkit.conditioning.embeddings import attach_embeddings, load_embedding  # noqa: E402
from ldmkit.interop.convert import load_any  # noqa: E402
from test_interop import make_tiny_sd_folder, max_diff, same_state  # noqa: E402

WORD = "sks"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return make_tiny_sd_folder(tmp_path_factory.mktemp("ti") / "sd")


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    """A kohya folder: 4_sks/ with six yellow-ish images, each captioned 'a sks' or 'a sks on grey'."""
    root = tmp_path_factory.mktemp("ti-data") / "train"
    folder = root / "4_sks"
    folder.mkdir(parents=True)
    for i in range(6):
        rgb = np.zeros((16, 16, 3), np.uint8) + np.array([230, 200 + 5 * i, 40], np.uint8)
        rgb[4:12, 4:12] = 90
        Image.fromarray(rgb).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {WORD}" if i % 2 else f"a {WORD} on grey")
    return root


def train(sd_folder, concept, out, *extra, steps=3):
    return main(["train", "--config", "tiny", "--init-from", str(sd_folder), "--out", str(out), "--quiet",
                 "--set", f"data.dataset={concept}", "--set", "finetune.train=embedding",
                 "--set", f"finetune.embedding.token={WORD}", "--set", "finetune.embedding.init=cat",
                 "--set", "finetune.embedding.vectors=2", "--set", f"optim.steps={steps}", "--set", "optim.lr=0.05",
                 "--set", "optim.warmup_steps=0", "--set", "optim.schedule=constant", *extra])


@pytest.fixture(scope="module")
def run(sd_folder, concept, tmp_path_factory):
    out = tmp_path_factory.mktemp("ti-run") / "run"
    assert train(sd_folder, concept, out) == 0
    return out


def test_only_the_new_vectors_train_and_they_start_at_the_initialiser_word(run, sd_folder):
    base, ldm = load_any(sd_folder), load_any(run)
    assert same_state(ldm.state_dict(), base.state_dict())  # U-Net and first stage: bit for bit
    for f in ("model.safetensors", "ema.safetensors"):
        saved = load_file(run / "checkpoints" / "step_00000003" / f)
        assert same_state(saved, base.state_dict()), f
    enc, enc0 = ldm.conditioner.text_encoder, base.conditioner.text_encoder
    assert same_state(enc.model.state_dict(), enc0.model.state_dict())
    state = torch.load(run / "checkpoints" / "step_00000003" / "training_state.pt", weights_only=True)
    vectors = state["embedding"]  # (2, 32), live
    cat = enc0.input_embeddings().weight[enc0._piece_ids(["cat"])[0]]  # "cat</w>": one token of the tiny vocabulary
    assert cat.shape == (1, 32) and vectors.shape == (2, 32)
    moved = (vectors - cat).abs().amax(1)
    assert (moved > 1e-3).all()  # both vectors trained away from "cat" (lr 0.05, 3 steps)


def test_the_saved_files_are_a1111s_and_diffusers_layouts_and_load_back_equal(run):
    a1111, diff = run / "embeddings" / f"{WORD}.safetensors", run / "learned_embeds.safetensors"
    assert set(load_file(a1111)) == {"emb_params"} and set(load_file(diff)) == {WORD}
    a, b = load_embedding(a1111), load_embedding(diff)
    assert a.name == WORD and a.vectors.shape == (2, 32) and torch.equal(a.vectors, b.vectors)
    state = torch.load(run / "checkpoints" / "step_00000003" / "training_state.pt", weights_only=True)
    assert torch.equal(a.vectors, state["embedding_ema"])  # the EMA's vectors are the result (as LoRA's adapter)


def test_diffusers_load_textual_inversion_gives_ldmkits_prompt_embeddings(run, sd_folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_folder), local_files_only=True)
    pipe.load_textual_inversion(str(run / "learned_embeds.safetensors"))
    ldm = load_any(sd_folder)
    attach_embeddings(ldm.conditioner, run / "embeddings")
    prompts = [f"a {WORD}", f"{WORD} red"]  # within the tiny window (16 tokens), which diffusers truncates at
    with torch.no_grad():
        ref = pipe.encode_prompt(prompts, "cpu", 1, False)[0]  # (2, 16, 32): "sks" → "sks sks_1", its vectors
        ours = ldm.conditioner.text_encoder(prompts, syntax=True)[0]
        plain = ldm.conditioner.text_encoder(prompts)[0]  # training captions are never expanded
    assert max_diff(ref, plain) > 1e-2  # the word's vectors change the embeddings
    assert max_diff(ours, ref) <= 1e-5


def test_sample_with_the_embeddings_dir_expands_the_word(run, tmp_path):
    args = ["sample", "--checkpoint", str(run), "--prompt", f"a {WORD}", "--steps", "2", "--seed", "3", "--quiet"]
    assert main(args + ["--embeddings-dir", str(run / "embeddings"), "--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "0000.png")).astype(int) for d in ("a", "b"))
    assert np.abs(a - b).max() > 0  # the word became its vectors


def test_resume_repeats_the_vectors_exactly(sd_folder, concept, tmp_path):
    extra = ["--set", "logging.ckpt_every=2"]
    assert train(sd_folder, concept, tmp_path / "full", *extra, steps=4) == 0
    assert train(sd_folder, concept, tmp_path / "part", *extra, steps=2) == 0
    assert train(sd_folder, concept, tmp_path / "part", *extra, "--resume", steps=4) == 0
    a, b = (load_file(tmp_path / d / "embeddings" / f"{WORD}.safetensors")["emb_params"] for d in ("full", "part"))
    assert torch.equal(a, b)


def test_a_step_whose_captions_all_lack_the_word_trains_nothing_and_does_not_fail(sd_folder, concept, tmp_path):
    # every caption dropped (drop_text 1): no step has a path to the vectors; AdamW without weight decay leaves them
    out = tmp_path / "run"
    assert train(sd_folder, concept, out, "--set", "conditioner.drop_text=1", "--set", "optim.weight_decay=0",
                 "--set", "optim.ema_decay=null", steps=2) == 0
    enc = load_any(sd_folder).conditioner.text_encoder
    start = enc.input_embeddings().weight[enc._piece_ids(["cat"])[0]].expand(2, -1)
    assert torch.equal(load_embedding(out / "embeddings" / f"{WORD}.safetensors").vectors, start)


def test_a_word_no_caption_uses_or_no_model_is_one_line(sd_folder, concept, tmp_path):
    rc = main(["train", "--config", "tiny", "--init-from", str(sd_folder), "--out", str(tmp_path / "a"), "--quiet",
               "--set", f"data.dataset={concept}", "--set", "finetune.train=embedding",
               "--set", "finetune.embedding.token=zzq"])
    assert rc == 2
    rc = main(["train", "--config", "tiny", "--out", str(tmp_path / "b"), "--quiet", "--set", "finetune.train=embedding",
               "--set", f"finetune.embedding.token={WORD}"])
    assert rc == 2


@pytest.mark.slow
def test_two_processes_learn_the_vectors_of_one_process_with_the_same_pieces(sd_folder, concept, tmp_path):
    """Under torchrun (gloo) DDP wraps the word's vectors: 2 processes give, bit for bit, the vectors (live and EMA)
    of one process that splits each global batch into the same two pieces (grad_accum=2); the base stays as it was."""
    import json

    from test_distributed import _one_thread, _torchrun

    extra = ["--set", "optim.batch_size=8", "--set", "optim.ema_decay=0.5", "--set", "conditioner.drop_text=0.3"]
    with _one_thread():
        assert train(sd_folder, concept, tmp_path / "one", *extra, "--set", "optim.grad_accum=2") == 0
    args = ["train", "--config", "tiny", "--init-from", str(sd_folder), "--out", str(tmp_path / "two"), "--quiet",
            "--set", f"data.dataset={concept}", "--set", "finetune.train=embedding",
            "--set", f"finetune.embedding.token={WORD}", "--set", "finetune.embedding.init=cat",
            "--set", "finetune.embedding.vectors=2", "--set", "optim.steps=3", "--set", "optim.lr=0.05",
            "--set", "optim.warmup_steps=0", "--set", "optim.schedule=constant", *extra]
    _torchrun(2, args)
    a, b = (load_file(tmp_path / d / "embeddings" / f"{WORD}.safetensors")["emb_params"] for d in ("one", "two"))
    assert torch.equal(a, b)
    state = [torch.load(tmp_path / d / "checkpoints" / "step_00000003" / "training_state.pt", weights_only=True)
             for d in ("one", "two")]
    assert all(torch.equal(state[0][k], state[1][k]) for k in ("embedding", "embedding_ema"))
    start = load_any(sd_folder).conditioner.text_encoder.token_vectors("cat")
    assert not torch.equal(state[1]["embedding"][0], start[0])  # trained
    assert same_state(load_any(tmp_path / "two").unet.state_dict(), load_any(sd_folder).unet.state_dict())
    meta = json.loads((tmp_path / "two" / "checkpoints" / "step_00000003" / "config.json").read_text())["meta"]
    assert meta["world_size"] == 2 and meta["rank_weight_sums"][0] == meta["rank_weight_sums"][1]
