"""Collections that do not fit in memory: lazy folders, tar shards, Hugging Face datasets, latent shards.

The lazy paths must train exactly like the in-memory one on the same data, resume exactly (random crops
included), and streams must show each item once per epoch across processes and workers."""

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldmkit.checkpoint import WEIGHTS, resolve
from ldmkit.cli import main
from ldmkit.data.shards import ShardStream, list_shards, make_shards
from ldmkit.errors import LdmkitError
from ldmkit.generation.compat import sample as ldm_sample

AE = ["train-autoencoder", "--config", "tiny", "--quiet"]


def _image(rng, w, h):
    """A smooth random colour image (low frequencies, so crops differ visibly but compress well)."""
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """40 images of assorted sizes and formats, with captions, labels and a metadata.jsonl."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(40):
        w, h = int(rng.integers(20, 48)), int(rng.integers(20, 48))
        name = f"img{i:03d}." + ("png", "jpg", "webp")[i % 3]
        _image(rng, w, h).save(root / name)
        lines.append(json.dumps({"file_name": name, "text": f"photo {i % 5}", "label": i % 3}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _weights(out):
    return load_file(str(resolve(out) / WEIGHTS))


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lazy_folder_trains_exactly_like_the_in_memory_one(folder, tmp_path):
    """Same order (batch_indices), same decode, same crops: DataLoader workers change nothing but memory."""
    common = [*AE, "--data", str(folder), "--set", "optim.steps=4"]
    assert main([*common, "--out", str(tmp_path / "mem"), "--set", "data.in_memory=true"]) == 0
    assert main([*common, "--out", str(tmp_path / "lazy"), "--set", "data.in_memory=false", "--set", "data.workers=2"]) == 0
    assert _equal(_weights(tmp_path / "mem"), _weights(tmp_path / "lazy"))


def _rewind(out: Path, step: int):
    """The run folder as a kill just after checkpoint `step` leaves it."""
    for ck in (out / "checkpoints").iterdir():
        if int(ck.name.split("_")[1]) > step:
            shutil.rmtree(ck)
    (out / "latest").write_text(f"step_{step:08d}\n")


def _resumed_equals_whole(args, tmp_path):
    """Train `args` whole; copy the run, rewind it to its step-3 checkpoint (a kill), resume: same weights."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main([*args, "--out", str(whole)]) == 0
    shutil.copytree(whole, part)
    _rewind(part, 3)
    assert main([*args, "--out", str(part), "--resume"]) == 0
    assert _equal(_weights(whole), _weights(part))
    return whole


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_random_crops_resume_exactly(folder, tmp_path, source):
    """A run killed after step 3 and resumed ends with the uninterrupted run's weights: each item's random
    crop is a function of (seed, step, row), and a stream's reader places are checkpointed."""
    data = str(folder)
    if source == "shards":
        make_shards(str(folder), tmp_path / "shards", shard_size=5, progress=False)
        data = str(tmp_path / "shards" / "{00000..00007}.tar")
    args = [*AE, "--data", data, "--set", "data.crop=random", "--set", "data.in_memory=false",
            "--set", "data.workers=2", "--set", "logging.keep_checkpoints=5"]
    whole = _resumed_equals_whole(args, tmp_path)
    if source == "shards":  # every reader's place is in the checkpoint: 6 batches read, by 2 workers
        from ldmkit.checkpoint import load_training_state

        [place] = load_training_state(resolve(whole))["data"]
        assert place["batches"] == 6 and place["workers"] == 2 and len(place["slots"]) == 2


def _epoch_keys(shards, world, workers, batch, batches_per_rank):
    """Captions seen by each rank's DataLoader over `batches_per_rank` batches (captions name the item)."""
    from torch.utils.data import DataLoader

    seen = []
    for rank in range(world):
        stream = ShardStream(shards, 16, batch, rank=rank, world=world, workers=workers, split="all")
        loader = DataLoader(stream, batch_size=None, num_workers=stream.workers)
        it = iter(loader)
        for _ in range(batches_per_rank):
            seen += next(it)["text"]
    return seen


def _unique_folder(tmp_path, n):
    root = tmp_path / "uniq"
    root.mkdir()
    rng = np.random.default_rng(1)
    lines = []
    for i in range(n):
        _image(rng, 20, 20).save(root / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": f"item {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_each_item_of_an_epoch_is_seen_once_across_ranks_and_workers(tmp_path):
    """2 ranks x 2 workers over 8 shards of 6 items: one epoch = 48 items, each exactly once; the next
    epoch again each once (in another order)."""
    make_shards(str(_unique_folder(tmp_path, 48)), tmp_path / "s", shard_size=6, progress=False)
    shards = list_shards(str(tmp_path / "s"))
    seen = _epoch_keys(shards, world=2, workers=2, batch=6, batches_per_rank=4)  # 2 x 4 x 6 = 48
    assert Counter(seen) == Counter(f"item {i}" for i in range(48))
    two = _epoch_keys(shards, world=2, workers=2, batch=6, batches_per_rank=8)
    assert Counter(two) == Counter({f"item {i}": 2 for i in range(48)})
    assert two[:48] != two[48:]  # reshuffled


def test_stream_state_continues_the_same_sequence(tmp_path):
    """After c batches, a new stream built from the readers' checkpointed places yields exactly the
    batches the uninterrupted stream yields next (2 DataLoader workers: the slot rotation matters)."""
    from torch.utils.data import DataLoader

    make_shards(str(_unique_folder(tmp_path, 30)), tmp_path / "s", shard_size=4, progress=False)
    shards = list_shards(str(tmp_path / "s"))
    kw = dict(rank=0, world=1, workers=2, split="all", random_crop=True, seed=3)

    def batches(state, n):
        return [b for _, b in zip(range(n), DataLoader(ShardStream(shards, 16, 5, state=state, **kw),
                                                       batch_size=None, num_workers=2))]

    straight = batches(None, 9)
    state = {"batches": 0, "slots": {}}
    for b in straight[:5]:
        slot, epoch, k, offset = (int(v) for v in b["_pos"])
        state["batches"] += 1
        state["slots"][str(slot)] = [epoch, k, offset]
    resumed = batches(state, 4)
    for a, b in zip(straight[5:], resumed):
        assert a["text"] == b["text"] and torch.equal(a["image"], b["image"])


def test_make_shards_keeps_bytes_captions_and_labels(folder, tmp_path):
    paths = make_shards(str(folder), tmp_path / "s", shard_size=16, progress=False)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    import tarfile

    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
        assert "00000000.png" in names and "00000000.txt" in names and "00000000.cls" in names
        assert tar.extractfile("00000000.png").read() == (folder / "img000.png").read_bytes()
        assert tar.extractfile("00000001.txt").read().decode() == "photo 1"
        assert tar.extractfile("00000002.cls").read().decode() == "2"


def test_bad_shard_input_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(LdmkitError, match="does not exist"):
        list_shards(str(tmp_path / "{000..003}.tar"))
    with pytest.raises(LdmkitError, match="backwards"):
        list_shards(str(tmp_path / "{005..003}.tar"))
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "00000.tar").write_bytes(b"not a tar at all" * 100)
    rc = main([*AE, "--data", str(tmp_path / "s" / "00000.tar"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0 and "not a readable tar file" in err and "Traceback" not in err


def test_corrupt_image_in_a_lazy_source_names_it(folder, tmp_path, capsys):
    """A file that rots after the index was written is named when a worker meets it, without a traceback."""
    import tarfile

    make_shards(str(folder), tmp_path / "s", shard_size=40, progress=False)
    bad = tmp_path / "bad.tar"
    with tarfile.open(tmp_path / "s" / "00000.tar") as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith((".png", ".jpg", ".webp")):
                data = data[: len(data) // 3]  # truncated
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    rc = main([*AE, "--data", str(bad), "--out", str(tmp_path / "o"), "--set", "data.workers=1"])
    err = capsys.readouterr().err
    assert rc != 0 and "bad.tar:" in err and "--skip-bad-images" in err and "Traceback" not in err


def test_hugging_face_dataset_on_disk(folder, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_dict({"image": [str(folder / r["file_name"]) for r in rows],
                                     "caption": [r["text"] for r in rows], "label": [r["label"] for r in rows]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    from ldmkit.data.hf import HFImageDataset
    from ldmkit.data.folder import ImageFolderDataset

    hf = HFImageDataset(str(tmp_path / "hf"), 16, split="all")
    ref = ImageFolderDataset(str(folder), 16, split="all")
    assert len(hf) == len(ref) == 40 and hf.num_classes == 3
    for i in (0, 7, 39):  # the same pixels, caption and label as the folder it was made from
        a, b = hf[i], ref[i]
        assert a["text"] == b["text"] and a["label"] == b["label"] and torch.equal(a["image"], b["image"])
    train, val = HFImageDataset(str(tmp_path / "hf"), 16, "train"), HFImageDataset(str(tmp_path / "hf"), 16, "val")
    assert len(train) + len(val) == 40 and not set(train.rows) & set(val.rows)
    out = tmp_path / "run"
    assert main([*AE, "--data", str(tmp_path / "hf"), "--out", str(out), "--set", "data.in_memory=false",
                 "--set", "optim.steps=2"]) == 0
    with pytest.raises(LdmkitError, match="no column 'words'"):
        HFImageDataset(str(tmp_path / "hf"), 16, text_column="words")


def test_text_cache_limit_keeps_the_most_recent_captions():
    from ldmkit.conditioning.text import CachedTextEncoder

    class Toy(CachedTextEncoder):
        dim = 2

        def _encode(self, texts):
            return torch.ones(len(texts), 3, 2), torch.ones(len(texts), 3, dtype=torch.bool)

    enc = Toy()
    enc.cache_limit = 4
    for i in range(10):
        enc([f"caption {i}"])
    assert enc.cache_size() == 4 and list(enc._cache) == [f"caption {i}" for i in range(6, 10)]


@pytest.fixture(scope="module")
def folder_ae(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("folder_ae")
    assert main([*AE, "--data", str(folder), "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_encode_writes_resumable_latent_shards_that_train_like_the_images(folder, folder_ae, tmp_path, capsys):
    import ldmkit
    from ldmkit.data.folder import ImageFolderDataset
    from ldmkit.data.latent_shards import LatentShards

    lat = tmp_path / "lat"
    enc = ["encode", "--autoencoder", str(folder_ae), "--data", str(folder), "--out", str(lat), "--shard-size", "16",
           "--batch-size", "128", "--quiet"]
    assert main(enc) == 0
    ds = LatentShards(lat)
    train = ImageFolderDataset(str(folder), 16, "train")
    assert len(ds) == len(train) and [p.name for p in sorted(lat.glob("*.safetensors"))] == ["00000.safetensors",
                                                                                          "00001.safetensors", "00002.safetensors"]
    ae = ldmkit.load(str(folder_ae))
    with torch.no_grad():
        post = ae.encode(torch.stack([train[i]["image"] for i in (0, 17, len(train) - 1)]))
    for j, i in enumerate((0, 17, len(train) - 1)):
        item = ds[i]
        assert torch.allclose(item["mean"], post.mean[j], atol=1e-5) and torch.allclose(item["std"], post.std[j], atol=1e-5)
        assert item["text"] == train[i]["text"] and item["label"] == train[i]["label"]
    # a killed run: the last shard and the index missing; the rerun keeps the finished shards untouched
    first = (lat / "00000.safetensors").stat().st_mtime_ns
    (lat / "00002.safetensors").unlink()
    (lat / "latents.json").unlink()
    assert main(enc) == 0
    assert (lat / "00000.safetensors").stat().st_mtime_ns == first and (lat / "00002.safetensors").is_file()
    capsys.readouterr()

    # the second stage from the latent shards takes the same steps as from the images held in memory
    ldm = ["train", "--config", "tiny", "--autoencoder", str(folder_ae), "--quiet", "--set", "optim.steps=3",
           "--set", "conditioner.num_classes=3", "--set", "unet.num_classes=3"]
    assert main([*ldm, "--data", str(folder), "--out", str(tmp_path / "from_images")]) == 0
    assert main([*ldm, "--data", str(lat), "--out", str(tmp_path / "from_latents")]) == 0
    a, b = _weights(tmp_path / "from_images"), _weights(tmp_path / "from_latents")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4

    # latents of another first stage are refused by name
    other = tmp_path / "other_ae"
    assert main([*AE, "--out", str(other)]) == 0
    capsys.readouterr()
    rc = main(["train", "--config", "tiny", "--autoencoder", str(other), "--quiet", "--data", str(lat),
               "--out", str(tmp_path / "x"), "--set", "conditioner.num_classes=3", "--set", "unet.num_classes=3"])
    assert rc != 0 and "another first stage" in capsys.readouterr().err


@pytest.mark.slow
def test_lazy_folder_second_stage_encodes_on_the_fly_and_caches(folder, folder_ae, tmp_path):
    """A lazily read folder trains the second stage by encoding each batch; with data.latent_cache the
    collection is encoded once into the cache and later runs read it (the same weights either way)."""
    ldm = ["train", "--config", "tiny", "--autoencoder", str(folder_ae), "--quiet", "--data", str(folder),
           "--set", "optim.steps=3", "--set", "conditioner.num_classes=3", "--set", "unet.num_classes=3",
           "--set", "data.in_memory=false"]
    assert main([*ldm, "--out", str(tmp_path / "fly")]) == 0
    cache = tmp_path / "cache"
    assert main([*ldm, "--out", str(tmp_path / "c1"), "--set", f"data.latent_cache={cache}"]) == 0
    [made] = list(cache.iterdir())
    assert made.name.startswith("latents-") and (made / "latents.json").is_file()
    stamp = (made / "latents.json").stat().st_mtime_ns
    assert main([*ldm, "--out", str(tmp_path / "c2"), "--set", f"data.latent_cache={cache}"]) == 0
    assert (made / "latents.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    a, b, c = (_weights(tmp_path / n) for n in ("fly", "c1", "c2"))
    assert _equal(b, c)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("source", ["folder", "shards"])
def test_torchrun_ranks_see_each_item_of_an_epoch_once(tmp_path, source):
    """Under torchrun --nproc_per_node 2 (gloo), with 2 DataLoader workers per rank: over one epoch the two
    ranks together see every training item exactly once."""
    import os
    import subprocess
    import sys

    from ldmkit.data.folder import ImageFolderDataset

    root = _unique_folder(tmp_path, 48)
    train = {item.text for item in ImageFolderDataset(str(root), 16, "train").items}
    spec, batch = str(root), 4
    if source == "shards":
        make_shards(str(root), tmp_path / "s", shard_size=6, progress=False)
        spec = str(tmp_path / "s")
        # a stream's epoch is every training sample of every shard: read as many batches as that makes
        from ldmkit.data.shards import in_split, list_samples

        train = {f"item {int(k)}" for p in list_shards(spec) for k, _ in list_samples(p) if in_split(k, "train", 0.05)}
    steps = 2 * len(train) // batch  # two epochs' worth
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "data" / "stream_ranks.py"), spec, str(tmp_path), str(steps), str(batch)]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    seen = ranks[0]["seen"] + ranks[1]["seen"]
    first = [text for text, epoch in seen if epoch == 0]
    later = [text for text, epoch in seen if epoch == 1]
    assert len(first) == len(set(first)) and len(later) == len(set(later))  # nothing twice in an epoch
    if source == "shards":  # every reader streams the whole of its epoch 0
        assert sorted(first) == sorted(train)
        assert all(r["state"]["world"] == 2 and r["state"]["batches"] == steps for r in ranks)
    else:  # the step order: each epoch's full batches, a last partial batch dropped
        assert set(first) <= train and len(train) - len(first) < batch


def test_buckets_cover_the_area_and_each_batch_is_one_bucket():
    from ldmkit.data.buckets import BucketOrder, make_buckets, nearest

    buckets = make_buckets(64, 8)
    assert (64, 64) in buckets and (48, 88) in buckets and (88, 48) in buckets
    assert all(h % 8 == 0 and w % 8 == 0 and 0.5 <= w / h <= 2 and abs(h * w / 64**2 - 1) < 0.15 for h, w in buckets)
    assert buckets[nearest(200, 100, buckets)] == (48, 88) and buckets[nearest(100, 100, buckets)] == (64, 64)
    assignment = [i % 3 for i in range(30)]  # 10 items in each of 3 buckets
    order = BucketOrder(assignment, 3, 4, seed=0)
    assert order.per_epoch == 6  # 2 whole batches per bucket; 2 items of each wait for another epoch
    epoch = [order(s) for s in range(6)]
    for bucket, items in epoch:
        assert len(items) == 4 and {assignment[i] for i in items} == {bucket}
    flat = [i for _, items in epoch for i in items]
    assert len(flat) == len(set(flat)) == 24
    assert [order(s) for s in range(6, 12)] != epoch and order(7) == BucketOrder(assignment, 3, 4, seed=0)(7)


@pytest.mark.slow
def test_bucketed_training_keeps_aspect_ratios(tmp_path, capsys):
    """Wide and tall images train in their own buckets (every batch one shape), resume exactly, and the
    items record their original size and crop."""
    from ldmkit.data.folder import ImageFolderDataset

    root = tmp_path / "mixed"
    root.mkdir()
    rng = np.random.default_rng(2)
    for i in range(24):
        w, h = [(64, 32), (32, 64), (40, 40)][i % 3]
        _image(rng, w, h).save(root / f"{i:02d}.png")
    ds = ImageFolderDataset(str(root), 16, "all")
    item = ds.load(0, None, (8, 24))
    assert item["image"].shape == (3, 8, 24) and item["original_size_crop"].tolist() == [32, 64, 2, 0]
    args = [*AE, "--data", str(root), "--set", "data.buckets=true", "--set", "optim.batch_size=4",
            "--set", "data.crop=random", "--set", "logging.keep_checkpoints=5"]
    _resumed_equals_whole(args, tmp_path)
    rc = main([*AE, "--data", str(root), "--set", "data.buckets=[[10, 20]]", "--out", str(tmp_path / "bad")])
    assert rc != 0 and "bucket 10x20 is not a multiple of 4" in capsys.readouterr().err


@pytest.mark.slow
def test_encode_from_shards_and_make_shards_cli(folder, folder_ae, tmp_path, capsys):
    """`ldmkit data make-shards` then `ldmkit encode` from the shards: one latent shard per tar shard,
    holding that shard's training samples."""
    from ldmkit.data.latent_shards import LatentShards
    from ldmkit.data.shards import in_split, list_samples

    assert main(["data", "make-shards", str(folder), str(tmp_path / "s"), "--shard-size", "15", "--quiet"]) == 0
    assert "3 shards written" in capsys.readouterr().out
    assert main(["encode", "--autoencoder", str(folder_ae), "--data", str(tmp_path / "s" / "{00000..00002}.tar"),
                 "--out", str(tmp_path / "lat"), "--quiet"]) == 0
    ds = LatentShards(tmp_path / "lat")
    want = [k for p in list_shards(str(tmp_path / "s")) for k, _ in list_samples(p) if in_split(k, "train", 0.05)]
    assert len(ds) == len(want) and len(ds.shards) == 3 and ds[0]["mean"].shape == ds.shape


def test_micro_conditioning_vector():
    from ldmkit.conditioning import Conditioner
    from ldmkit.conditioning.conditioner import ConditionerConfig

    cond = Conditioner(ConditionerConfig(micro_conditioning=True, num_classes=3))
    assert cond.vector_dim == 6 * 256
    a = cond.default_size_crop(2, 64, 48)
    assert a.tolist() == [[64, 48, 0, 0, 64, 48]] * 2
    b = torch.tensor([[128.0, 96, 10, 0, 64, 48], [64, 48, 0, 0, 64, 48]])
    va, vb = cond(labels=torch.tensor([0, 1]), size_crop=a).vector, cond(labels=torch.tensor([0, 1]), size_crop=b).vector
    assert va.shape == (2, 1536) and not torch.equal(va[0], vb[0]) and torch.equal(va[1], vb[1])
    assert torch.equal(cond.uncond(2, a).vector, va)  # never dropped: the null branch keeps the sizes
    with pytest.raises(LdmkitError, match="size_crop"):
        cond(labels=torch.tensor([0, 1]))


@pytest.mark.slow
def test_buckets_with_micro_conditioning_train_and_sample(tmp_path, folder_ae):
    """The second stage on buckets with SDXL's size/crop route: the U-Net's vector route gets 6 x 256
    features per item from the recorded sizes; sampling fills in the uncropped default."""
    import ldmkit

    root = tmp_path / "mixed"
    root.mkdir()
    rng = np.random.default_rng(3)
    lines = []
    for i in range(24):
        w, h = [(64, 32), (32, 64), (40, 40)][i % 3]
        _image(rng, w, h).save(root / f"{i:02d}.png")
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "text": f"shape {i % 3}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "ldm"
    assert main(["train", "--config", "tiny", "--autoencoder", str(folder_ae), "--quiet", "--data", str(root),
                 "--out", str(out), "--set", "data.buckets=true", "--set", "optim.batch_size=4",
                 "--set", "conditioner.micro_conditioning=true", "--set", "conditioner.num_classes=0",
                 "--set", "unet.num_classes=0", "--set", "optim.steps=3"]) == 0
    ldm = ldmkit.load(str(out))
    assert ldm.unet.config.vector_dim == 1536
    images = ldm_sample(ldm, texts=["shape 0", "shape 1"], steps=2, seed=0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_build_dataset_reads_shards_for_evaluation(folder, tmp_path):
    """Commands that judge a model on its data (evaluate) get a stream's first held-out items."""
    from ldmkit.data import build_dataset
    from ldmkit.data.folder import ImageFolderDataset

    make_shards(str(folder), tmp_path / "s", shard_size=16, progress=False)
    everything = build_dataset(str(tmp_path / "s"), 16, "all")
    assert len(everything) == 40 and everything.num_classes == 3
    ref = ImageFolderDataset(str(folder), 16, "all")
    assert torch.equal(everything[5]["image"], ref[5]["image"]) and everything[5]["text"] == ref[5]["text"]
    assert len(build_dataset(str(tmp_path / "s"), 16, "all", length=7)) == 7


def test_source_fingerprint_follows_parquet_files_by_absolute_pattern(tmp_path):
    """The latent cache's key for parquet files named by an absolute pattern (Path.glob refuses those)."""
    import os

    from ldmkit.train.encode import source_fingerprint

    (tmp_path / "a.parquet").write_bytes(b"x")
    first = source_fingerprint(str(tmp_path / "*.parquet"))
    (tmp_path / "b.parquet").write_bytes(b"y")
    assert source_fingerprint(str(tmp_path / "*.parquet")) != first
    os.remove(tmp_path / "b.parquet")
    assert source_fingerprint(str(tmp_path / "*.parquet")) == first
