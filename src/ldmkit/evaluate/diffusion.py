"""`ldmkit evaluate` for a diffusion checkpoint: does it obey its conditions?

What can be judged depends on the data the model learned (the checkpoint's `meta["dataset"]`, or
`--data`); nothing is scored against a judge that does not know the model's data:

- any dataset: the held-out denoising error, E‖ε̂(z_t, t, c) − ε‖² on the validation split over a
  fixed grid of timesteps and seeded noise, with the true conditions and with every route at its
  null value. A model that uses its caption or class predicts the noise better when it is given it,
  so `gain = null / conditional > 1` measures how much the condition is used, on any data. A model
  trained with a loss mask (`data.mask`, recorded in its meta) is scored as it trained: the squared
  error weighted by the mask area-averaged to the latent grid, per image over its mask's mass.
- `shapes`: every caption (text route) or every class id (label route: shape × colour) is sampled at
  several seeds and the independent attribute checker reads colour, position and shape back; beside the
  shape class, the strict shape rate: the right class and drawn right (the ideal shape fitted to the
  sample: IoU, solidity, corners; `ldmkit.evaluate.attributes.shape_fidelity`).
- `digits` (10 classes): an SVM trained on the real digits reads each sample's class.
Anything else is said in one line (`res["not_judged"]`) instead of given a meaningless figure.
A report with the sample grids is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ldmkit.data import build_dataset
from ldmkit.data.shapes import COLOURS, SHAPES, SHAPES_DATASETS, all_captions, combos, is_new
from ldmkit.data.tensors import materialize
from ldmkit.diffusion.parameterization import to_x0_eps
from ldmkit.diffusion.schedules import q_sample
from ldmkit.errors import LdmkitError
from ldmkit.evaluate.attributes import check_attributes, score_captions, shape_fidelity
from ldmkit.generation import GenerationRequest, generate
from ldmkit.pipeline import latent_loss_mask
from ldmkit.imageio import save_grid

HELDOUT_T = (50, 200, 400, 600, 800, 950)  # timesteps of the held-out error, spread over the 1000-step range


@torch.no_grad()
def evaluate_diffusion(ldm, out: str | Path, seeds: int = 2, steps: int = 25, sampler: str = "dpmpp_2m",
                       guidance: float = 2.0, batch_size: int = 72, dataset: str | None = None,
                       num_images: int = 128, seed: int = 0, vocabulary: str = "basic",
                       sampler_options: dict | None = None, mask: str = "none") -> dict:
    """Judge `ldm` on what its training data allows (see the module docstring); `dataset` is the
    name or folder it was trained on (None: unknown, so only samples are written). `vocabulary`:
    shapes' words; "extended" judges all 112 captions and reports the 40 with white and/or diamond
    (`text_new`) apart from the 72 basic ones (`text_basic`). `mask`: the data.mask the model trained with; the
    held-out error is then weighted by the held-out images' masks."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cc = ldm.config.conditioner
    res: dict = {"dataset": dataset, "steps": steps, "sampler": sampler, "guidance": guidance, "seeds": seeds,
                 "not_judged": []}
    kw = dict(steps=steps, sampler=sampler, guidance=guidance,  # GenerationRequest fields
              sampler_options=dict(sampler_options or {}))  # e.g. an lcm student's grid_steps
    grids: list[tuple[str, str]] = []  # (caption, file) of grids shown without a score
    data = held_out(ldm, dataset, num_images, seed, mask) if dataset else None
    if data is not None:
        res["heldout"] = heldout_error(ldm, data, seed=seed)
    else:
        res["not_judged"].append("held-out denoising error: the checkpoint does not record its training data; "
                                 "pass --data NAME_OR_FOLDER")
    if cc.text_encoder:
        if dataset in SHAPES_DATASETS:
            caps = all_captions(vocabulary)
            images = torch.cat([_draw(ldm, 1000 * s + i, texts=caps[i : i + batch_size], **kw)
                                for s in range(seeds) for i in range(0, len(caps), batch_size)])
            res["text"] = score_captions(images, caps * seeds, vocabulary, strict=True)
            if vocabulary != "basic":  # the new words, and what the original captions kept
                new = torch.tensor([is_new(c) for c in combos(vocabulary)] * seeds)
                for key, keep in (("text_new", new), ("text_basic", ~new)):
                    res[key] = score_captions(images[keep], [c for c, k in zip(caps * seeds, keep) if k], vocabulary,
                                              strict=True)
            save_grid(images[: len(caps)], out / "text_samples.png", nrow=16 if vocabulary != "basic" else 12,
                      upscale=2)
        else:
            res["not_judged"].append(f"caption fidelity: the attribute checker reads only the built-in `shapes` "
                                     f"captions, and this model learned {_named(dataset)}")
            caps = _some_captions(data)
            grids.append(("samples for held-out captions, a row per seed", "text_samples.png"))
            save_grid(torch.cat([_draw(ldm, 1000 * s, texts=caps, **kw) for s in range(seeds)]),
                      out / "text_samples.png", nrow=len(caps), upscale=2)
    if cc.num_classes:
        if dataset in SHAPES_DATASETS and cc.num_classes == len(SHAPES) * len(COLOURS):
            res["label"] = _shapes_label_fidelity(ldm, seeds, kw)
            save_grid(res["label"].pop("grid"), out / "label_samples.png", nrow=6, upscale=2)
        elif dataset == "digits" and cc.num_classes == 10:
            digits = _digit_fidelity(ldm, seeds=max(seeds, 4), kw=kw)
            save_grid(digits.pop("grid"), out / "digit_samples.png", nrow=10, upscale=2)  # a row per seed
            res["digits"] = digits
        else:
            res["not_judged"].append(f"class fidelity: a class judge exists only for `shapes` (18 classes) and "
                                     f"`digits` (10); this model has {cc.num_classes} classes and learned "
                                     f"{_named(dataset)}")
            grids.append(("samples of the first classes, a row per class", "label_samples.png"))
            labels = [c for c in range(min(cc.num_classes, 16)) for _ in range(seeds)]
            texts = [""] * len(labels) if cc.text_encoder else None
            save_grid(_draw(ldm, 0, texts=texts, labels=labels, **kw), out / "label_samples.png", nrow=seeds,
                      upscale=2)
    if not cc.text_encoder and not cc.num_classes:
        grids.append(("unconditional samples", "samples.png"))
        save_grid(_draw(ldm, 0, n=32, **kw), out / "samples.png", nrow=8, upscale=2)
    (out / "report.md").write_text(_report(res, grids, sampler, steps, guidance, seeds))
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res


def _named(dataset: str | None) -> str:
    return f"'{dataset}'" if dataset else "data the checkpoint does not record"


def held_out(ldm, dataset: str, n: int, seed: int, mask: str = "none"):
    """Up to n items of the validation split of `dataset` (the data the model learned) at the
    model's image size, in memory, with their loss masks where `mask` (data.mask) reads them. An empty
    split is refused by the dataset itself."""
    return materialize(build_dataset(dataset, ldm.config.image_size, "val", seed=seed, length=n, mask=mask),
                       limit=n, progress=False)


def _some_captions(data, k: int = 8) -> list[str]:
    """k held-out captions to draw (empty captions when the data has none or is unknown)."""
    if data is None:
        return [""] * k
    caps = [t for t in data.texts if t][:k]
    return caps or [""] * k


@torch.no_grad()
def heldout_error(ldm, data, seed: int = 0, batch_size: int = 32, timesteps=HELDOUT_T) -> dict:
    """Mean ‖ε̂ − ε‖² over held-out images × `timesteps`, with the true conditions and with every route
    at its null value; the same noise (seeded per image and timestep) for both. `eps_mse_t` (and
    `eps_mse_null_t`) break the mean down by timestep, in the order of `t`. Items with a "loss_mask" (data.mask)
    are scored as the masked training loss weighs them (`DiffusionObjective.terms`): the error weighted by the
    mask area-averaged to the latent grid, over the mask's mass, so unmasked content is not judged."""
    cc = ldm.config.conditioner
    conditional = bool(cc.text_encoder or cc.num_classes)
    d = ldm.config.diffusion
    device = next(ldm.unet.parameters()).device
    if cc.num_classes and int(data.labels.max()) >= cc.num_classes:
        raise LdmkitError(f"the evaluation data has class labels up to {int(data.labels.max())}, but the model has "
                          f"{cc.num_classes} classes; pass the --data it learned")
    ts = [t for t in timesteps if t < d.num_timesteps] or [d.num_timesteps // 2]
    sums = {"conditional": [0.0] * len(ts), "null": [0.0] * len(ts)}
    n = len(data)
    for lo in range(0, n, batch_size):
        idx = torch.arange(lo, min(n, lo + batch_size))
        batch = data.batch(idx)
        images = batch["image"].to(device)
        z0 = ldm.encode_mean(images).float()
        weight = None
        if "loss_mask" in batch:  # (b, 1, H, W) -> (b, 1, h, w), as the training loss weighs its cells
            weight = latent_loss_mask(batch["loss_mask"], z0.shape[-2:])
            weight = weight.to(device).expand_as(z0)  # (b, c, h, w)
        # the evaluation images are whole and at the model's size
        size_crop = ldm.conditioner.default_size_crop(len(idx), images.shape[2], images.shape[3])
        cond = ldm.conditioner(texts=batch["text"] if cc.text_encoder else None,
                               labels=batch["label"].clamp_min(0) if cc.num_classes else None,
                               batch_size=len(idx), size_crop=size_crop).to(device)
        null = ldm.conditioner.uncond(len(idx), size_crop).to(device)
        if ldm.config.concat is not None:
            cond.concat = ldm.concat_condition(images, batch.get("mask"))
            null.concat = ldm.config.concat.null(cond.concat)
        g = torch.Generator().manual_seed(seed * 1_000_003 + lo)  # the same noise for any device
        for i, t in enumerate(ts):
            eps = torch.randn(z0.shape, generator=g).to(device)
            tt = torch.full((len(idx),), t, device=device, dtype=torch.long)
            z_t = q_sample(ldm.schedule, z0, tt, eps)
            a, s = ldm.schedule.alpha(tt).view(-1, 1, 1, 1), ldm.schedule.sigma(tt).view(-1, 1, 1, 1)
            for name, c in (("conditional", cond), ("null", null)) if conditional else (("conditional", cond),):
                _, eps_hat = to_x0_eps(d.prediction_type, ldm.unet(z_t, tt, c).float(), z_t, a, s)
                err = (eps_hat - eps).pow(2)  # (b, c, h, w)
                per_image = err.mean((1, 2, 3)) if weight is None else (
                    (weight * err).sum((1, 2, 3)) / weight.sum((1, 2, 3)).clamp_min(1e-12))  # an empty mask scores 0
                sums[name][i] += per_image.sum().item()
    res = {"n": n, "t": ts, "masked": "loss_mask" in data.extras, "eps_mse": sum(sums["conditional"]) / (n * len(ts)),
           "eps_mse_t": [v / n for v in sums["conditional"]]}
    if conditional:
        res["eps_mse_null"] = sum(sums["null"]) / (n * len(ts))
        res["eps_mse_null_t"] = [v / n for v in sums["null"]]
        res["gain"] = res["eps_mse_null"] / max(res["eps_mse"], 1e-12)
    return res


def _draw(ldm, seed: int, texts: list[str] | None = None, labels: list[int] | None = None, n: int | None = None,
          **kw) -> torch.Tensor:
    """One batch of images (B, 3, H, W) in [-1, 1], one per caption / label (or n), from one generator seeded `seed`."""
    n = len(texts) if texts is not None else len(labels) if labels is not None else n
    request = GenerationRequest(prompt=texts, labels=labels, num_images=n, batch_size=n, seed=seed, **kw)
    return generate(ldm, request).images


def _shapes_label_fidelity(ldm, seeds: int, kw: dict) -> dict:
    """shapes class ids: label = shape_index · 6 + colour_index; position is free."""
    labels = list(range(ldm.config.conditioner.num_classes))
    texts = [""] * len(labels) if ldm.config.conditioner.text_encoder else None
    images = torch.cat([_draw(ldm, 1000 * s + 7, texts=texts, labels=labels, **kw) for s in range(seeds)])
    want = [(SHAPES[lab // len(COLOURS)], list(COLOURS)[lab % len(COLOURS)]) for lab in labels] * seeds
    found = [check_attributes(img) for img in images]
    n = len(found)
    # strict: the right class and drawn right (`shape_fidelity`, issue 31)
    strict = sum(f["shape"] == w[0] and bool(getattr(shape_fidelity(img, w[0]), "passed", False))
                 for img, f, w in zip(images, found, want))
    return {"colour": sum(f["colour"] == w[1] for f, w in zip(found, want)) / n,
            "shape": sum(f["shape"] == w[0] for f, w in zip(found, want)) / n, "shape_strict": strict / n, "n": n,
            "grid": images[: len(labels)]}


def _report(res: dict, grids: list[tuple[str, str]], sampler: str, steps: int, guidance: float, seeds: int) -> str:
    lines = ["# Diffusion model evaluation", "",
             f"Data: {_named(res['dataset'])}. {sampler}, {steps} steps, guidance {guidance}, {seeds} seeds.", ""]
    if "heldout" in res:
        h = res["heldout"]
        row = f"| {h['eps_mse']:.4f} |" + (f" {h['eps_mse_null']:.4f} | {h['gain']:.3f} |" if "gain" in h else " – | – |")
        lines += ["## Held-out denoising error", "",
                  f"Mean ‖ε̂ − ε‖² over {h['n']} validation images × timesteps {h['t']} (seeded noise)"
                  + (", each image's error weighted by its loss mask (data.mask) on the latent grid." if h.get("masked")
                     else "."), "",
                  "| with the conditions | every route null | gain (null / conditional) |", "| --- | --- | --- |",
                  row, ""]
    if "text" in res:
        def row(t: dict) -> str:
            return (f"{100 * t['colour']:.1f} % | {100 * t['position']:.1f} % | {100 * t['shape']:.1f} % | "
                    f"{100 * t['shape_strict']:.1f} % | {100 * t['all']:.1f} % | {100 * t['all_strict']:.1f} % | {t['n']} |")

        strict_note = ("Strict shape: the right class and drawn right, the caption's ideal shape fitted to the sample "
                       "(IoU, solidity, corners; docs/shape-judge.md); all (strict) counts it.")

        if "text_new" in res:  # the extended vocabulary
            lines += ["## Text route (all 112 captions of the extended vocabulary)", "",
                      "| captions | colour | position | shape | strict shape | all | all (strict) | n |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |",
                      f"| with white and/or diamond | {row(res['text_new'])}", f"| the 72 basic ones | {row(res['text_basic'])}",
                      f"| all | {row(res['text'])}", "", strict_note, "", "![text samples](text_samples.png)", ""]
        else:
            lines += ["## Text route (all 72 captions)", "",
                      "| colour | position | shape | strict shape | all | all (strict) | n |",
                      "| --- | --- | --- | --- | --- | --- | --- |", f"| {row(res['text'])}", "", strict_note, "",
                      "![text samples](text_samples.png)", ""]
    if "label" in res:
        lab = res["label"]
        lines += ["## Label route (18 shape × colour classes)", "", "| colour | shape | strict shape | n |",
                  "| --- | --- | --- | --- |",
                  f"| {100 * lab['colour']:.1f} % | {100 * lab['shape']:.1f} % | {100 * lab['shape_strict']:.1f} % | "
                  f"{lab['n']} |", "",
                  "![label samples](label_samples.png)", ""]
    if "digits" in res:
        dg = res["digits"]
        lines += ["## Label route on digits", "",
                  f"{100 * dg['accuracy']:.1f} % of {dg['n']} samples are read as their label by an SVM trained on the "
                  f"real digits ({100 * dg['classifier_accuracy']:.1f} % on held-out real digits).", "",
                  "![digit samples](digit_samples.png)", ""]
    if res["not_judged"]:
        lines += ["## Not judged", ""] + [f"- {line}." for line in res["not_judged"]] + [""]
    for caption, file in grids:
        lines += [f"{caption[0].upper()}{caption[1:]}:", "", f"![{caption}]({file})", ""]
    return "\n".join(lines)


@torch.no_grad()
def _digit_fidelity(ldm, seeds: int, kw: dict) -> dict:
    """Class fidelity of a 10-class model on `digits`: an SVM trained on scikit-learn's real 8x8
    digits (the same train split as ldmkit's `digits`) reads each sample, average-pooled to 8x8."""
    import numpy as np
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    d = load_digits()
    n_train = len(d.target) - 179  # ldmkit's digits validation split is the last 179 images
    clf = SVC(gamma=0.001).fit(d.data[:n_train], d.target[:n_train])
    clf_acc = float((clf.predict(d.data[n_train:]) == d.target[n_train:]).mean())
    labels = [c for c in range(10) for _ in range(seeds)]
    imgs = _draw(ldm, 0, labels=labels, **kw)  # (10·seeds, 3, H, W) in [-1, 1]
    grey = ((imgs.float().mean(1, keepdim=True) + 1) / 2).clamp(0, 1)  # (N, 1, H, W) in [0, 1]
    feats = F.adaptive_avg_pool2d(grey, 8).flatten(1).cpu().numpy() * 16  # the 0..16 scale of load_digits
    pred = clf.predict(feats)
    order = [c * seeds + s for s in range(seeds) for c in range(10)]  # rows: seeds, columns: classes
    return {"accuracy": float((pred == np.array(labels)).mean()), "n": len(labels), "classifier_accuracy": clf_acc,
            "grid": imgs[order]}
