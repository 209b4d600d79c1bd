"""Faults mid-run for the long commands: SIGKILL at a random moment, a full disk, a file-size limit.

After each fault, what was written before is intact (checkpoints, the latent cache, converted
folders, sample PNGs) and the rerun ends exactly where an uninterrupted run ends. The kill moments
are drawn from a seeded generator (printed on failure), so a failure can be replayed.
"""

import contextlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldmkit.checkpoint import resolve
from ldmkit.cli import main

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "ldmkit.cli"]
AE_ARGS = ["train-autoencoder", "--config", "tiny", "--quiet", "--set", "logging.val_every=1000"]


def weights(folder: Path, name: str = "model.safetensors") -> dict:
    return load_file(str(resolve(folder) / name))


def assert_same_weights(a: Path, b: Path, name: str = "model.safetensors") -> None:
    wa, wb = weights(a, name), weights(b, name)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def kill_at_random(cmd: list[str], delay: float, ready=lambda: True, timeout: float = 120) -> int | None:
    """Start `cmd`, wait until `ready()` then `delay` more seconds, SIGKILL it; the exit code if it had
    already finished by then (the kill came too late), else None."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            return proc.returncode
        assert time.time() - t0 < timeout, "the command never became ready"
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGKILL)  # no handler runs: only atomic writes can save the outputs
    proc.wait()
    return None


@contextlib.contextmanager
def small_filesystem(path: Path, size_kb: int):
    """A tmpfs of `size_kb` KiB mounted at `path` (needs root, as in CI's container; skipped otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize_filesystem(path: Path, size_kb: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_kb}k", str(path)], check=True, capture_output=True)


def test_full_disk_during_training_keeps_checkpoints_and_resume_finishes_the_run(tmp_path):
    """The tiny autoencoder's checkpoint is ~0.9 MB: a 2.3 MB disk holds two, and the third (the final
    save) fills it. The run stops with one line, `latest` names the last complete checkpoint, and after
    the disk is enlarged `--resume` ends on the uninterrupted run's weights."""
    sets = ["--set", "optim.steps=6", "--set", "logging.ckpt_every=2", "--set", "logging.keep_checkpoints=3"]
    ref = tmp_path / "ref"
    assert subprocess.run([*CLI, *AE_ARGS, *sets, "--out", str(ref)], capture_output=True).returncode == 0
    with small_filesystem(tmp_path / "disk", 2300) as disk:
        out = disk / "run"
        r = subprocess.run([*CLI, *AE_ARGS, *sets, "--out", str(out)], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "disk is full" in lines[0] and "--resume" in lines[0], r.stderr
        assert (out / "latest").read_text().strip() == "step_00000004"
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no half checkpoint left
        ckpt = resolve(out)
        assert json.loads((ckpt / "config.json").read_text())["step"] == 4 and weights(out)
        resize_filesystem(disk, 8000)
        r = subprocess.run([*CLI, *AE_ARGS, *sets, "--out", str(out), "--resume"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert_same_weights(out, ref)


def test_file_size_limit_while_sampling_is_one_line_and_leaves_no_half_files(tmp_path):
    """A per-file size limit (RLIMIT_FSIZE, no root needed) makes every write past it fail with EFBIG,
    as a full disk does: `sample` reports it in one line, exit 2, and leaves no partial PNG."""
    ae = tmp_path / "ae"
    assert main([*AE_ARGS, "--out", str(ae), "--set", "optim.steps=2"]) == 0
    ldm = tmp_path / "ldm"
    assert main(["train", "--config", "tiny", "--autoencoder", str(ae), "--out", str(ldm), "--quiet",
                 "--set", "optim.steps=2", "--set", "conditioner.text_encoder=null", "--set", "unet.context_dim=null"]) == 0
    out = tmp_path / "samples"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))  # a 16 px PNG is < 1 KB, the grid is larger

    r = subprocess.run([*CLI, "sample", "--checkpoint", str(ldm), "--out", str(out), "--label", "1", "--num-per-prompt", "3",
                        "--steps", "2", "--quiet"], capture_output=True, text=True, preexec_fn=limit)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "disk is full" in r.stderr, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0000.png", "0001.png", "0002.png"]  # every sample written, complete; the grid refused whole
    for n in names:
        Image.open(out / n).load()


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_while_sampling_many_files_leaves_only_complete_pngs(tmp_path, seed):
    ae = tmp_path / "ae"
    assert main([*AE_ARGS, "--out", str(ae), "--set", "optim.steps=2"]) == 0
    ldm = tmp_path / "ldm"
    assert main(["train", "--config", "tiny", "--autoencoder", str(ae), "--out", str(ldm), "--quiet",
                 "--set", "optim.steps=2", "--set", "conditioner.text_encoder=null", "--set", "unet.context_dim=null"]) == 0
    args = ["sample", "--checkpoint", str(ldm), "--label", "1", "--num-per-prompt", "64", "--batch-size", "4",
            "--steps", "4", "--quiet"]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert main([*args, "--out", str(ref)]) == 0
    delay = random.Random(seed).uniform(0.0, 1.5)
    kill_at_random([*CLI, *args, "--out", str(out)], delay, ready=lambda: out.is_dir() and any(out.glob("*.png")))
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    for n in visible:  # each PNG there is whole, and the one the uninterrupted run wrote
        assert (out / n).read_bytes() == (ref / n).read_bytes(), (n, delay)
    # the rerun writes the full set, equal to the uninterrupted run
    assert main([*args, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(p.name for p in ref.iterdir())


@pytest.mark.parametrize("seed", [3])
def test_sigkill_during_train_control_then_resume_equals_uninterrupted(tmp_path, seed):
    ae, base = tmp_path / "ae", tmp_path / "base"
    assert main([*AE_ARGS, "--out", str(ae), "--set", "optim.steps=2"]) == 0
    assert main(["train", "--config", "tiny", "--autoencoder", str(ae), "--out", str(base), "--quiet",
                 "--set", "optim.steps=2"]) == 0
    args = ["train-control", "--config", "tiny", "--base", str(base), "--quiet", "--set", "optim.steps=12",
            "--set", "logging.ckpt_every=3"]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    # every run in a subprocess alike (see test_train's resume test on cross-process rounding)
    assert subprocess.run([*CLI, *args, "--out", str(ref)]).returncode == 0
    delay = random.Random(seed).uniform(0.0, 2.0)
    rc = kill_at_random([*CLI, *args, "--out", str(out)], delay, ready=lambda: (out / "latest").is_file())
    if rc is None:  # killed mid-run: resume from the last checkpoint
        assert subprocess.run([*CLI, *args, "--out", str(out), "--resume"]).returncode == 0, delay
    assert_same_weights(out, ref)


@pytest.mark.parametrize("seed", [4, 5])
def test_sigkill_during_latent_cache_build_then_rerun_builds_the_same_cache(tmp_path, seed):
    ae = tmp_path / "ae"
    assert main([*AE_ARGS, "--out", str(ae), "--set", "optim.steps=2"]) == 0

    def args(cache, out):
        return ["train", "--config", "tiny", "--autoencoder", str(ae), "--quiet", "--set", "optim.steps=1",
                "--set", "data.length=3000", "--set", f"data.latent_cache={cache}", "--set", "conditioner.text_encoder=null",
                "--set", "unet.context_dim=null", "--out", str(out)]

    # every run in a subprocess alike: float results of the encoder depend on the process's thread count
    assert subprocess.run([*CLI, *args(tmp_path / "ref_cache", tmp_path / "ref")]).returncode == 0
    cache = tmp_path / "cache"
    delay = random.Random(seed).uniform(0.0, 0.4)  # the build takes ~0.2 s once the folder exists
    kill_at_random([*CLI, *args(cache, tmp_path / "killed")], delay, ready=lambda: cache.is_dir())
    assert subprocess.run([*CLI, *args(cache, tmp_path / "rerun")]).returncode == 0, delay

    def shards(root: Path) -> dict:  # tensors, not bytes: the header's metadata order varies between processes
        return {p.relative_to(root).as_posix(): load_file(str(p)) for p in sorted(root.rglob("*.safetensors"))}

    got, want = shards(cache), shards(tmp_path / "ref_cache")
    assert got.keys() == want.keys() and got
    assert all(torch.equal(got[f][k], want[f][k]) for f in want for k in want[f])
    assert_same_weights(tmp_path / "rerun", tmp_path / "ref")


@pytest.mark.parametrize("seed", [6, 7])
def test_sigkill_during_convert_overwrite_keeps_old_or_new_output_whole(tmp_path, seed):
    pytest.importorskip("diffusers")
    ae = tmp_path / "ae"
    assert main([*AE_ARGS, "--out", str(ae), "--set", "optim.steps=2"]) == 0
    ldm = tmp_path / "ldm"
    assert main(["train", "--config", "tiny", "--autoencoder", str(ae), "--out", str(ldm), "--quiet",
                 "--set", "optim.steps=2", "--set", "unet.mid_attention=true"]) == 0  # diffusers' U-Net has it
    target = tmp_path / "diffusers"
    args = ["convert", "--from", str(ldm), "--to", str(target), "--format", "diffusers", "--overwrite"]
    assert main(args) == 0
    before = {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    (target / "unet" / "marker.txt").write_text("old")  # tells the old folder from a fresh one
    delay = random.Random(seed).uniform(0.0, 3.0)
    kill_at_random([*CLI, *args], delay)
    after = {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    if "unet/marker.txt" in after:  # the old output, untouched
        assert {k: v for k, v in after.items() if k != "unet/marker.txt"} == before, delay
    else:  # the new one, whole
        assert after == before, delay
    assert main(args) == 0
    import ldmkit

    out = ldmkit.load(target)
    ref = ldmkit.load(ldm)
    z = torch.randn(1, *ref.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10])
    cond = ref.conditioner(texts=["a red circle"], labels=torch.tensor([1]), batch_size=1)
    assert np.allclose(out.unet(z, t, cond).detach().numpy(), ref.unet(z, t, cond).detach().numpy(), atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".diffusers")]  # no temporary left after the rerun
