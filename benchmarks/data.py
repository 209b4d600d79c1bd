"""Training on collections bigger than memory: peak memory, start-up time and loader throughput.

Builds test collections from the bundled photographs (scikit-image): random square crops of 256-768 px,
re-encoded as JPEG, PNG or WebP in turn, each captioned by its photograph and the crop's place ("a crop
from the top left of the astronaut photograph"). The first N_small images of the big collection (hard
links) make the small one, as a folder and as tar shards (`ldmkit data make-shards`). Then for each
collection and source it runs, as a subprocess of its own:

    ldmkit train-autoencoder   the `tiny` first stage at 64 px (batch 16), data read lazily by DataLoader workers
    ldmkit train               the `tiny` text-to-image U-Net at 64 px (batch 32) on that first stage, encoding
                               each batch

Small models on purpose: the less time a step takes, the harder the loader is pressed to keep up.

and reports for each run the peak memory of the whole process tree (proportional set size, so pages
shared between the trainer and its workers count once; and the trainer's own peak RSS), the time from
launch to the first optimizer step, and the images/s the step consumed. It also times the loader alone
(no model: what the workers can deliver) and the built-in in-memory path against the lazy one.

    python benchmarks/data.py --out /tmp/ldmkit-data-bench                 # 2,000 and 20,000 images
    python benchmarks/data.py --out /tmp/b --sizes 200 2000 --steps 50     # a quick look
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "retina", "color"]
PLACES = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "centre",
          (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}


def _photo(name: str):
    import skimage.data
    from PIL import Image

    path = Path(skimage.data.__file__).parent / next(f for f in os.listdir(Path(skimage.data.__file__).parent)
                                                      if f.split(".")[0] == name)
    return Image.open(path).convert("RGB")


def _make(args: tuple[str, int, int]) -> dict:
    """Image i of the collection: a pure function of i."""
    root, i, seed = args
    rng = np.random.default_rng([seed, i])
    fmt = ("jpg", "png", "webp")[i % 3]
    file = f"{i // 1000:03d}/{i:06d}.{fmt}"
    name = PHOTOS[int(rng.integers(len(PHOTOS)))]
    photo = _photo(name)
    w, h = photo.size
    side = int(rng.integers(256, 769))
    if side > min(w, h):  # small photographs are enlarged first, as a scan would be
        scale = side / min(w, h)
        photo = photo.resize((int(w * scale) + 1, int(h * scale) + 1))
        w, h = photo.size
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    crop = photo.crop((x, y, x + side, y + side))
    place = PLACES[(min(2, 3 * (y + side // 2) // h), min(2, 3 * (x + side // 2) // w))]
    row = {"file_name": file, "text": f"a crop from the {place} of the {name.replace('_', ' ')} photograph"}
    if (Path(root) / file).is_file():  # an interrupted build resumes
        return row
    buf = io.BytesIO()
    if fmt == "jpg":
        crop.save(buf, format="JPEG", quality=90)
    elif fmt == "png":
        crop.save(buf, format="PNG", compress_level=1)
    else:
        crop.save(buf, format="WEBP", quality=85, method=0)
    (Path(root) / file).parent.mkdir(parents=True, exist_ok=True)
    (Path(root) / (file + ".tmp")).write_bytes(buf.getvalue())
    os.replace(Path(root) / (file + ".tmp"), Path(root) / file)
    return row


def build_collections(out: Path, sizes: list[int], procs: int) -> dict[int, Path]:
    big = max(sizes)
    root = out / f"folder-{big}"
    if not (root / "metadata.jsonl").is_file():
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with ProcessPoolExecutor(procs) as pool:
            rows = list(pool.map(_make, [(str(root), i, 0) for i in range(big)], chunksize=64))
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"built {big} images in {time.time() - t0:.0f} s "
              f"({sum(f.stat().st_size for f in root.rglob('*.*')) / 2**30:.2f} GiB)", flush=True)
    folders = {big: root}
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    for n in sizes:
        if n == big:
            continue
        small = out / f"folder-{n}"
        if not (small / "metadata.jsonl").is_file():
            for r in rows[:n]:
                (small / r["file_name"]).parent.mkdir(parents=True, exist_ok=True)
                if not (small / r["file_name"]).exists():
                    os.link(root / r["file_name"], small / r["file_name"])
            (small / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
        folders[n] = small
    return folders


# --- measuring a run -----------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _kib(path: str, key: str) -> int:
    try:
        for line in open(path):
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run `cmd`; poll the process tree's PSS every 0.2 s; return peak figures and the wall time."""
    t0 = time.time()
    with open(log.with_suffix(".out"), "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        peak_pss, hwm = 0, 0
        while proc.poll() is None:
            pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in _tree(proc.pid))
            peak_pss = max(peak_pss, pss)
            hwm = max(hwm, _kib(f"/proc/{proc.pid}/status", "VmHWM:"))
            time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log.with_suffix('.out')}")
    return {"wall_s": round(time.time() - t0, 1), "peak_tree_pss_mib": round(peak_pss / 1024),
            "peak_main_rss_mib": round(hwm / 1024), "t0": t0}


def first_step_and_rate(out: Path, t0: float, batch: int) -> tuple[float, float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    first = steps[0]["time"] - t0
    # consumption after warm-up: from the second logged step to the last
    a, b = steps[1], steps[-1]
    return round(first, 1), round((b["step"] - a["step"]) * batch / max(b["time"] - a["time"], 1e-9), 1)


def loader_throughput(data: str, size: int, batch: int, workers: int, batches: int) -> float:
    """Images/s the lazy loader alone delivers (no model), after its first batch."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from ldmkit.train.config import DataConfig
    from ldmkit.train.data import open_train_data
    from ldmkit.train.distributed import Dist

    d = DataConfig(dataset=data, size=size, in_memory=False, workers=workers, crop="random")
    source = open_train_data(d, batch, 0, Dist(), 1, progress=False)
    source.batch(0, 0, batch)
    t = time.time()
    for step in range(1, batches + 1):
        source.batch(step, 0, batch)
    rate = batches * batch / (time.time() - t)
    source.close()
    return round(rate, 1)


def memory_vs_lazy(ldmkit: list[str], folder: Path, out: Path, steps: int, workers: int) -> dict:
    """The same first-stage run from the folder held in memory and read lazily, alternated twice: the
    in-memory fast path's images/s against the workers'."""
    rates: dict[str, list[float]] = {"in memory": [], "lazy": []}
    for _ in range(2):
        for label, flag in (("in memory", "true"), ("lazy", "false")):
            run = out / "runs" / f"cmp-{flag}"
            shutil.rmtree(run, ignore_errors=True)
            m = run_measured([*ldmkit, "train-autoencoder", "--config", "tiny", "--out", str(run), "--quiet",
                              "--data", str(folder), "--set", f"optim.steps={steps}", "--set", "logging.log_every=1",
                              "--set", f"data.in_memory={flag}", "--set", f"data.workers={workers}",
                              "--set", "data.size=64", "--set", "optim.batch_size=16", "--set", "latent_stat_batches=1",
                              "--set", f"logging.val_every={steps}", "--set", f"logging.ckpt_every={steps}"],
                             run.with_suffix(".log"))
            rates[label].append(first_step_and_rate(run, m["t0"], 16)[1])
    return {k: round(sum(v) / len(v), 1) for k, v in rates.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="processes building the collection")
    p.add_argument("--only-memory-vs-lazy", action="store_true", help="just compare the in-memory path with the lazy one")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    folders = build_collections(out, a.sizes, a.procs)
    ldmkit = [sys.executable, "-m", "ldmkit.cli"]
    (out / "runs").mkdir(exist_ok=True)
    if a.only_memory_vs_lazy:
        print("images/s, first stage at 64 px on", min(a.sizes), "images:",
              json.dumps(memory_vs_lazy(ldmkit, folders[min(a.sizes)], out, a.steps, a.workers)))
        return
    results: list[dict] = []
    for n in sorted(a.sizes):
        shards = out / f"shards-{n}"
        if not shards.is_dir():
            subprocess.run([*ldmkit, "data", "make-shards", str(folders[n]), str(shards), "--shard-size", "500",
                            "--quiet"], check=True)
        t = time.time()
        subprocess.run([*ldmkit, "data", "check", str(folders[n]), "--size", "64"], check=True, capture_output=True)
        index_s = round(time.time() - t, 1)  # once the index exists: the reuse cost
        for source, data in (("folder", str(folders[n])), ("shards", str(shards))):
            common = ["--quiet", "--data", data, "--set", f"optim.steps={a.steps}", "--set", "logging.log_every=1",
                      "--set", "data.in_memory=false", "--set", f"data.workers={a.workers}", "--set", "data.crop=random",
                      "--set", f"logging.val_every={a.steps}", "--set", f"logging.ckpt_every={a.steps}"]
            ae_out = out / "runs" / f"ae-{source}-{n}"
            shutil.rmtree(ae_out, ignore_errors=True)
            m = run_measured([*ldmkit, "train-autoencoder", "--config", "tiny", "--out", str(ae_out), *common,
                              "--set", "data.size=64", "--set", "optim.batch_size=16", "--set", "data.val_images=64",
                              "--set", "latent_stat_batches=4"], ae_out.with_suffix(".log"))
            first, rate = first_step_and_rate(ae_out, m["t0"], 16)
            results.append({"stage": "autoencoder", "source": source, "images": n, "index_reuse_s": index_s,
                            "first_step_s": first, "step_images_per_s": rate, **{k: v for k, v in m.items() if k != "t0"}})
            print(json.dumps(results[-1]), flush=True)
            ldm_out = out / "runs" / f"ldm-{source}-{n}"
            shutil.rmtree(ldm_out, ignore_errors=True)
            m = run_measured([*ldmkit, "train", "--config", "tiny", "--autoencoder", str(ae_out), "--out", str(ldm_out),
                              *common, "--set", "data.size=64", "--set", "conditioner.num_classes=0",
                              "--set", "unet.num_classes=0", "--set", "optim.batch_size=32", "--set", "sample.num=4"],
                             ldm_out.with_suffix(".log"))
            first, rate = first_step_and_rate(ldm_out, m["t0"], 32)
            results.append({"stage": "diffusion", "source": source, "images": n, "index_reuse_s": index_s,
                            "first_step_s": first, "step_images_per_s": rate, **{k: v for k, v in m.items() if k != "t0"}})
            print(json.dumps(results[-1]), flush=True)
    big, small = max(a.sizes), min(a.sizes)
    loader = {}
    for source, data in (("folder", str(folders[big])), ("shards", str(out / f"shards-{big}"))):
        for w in (1, a.workers):
            loader[f"{source}, {w} worker{'s' if w > 1 else ''}"] = loader_throughput(data, 64, 32, w, 40)
    print("\nloader alone (images/s at 64 px, random crops):", json.dumps(loader))
    print("\n| stage | source | images | first step (s) | step consumes (img/s) | peak tree PSS (MiB) | trainer peak RSS (MiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['stage']} | {r['source']} | {r['images']:,} | {r['first_step_s']} | {r['step_images_per_s']} | "
              f"{r['peak_tree_pss_mib']} | {r['peak_main_rss_mib']} |")
    print("\ngrowth of peak tree PSS from", small, "to", big, "images:")
    for stage in ("autoencoder", "diffusion"):
        for source in ("folder", "shards"):
            s = next(r for r in results if (r["stage"], r["source"], r["images"]) == (stage, source, small))
            b = next(r for r in results if (r["stage"], r["source"], r["images"]) == (stage, source, big))
            print(f"  {stage:11s} {source:6s}: {100 * (b['peak_tree_pss_mib'] / s['peak_tree_pss_mib'] - 1):+.1f} %")
    (out / "results.json").write_text(json.dumps({"runs": results, "loader": loader}, indent=2))


if __name__ == "__main__":
    main()
