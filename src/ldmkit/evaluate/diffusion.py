"""`ldmkit evaluate` for a diffusion checkpoint: does it obey its conditions?

On `shapes`, conditional fidelity is measurable: every caption (text route) or every class id
(label route: shape × colour) is sampled at several seeds and the independent attribute checker
reads colour, position and shape back from each image. A report with the sample grid is written.
For models with neither route, a grid of unconditional samples is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ldmkit.data.shapes import COLOURS, SHAPES, all_captions
from ldmkit.evaluate.attributes import check_attributes, score_captions
from ldmkit.imageio import save_grid


@torch.no_grad()
def evaluate_diffusion(ldm, out: str | Path, seeds: int = 2, steps: int = 25, sampler: str = "dpmpp_2m",
                       guidance: float = 2.0, batch_size: int = 72) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cc = ldm.config.conditioner
    res: dict = {"steps": steps, "sampler": sampler, "guidance": guidance, "seeds": seeds}
    kw = dict(steps=steps, sampler=sampler, guidance=guidance)
    if cc.text_encoder:
        caps = all_captions()
        images = []
        for s in range(seeds):
            for i in range(0, len(caps), batch_size):
                images.append(ldm.sample(texts=caps[i : i + batch_size], seed=1000 * s + i, **kw))
        images = torch.cat(images)
        res["text"] = score_captions(images, caps * seeds)
        save_grid(images[: len(caps)], out / "text_samples.png", nrow=12, upscale=2)
    if cc.num_classes == len(SHAPES) * len(COLOURS):
        # shapes class ids: label = shape_index * 6 + colour_index; position is free
        labels = list(range(cc.num_classes))
        texts = [""] * len(labels) if cc.text_encoder else None
        images = torch.cat([ldm.sample(texts=texts, labels=labels, seed=1000 * s + 7, **kw) for s in range(seeds)])
        want = [(SHAPES[lab // len(COLOURS)], list(COLOURS)[lab % len(COLOURS)]) for lab in labels] * seeds
        found = [check_attributes(img) for img in images]
        n = len(found)
        res["label"] = {
            "colour": sum(f["colour"] == w[1] for f, w in zip(found, want)) / n,
            "shape": sum(f["shape"] == w[0] for f, w in zip(found, want)) / n,
            "n": n,
        }
        save_grid(images[: len(labels)], out / "label_samples.png", nrow=6, upscale=2)
    if cc.num_classes == 10:
        digits = _digit_fidelity(ldm, seeds=max(seeds, 4), kw=kw)
        save_grid(digits.pop("grid"), out / "digit_samples.png", nrow=10, upscale=2)  # a row per seed
        res["digits"] = digits
    if not cc.text_encoder and not cc.num_classes:
        save_grid(ldm.sample(num_samples=32, seed=0, **kw), out / "samples.png", nrow=8, upscale=2)

    lines = ["# Diffusion model evaluation", "", f"{sampler}, {steps} steps, guidance {guidance}, {seeds} seeds.", ""]
    if "text" in res:
        t = res["text"]
        lines += ["## Text route (all 72 captions)", "", "| colour | position | shape | all | n |", "| --- | --- | --- | --- | --- |",
                  f"| {100 * t['colour']:.1f} % | {100 * t['position']:.1f} % | {100 * t['shape']:.1f} % | {100 * t['all']:.1f} % | {t['n']} |",
                  "", "![text samples](text_samples.png)", ""]
    if "label" in res:
        lab = res["label"]
        lines += ["## Label route (18 shape × colour classes)", "", "| colour | shape | n |", "| --- | --- | --- |",
                  f"| {100 * lab['colour']:.1f} % | {100 * lab['shape']:.1f} % | {lab['n']} |", "",
                  "![label samples](label_samples.png)", ""]
    if "digits" in res:
        dg = res["digits"]
        lines += ["## Label route on digits", "",
                  f"{100 * dg['accuracy']:.1f} % of {dg['n']} samples are read as their label by an SVM trained on the "
                  f"real digits ({100 * dg['classifier_accuracy']:.1f} % on held-out real digits).", "",
                  "![digit samples](digit_samples.png)", ""]
    if "text" not in res and "label" not in res and "digits" not in res:
        lines += ["No text or shapes-label route: unconditional samples only.", "", "![samples](samples.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res


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
    imgs = ldm.sample(labels=labels, seed=0, **kw)  # (10·seeds, 3, H, W) in [-1, 1]
    grey = ((imgs.float().mean(1, keepdim=True) + 1) / 2).clamp(0, 1)  # (N, 1, H, W) in [0, 1]
    feats = F.adaptive_avg_pool2d(grey, 8).flatten(1).cpu().numpy() * 16  # the 0..16 scale of load_digits
    pred = clf.predict(feats)
    order = [c * seeds + s for s in range(seeds) for c in range(10)]  # rows: seeds, columns: classes
    return {"accuracy": float((pred == np.array(labels)).mean()), "n": len(labels), "classifier_accuracy": clf_acc,
            "grid": imgs[order]}
