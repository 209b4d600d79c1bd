"""The on-disk latent cache: reuse, parity with encode_dataset, the key, unfinished and damaged folders, ranks."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from ldmkit.autoencoder import AutoencoderConfig, AutoencoderKL
from ldmkit.errors import LdmkitError
from ldmkit.data.tensors import TensorData
from ldmkit.train.latents import INDEX, cache_key, cached_latents

N = 10


def tiny_ae(seed: int = 0, **kw) -> AutoencoderKL:
    base = dict(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4)
    base.update(kw)
    torch.manual_seed(seed)
    return AutoencoderKL(AutoencoderConfig(**base)).eval()


def images(n: int = N, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def count_encodes(monkeypatch, ae: AutoencoderKL) -> list[int]:
    """Wrap ae.encode; the returned list grows by one per call."""
    calls, encode = [], ae.encode

    def counted(x):
        calls.append(len(x))
        return encode(x)

    monkeypatch.setattr(ae, "encode", counted)
    return calls


def test_built_once_then_read_without_encoding(tmp_path, monkeypatch):
    ae, x = tiny_ae(), images()
    calls = count_encodes(monkeypatch, ae)
    mean, std = cached_latents(ae, x, tmp_path, batch_size=4, progress=False)
    assert calls == [4, 4, 2]
    assert mean.shape == std.shape == (N, 4, 4, 4) and mean.dtype == std.dtype == torch.float32
    assert mean.device.type == "cpu" and (std > 0).all()
    folder = tmp_path / cache_key(ae, x)
    assert sorted(p.name for p in folder.iterdir()) == [INDEX, "shard_00000.safetensors"]
    index = json.loads((folder / INDEX).read_text())
    assert index["count"] == N and index["num_shards"] == 1 and index["latent_shape"] == [4, 4, 4]
    assert index["ingredients"]["images"]["shape"] == [N, 3, 16, 16]
    assert index["ingredients"]["augmentation"] == "none"

    mean2, std2 = cached_latents(ae, x, tmp_path, batch_size=4, progress=False)
    assert len(calls) == 3  # read from disk, nothing encoded
    assert torch.equal(mean, mean2) and torch.equal(std, std2)


@pytest.mark.parametrize("batch_size", [3, 128])
def test_bit_identical_to_encode_dataset(tmp_path, batch_size):
    from ldmkit.train.latents import encode_dataset

    ae, x = tiny_ae(), images()
    data = TensorData(images=x, labels=torch.full((N,), -1), texts=[""] * N)
    ref_mean, ref_std = encode_dataset(ae, data, batch_size=batch_size, progress=False)
    built = cached_latents(ae, x, tmp_path, batch_size=batch_size, progress=False)
    read = cached_latents(ae, x, tmp_path, batch_size=batch_size, progress=False)
    for mean, std in (built, read):
        assert torch.equal(mean, ref_mean.cpu()) and torch.equal(std, ref_std.cpu())


def test_several_shards_give_the_same_result(tmp_path):
    ae, x = tiny_ae(), images()
    one = cached_latents(ae, x, tmp_path / "a", batch_size=4, progress=False)
    built = cached_latents(ae, x, tmp_path / "b", shard_size=3, batch_size=4, progress=False)
    folder = tmp_path / "b" / cache_key(ae, x)
    index = json.loads((folder / INDEX).read_text())
    assert [(s["file"], s["start"], s["stop"]) for s in index["shards"]] == [
        ("shard_00000.safetensors", 0, 3), ("shard_00001.safetensors", 3, 6),
        ("shard_00002.safetensors", 6, 9), ("shard_00003.safetensors", 9, 10)]
    read = cached_latents(ae, x, tmp_path / "b", shard_size=7, progress=False)  # the index's shard size wins
    for mean, std in (built, read):
        assert torch.equal(mean, one[0]) and torch.equal(std, one[1])


def test_key_is_deterministic():
    ae, x = tiny_ae(), images()
    same = tiny_ae()  # same seed: same weights, a different object
    assert cache_key(ae, x) == cache_key(same, x.clone()) == cache_key(ae, x, "none")
    assert len(cache_key(ae, x)) == 32 and int(cache_key(ae, x), 16) >= 0


def test_one_changed_weight_gives_a_new_key_and_a_rebuild(tmp_path, monkeypatch):
    ae, x = tiny_ae(), images()
    old = cached_latents(ae, x, tmp_path, progress=False)
    old_key = cache_key(ae, x)
    with torch.no_grad():
        ae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    new_key = cache_key(ae, x)
    assert new_key != old_key
    calls = count_encodes(monkeypatch, ae)
    new = cached_latents(ae, x, tmp_path, progress=False)
    assert calls and not torch.equal(new[0], old[0])
    assert {p.name for p in tmp_path.iterdir()} == {old_key, new_key}
    # buffers and the config are part of the model too
    assert cache_key(tiny_ae(scaling_factor=0.5), x) != cache_key(tiny_ae(), x)


def test_images_size_order_and_content_change_the_key():
    ae, x = tiny_ae(), images()
    key = cache_key(ae, x)
    assert cache_key(ae, F.interpolate(x, size=32, mode="bilinear")) != key  # resolution
    assert cache_key(ae, x[:, :, 2:14, 2:14]) != key  # crop
    assert cache_key(ae, x.flip(0)) != key  # order
    assert cache_key(ae, x[:-1]) != key  # one image fewer
    y = x.clone()
    y[3, 1, 5, 5] += 1e-6
    assert cache_key(ae, y) != key


def test_augmentation_changes_the_key(tmp_path):
    ae, x = tiny_ae(), images()
    assert cache_key(ae, x, "hflip") != cache_key(ae, x, "none")
    cached_latents(ae, x, tmp_path, augmentation="none", progress=False)
    cached_latents(ae, x, tmp_path, augmentation="hflip", progress=False)
    assert len(list(tmp_path.iterdir())) == 2
    index = json.loads((tmp_path / cache_key(ae, x, "hflip") / INDEX).read_text())
    assert index["ingredients"]["augmentation"] == "hflip"


def test_unfinished_folder_is_rebuilt(tmp_path, monkeypatch):
    ae, x = tiny_ae(), images()
    ref = cached_latents(ae, x, tmp_path, shard_size=4, progress=False)
    folder = tmp_path / cache_key(ae, x)
    (folder / INDEX).unlink()  # as if the run was killed before the index was written
    (folder / "shard_00001.safetensors").write_bytes(b"half a shard")
    (folder / ".shard_00002.safetensors.tmp123").write_bytes(b"a temp file")
    calls = count_encodes(monkeypatch, ae)
    again = cached_latents(ae, x, tmp_path, shard_size=4, progress=False)
    assert calls
    assert torch.equal(again[0], ref[0]) and torch.equal(again[1], ref[1])
    assert sorted(p.name for p in folder.iterdir()) == [INDEX] + [f"shard_0000{i}.safetensors" for i in range(3)]
    calls.clear()
    cached_latents(ae, x, tmp_path, progress=False)
    assert not calls


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete"])
def test_damaged_shard_is_refused_with_its_name(tmp_path, damage):
    ae, x = tiny_ae(), images()
    cached_latents(ae, x, tmp_path, shard_size=4, progress=False)
    folder = tmp_path / cache_key(ae, x)
    shard = folder / "shard_00001.safetensors"
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        shard.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    else:
        shard.unlink()
    with pytest.raises(LdmkitError, match=r"shard_00001\.safetensors is damaged .*delete the folder") as e:
        cached_latents(ae, x, tmp_path, progress=False)
    assert "\n" not in str(e.value)


def test_damaged_index_is_refused(tmp_path):
    ae, x = tiny_ae(), images()
    cached_latents(ae, x, tmp_path, progress=False)
    index = tmp_path / cache_key(ae, x) / INDEX
    doc = json.loads(index.read_text())
    doc["count"] = N + 1
    index.write_text(json.dumps(doc))
    with pytest.raises(LdmkitError, match=r"index\.json is damaged \(11 items, expected 10\)"):
        cached_latents(ae, x, tmp_path, progress=False)
    index.write_text("{")
    with pytest.raises(LdmkitError, match=r"index\.json is damaged \(JSONDecodeError"):
        cached_latents(ae, x, tmp_path, progress=False)


def test_bad_image_size_is_a_user_error(tmp_path):
    with pytest.raises(LdmkitError, match="not divisible by the autoencoder's factor 4"):
        cached_latents(tiny_ae(), images(size=18), tmp_path, progress=False)
    with pytest.raises(LdmkitError, match="empty"):
        cached_latents(tiny_ae(), images(n=0), tmp_path, progress=False)


class FakeDist:
    """torch.distributed as seen by one rank of a 2-process job, with barrier calls counted."""

    def __init__(self, monkeypatch, rank: int):
        self.barriers = 0
        d = torch.distributed
        monkeypatch.setattr(d, "is_initialized", lambda: True)
        monkeypatch.setattr(d, "get_rank", lambda group=None: rank)
        monkeypatch.setattr(d, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(d, "get_backend", lambda group=None: "gloo")
        monkeypatch.setattr(d, "barrier", self.barrier)

    def barrier(self, *args, **kwargs):
        self.barriers += 1


def test_rank_zero_builds_other_ranks_wait_then_read(tmp_path, monkeypatch):
    ae, x = tiny_ae(), images()
    calls = count_encodes(monkeypatch, ae)
    rank1 = FakeDist(monkeypatch, rank=1)
    with pytest.raises(LdmkitError, match="rank 1: no latent cache .* same"):  # rank 0 built nothing
        cached_latents(ae, x, tmp_path, progress=False)
    assert rank1.barriers == 1 and not calls and not any(tmp_path.iterdir())

    rank0 = FakeDist(monkeypatch, rank=0)
    built = cached_latents(ae, x, tmp_path, progress=False)
    assert rank0.barriers == 1 and calls  # the barrier comes after the build
    calls.clear()
    rank1 = FakeDist(monkeypatch, rank=1)
    read = cached_latents(ae, x, tmp_path, progress=False)
    assert rank1.barriers == 1 and not calls
    assert torch.equal(read[0], built[0]) and torch.equal(read[1], built[1])
    rank0 = FakeDist(monkeypatch, rank=0)
    cached_latents(ae, x, tmp_path, progress=False)
    assert rank0.barriers == 1 and not calls  # a complete cache still meets the other ranks at the barrier


def _rank_main(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=2)
    try:
        ae, x = tiny_ae(), images()
        calls = []
        encode = ae.encode
        ae.encode = lambda b: calls.append(len(b)) or encode(b)
        mean, std = cached_latents(ae, x, f"{root}/cache", progress=False)
        torch.save({"mean": mean, "std": std, "calls": len(calls)}, f"{root}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_available(), reason="gloo with fork")
def test_two_real_ranks_share_one_build(tmp_path):
    torch.multiprocessing.start_processes(_rank_main, args=(str(tmp_path),), nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["calls"] > 0 and r1["calls"] == 0
    assert torch.equal(r0["mean"], r1["mean"]) and torch.equal(r0["std"], r1["std"])
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_mean_latents_are_the_posterior_mean_and_leave_the_steps_later_draws_unchanged():
    from ldmkit.train.config import OptimConfig
    from ldmkit.train.latents import sample_latents

    g = torch.Generator().manual_seed(3)
    mean, std = torch.randn(4, 4, 2, 2, generator=g), torch.rand(4, 4, 2, 2, generator=g) + 0.5  # rows 2-5 of 8
    o = OptimConfig(batch_size=8, seed=5)
    r_s, z_s = sample_latents(mean, std, o, 7, 2, 6, 0.1, 0.5)
    r_m, z_m = sample_latents(mean, std, o, 7, 2, 6, 0.1, 0.5, "mean")
    torch.testing.assert_close(z_m, (mean - 0.1) * 0.5)  # no draw in z0
    eps = (z_s / 0.5 + 0.1 - mean) / std  # the sampled rows' noise: a standard normal draw, not zero
    assert eps.abs().mean() > 0.3
    assert torch.equal(r_s.randn(3), r_m.randn(3))  # the noise and t drawn after it are the same either way
