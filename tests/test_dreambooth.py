"""DreamBooth's prior preservation (issue 30): class images drawn once by the starting model, cached by a key of the
model, prompts and settings, reused by `--resume` and by a second run, resumed when the generation was killed; each
step trains its instance rows and as many class rows; loss = instance + λ·prior, both logged; with unet, unet+text
and lora."""

import json
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldmkit.cli import main  # noqa: E402
from ldmkit.interop.convert import load_any  # noqa: E402
from ldmkit.rng import step_generator  # noqa: E402
from ldmkit.train import prior  # noqa: E402
from test_interop import make_tiny_sd_folder  # noqa: E402

N = 10  # class images: two blocks of 8 (the second one short)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return make_tiny_sd_folder(tmp_path_factory.mktemp("db") / "sd")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("db-prompts") / "classes.txt"
    path.write_text("a red square\n\na blue circle\n")
    return path


@pytest.fixture
def calls(monkeypatch):
    """Counts `generate` calls made for class images."""
    seen = []
    real = prior.generate

    def counting(model, request, *a, **k):
        seen.append(request.count())
        return real(model, request, *a, **k)

    monkeypatch.setattr(prior, "generate", counting)
    return seen


def train(sd_folder, prompts, out, *extra, steps=2, weight=1.0, unconditional=0):
    return main(["train", "--config", "tiny", "--init-from", str(sd_folder), "--out", str(out), "--quiet",
                 "--set", f"finetune.prior.prompts={prompts}", "--set", f"finetune.prior.images={N}",
                 "--set", f"finetune.prior.unconditional={unconditional}",
                 "--set", "finetune.prior.steps=2", "--set", f"finetune.prior.weight={weight}",
                 "--set", f"optim.steps={steps}", "--set", "logging.log_every=1", "--set", "logging.ckpt_every=2", *extra])


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_class_images_are_generated_once_and_reused_by_resume_and_a_second_run(sd_folder, prompts, tmp_path, calls):
    cache = tmp_path / "classes"
    shared = ["--set", f"finetune.prior.cache={cache}"]
    assert train(sd_folder, prompts, tmp_path / "a", "--set", "finetune.train=lora", *shared) == 0
    assert calls == [8, 2]  # two blocks
    (folder,) = cache.iterdir()
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:05d}.png" for i in range(N)]
    assert [(folder / f"{i:05d}.txt").read_text() for i in range(3)] == ["a red square", "a blue circle", "a red square"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    calls.clear()
    assert train(sd_folder, prompts, tmp_path / "a", "--set", "finetune.train=lora", *shared, "--resume", steps=4) == 0
    assert train(sd_folder, prompts, tmp_path / "b", "--set", "finetune.train=unet", *shared) == 0
    assert calls == []  # neither the resumed run nor the second run (another --out, full U-Net) drew one
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    meta = json.loads((tmp_path / "b" / "checkpoints" / "step_00000002" / "config.json").read_text())["meta"]
    assert meta["prior"]["generate_calls"] == 0 and meta["prior"]["folder"] == str(folder)
    # the default cache is beside the run; other prompts are another key, never the images of these
    other = tmp_path / "other.txt"
    other.write_text("a green triangle\n")
    assert train(sd_folder, other, tmp_path / "c", "--set", "finetune.train=unet+text") == 0  # the encoder trains too
    assert calls == [8, 2] and len(list((tmp_path / "c" / "class_images").iterdir())) == 1
    assert all(line["prior_loss"] > 0 for line in log(tmp_path / "c"))


def test_a_killed_generation_resumes_where_it_stopped_with_the_same_images(sd_folder, tmp_path, monkeypatch):
    ldm = load_any(sd_folder)
    args = (["a red square", "a cat"], N, 5, 2, 3.0, 16)
    whole = prior.class_images(ldm, *args, tmp_path / "whole")
    real, seen = prior.generate, []

    def dies_on_the_second_block(model, request, *a, **k):
        seen.append(request.seed)
        if len(seen) == 2:
            raise KeyboardInterrupt  # killed while drawing block 2
        return real(model, request, *a, **k)

    monkeypatch.setattr(prior, "generate", dies_on_the_second_block)
    with pytest.raises(KeyboardInterrupt):
        prior.class_images(ldm, *args, tmp_path / "killed")
    (folder,) = (tmp_path / "killed").iterdir()
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:05d}.png" for i in range(8)]  # block 1 whole
    assert not list(folder.glob(".*"))  # no half-written file left behind
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    seen.clear()
    monkeypatch.setattr(prior, "generate", lambda *a, **k: (seen.append(a[1].seed), real(*a, **k))[1])
    images, texts, _, n_calls = prior.class_images(ldm, *args, tmp_path / "killed")
    assert n_calls == 1 and seen == [5 + 8]  # only block 2, seeded as in the uninterrupted run
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png") if p.name in before} == before
    assert torch.equal(images, whole[0]) and texts == whole[1]  # the same images as never killed


def test_each_step_trains_its_instance_rows_and_as_many_class_rows_and_logs_both_losses(sd_folder, prompts, tmp_path):
    # which class images: every pass over the N images is a permutation; a piece's rows are the batch's rows
    b = 8
    passes = math.lcm(N, b) // b
    seen = torch.cat([prior.class_rows(k, 0, b, b, N, 0) for k in range(passes)])
    assert all(sorted(seen[i : i + N].tolist()) == list(range(N)) for i in range(0, len(seen), N))
    assert torch.equal(prior.class_rows(3, 2, 6, b, N, 0), prior.class_rows(3, 0, b, b, N, 0)[2:6])
    # the class rows' draws are their own, not the instance rows' (same step, same seed)
    assert not torch.equal(prior.prior_random(0, 1, b, 0, b).randn(4), torch.randn(b, 4, generator=step_generator(0, 1)))
    # loss = instance + λ·prior, both logged at every step
    out = tmp_path / "run"
    assert train(sd_folder, prompts, out, "--set", "finetune.train=lora", weight=0.25, steps=3) == 0
    lines = log(out)
    assert len(lines) == 3
    for line in lines:
        assert line["prior_loss"] > 0 and line["instance_loss"] > 0
        assert line["loss"] == pytest.approx(line["instance_loss"] + 0.25 * line["prior_loss"], rel=1e-5)


def test_prior_settings_that_cannot_work_are_one_line(sd_folder, prompts, tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert train(sd_folder, missing, tmp_path / "a", "--set", "finetune.train=lora") == 2
    assert "nope.txt is not a file" in capsys.readouterr().err
    assert train(sd_folder, prompts, tmp_path / "b", "--set", "finetune.train=embedding",
                 "--set", "finetune.embedding.token=sks") == 2
    assert "not embedding" in capsys.readouterr().err


def test_unconditional_draws_join_the_class_images_for_the_class_rows_and_the_decoder_steps(
        sd_folder, prompts, tmp_path, monkeypatch):
    """`prior.unconditional` images the starting model draws from the empty prompt (cached like the class images)
    follow the N class images: the class rows train them with the empty prompt, and finetune.decoder_steps rehearses
    both sets (rows from `keep_from` on) beside the instance images, so a decoder taught a new concept keeps drawing
    the class, and every other kind of image, as the model drew it."""
    from ldmkit.train import finetune

    seen, rows = {}, []

    def spy(ae, images, mean, std, *a):
        seen.update(images=images, mean=mean, std=std, keep_from=a[-1])
        return 0.0

    real_rows = prior.class_rows
    monkeypatch.setattr(finetune, "finetune_decoder", spy)
    monkeypatch.setattr(prior, "class_rows", lambda *a: rows.append(a[4]) or real_rows(*a))
    cache = tmp_path / "d" / "class_images"
    assert train(sd_folder, prompts, tmp_path / "d", "--set", "finetune.train=lora", "--set", "finetune.decoder_steps=2",
                 "--set", "data.length=16", steps=1, unconditional=3) == 0
    assert len(list(cache.iterdir())) == 2  # the class images' folder and the draws'
    model = load_any(sd_folder)
    classes = prior.class_images(model, prior.read_prompts(str(prompts)), N, 0, 2, 5.0, 16, cache)[0]
    draws, texts, _, calls = prior.class_images(model, [""], 3, 0, 2, 1.0, 16, cache)
    images, k = seen["images"], seen["keep_from"]
    assert calls == 0 and texts == ["", "", ""]  # cached by the run
    assert len(images) == len(seen["mean"]) == len(seen["std"]) == k + N + 3 and k > 0
    assert torch.equal(images[k:k + N], classes) and torch.equal(images[k + N:], draws)
    assert not torch.equal(draws[0], draws[1])  # three draws, not one image thrice
    assert rows and set(rows) == {N + 3}  # the class rows pick among the class images and the draws

    seen.clear()  # 0: the class images alone
    assert train(sd_folder, prompts, tmp_path / "e", "--set", "finetune.train=lora", "--set", "finetune.decoder_steps=2",
                 "--set", "data.length=16", steps=1) == 0
    assert len(seen["images"]) == seen["keep_from"] + N
