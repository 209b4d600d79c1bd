"""`ldmkit evaluate` for the spatial routes: does the sample obey its spatial condition?

Held-out images come from the validation split of the data the model learned (`dataset`).
- ControlNet / adapter, on `shapes` and `shapes-free` (where a shape's mask is ground truth): probe
  maps drawn independently of the training renderer (`ldmkit.evaluate.probes`: a shape anywhere in
  its quadrant, any size and angle) go in as edge or mask maps, beside the map's caption, an empty
  caption and a caption naming another quadrant, at control scale 1 (the route) and 0 (the base
  model alone, so the route's contribution is the difference). The generated shape is segmented
  (`shape_mask`) and compared with the probe's mask by intersection-over-union; the attribute checker
  says whose quadrant the shape landed in when map and caption disagree.
- inpainting: each held-out image gets a random rectangle hole (seeded); the kept region's PSNR
  of the decoded image (before the kept pixels are pasted back, `overlay`) against the original
  is compared with the first stage's own reconstruction PSNR on the same pixels, and the "boundary"
  PSNR is the same figure on the kept pixels within 2 px of the hole, where seams show. On the
  shapes data a text model is also judged in the hole: each shape is removed and another colour and
  shape asked for, and the checker reads both back inside the hole.
- super-resolution: PSNR against the ground truth of the model's output and of bicubic upscaling
  of the same low-resolution input.
Inpainting and super-resolution are judged on any data. A control network trained on other data is
not judged (no segmenter knows its images): that is said in one line (`res["not_judged"]`) and its
samples are drawn beside their control maps. Every figure is written to report.md / results.json
with an image grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ldmkit.conditioning.concat import mask_box
from ldmkit.data.shapes import SHAPES_DATASETS
from ldmkit.data.tensors import control_maps
from ldmkit.evaluate.attributes import PALETTE, SHAPE_NAMES, check_attributes, parse_caption
from ldmkit.evaluate.diffusion import held_out
from ldmkit.evaluate.probes import draw_probes
from ldmkit.generation import GenerationRequest, generate
from ldmkit.imageio import save_grid


def shape_mask(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] → (B, 1, H, W) {0, 1}: pixels brighter than half the shape's brightness
    (the data's masks are coverage > 1/2 of a shape on black)."""
    b = ((images.clamp(-1, 1) + 1) / 2).amax(1, keepdim=True)  # (B, 1, H, W) brightest channel
    flat = b.flatten(1)
    top = torch.quantile(flat, 0.99, dim=1)[:, None, None, None]  # the shape's brightness
    return ((b > 0.5 * top) & (top > 0.3)).float()


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image IoU of two {0, 1} masks (B, 1, H, W); 1 when both are empty."""
    inter = (a * b).flatten(1).sum(1)
    union = ((a + b) > 0).float().flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def masked_psnr(x: torch.Tensor, y: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (B,) on the pixels where region (B, 1, H, W) is 1; images in [-1, 1], peak 1."""
    se = ((x - y) / 2).pow(2).mean(1, keepdim=True) * region  # (B, 1, H, W) on the [0, 1] scale
    mse = se.flatten(1).sum(1) / region.flatten(1).sum(1).clamp_min(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _conditions(ldm, data, idx):
    cc = ldm.config.conditioner
    texts = [data.texts[i] for i in idx] if cc.text_encoder else None
    labels = data.labels[idx] if cc.num_classes else None
    return texts, labels


def _draw(ldm, seed: int, texts: list[str] | None = None, labels: torch.Tensor | None = None, n: int | None = None,
          control=None, **fields) -> torch.Tensor:
    """One batch (B, 3, H, W) on the CPU, one image per caption / label (or n), from one generator seeded `seed`;
    `fields`: the other GenerationRequest fields (steps, sampler, init_image, mask, control_image…)."""
    labels = labels.tolist() if isinstance(labels, torch.Tensor) else labels
    n = len(texts) if texts is not None else len(labels) if labels is not None else n
    request = GenerationRequest(prompt=texts, labels=labels, num_images=n, batch_size=n, seed=seed, **fields)
    return generate(ldm, request, control=control).images


def _rect_masks(n: int, size: int, seed: int) -> torch.Tensor:
    """Holes of 1/4 … 1/2 of the side at random places (seeded): (n, 1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, 1, size, size)
    for i in range(n):
        h, w = (torch.randint(size // 4, size // 2 + 1, (2,), generator=g)).tolist()
        y, x = torch.randint(0, size - h + 1, (1,), generator=g).item(), torch.randint(0, size - w + 1, (1,), generator=g).item()
        out[i, :, y : y + h, x : x + w] = 1
    return out


def _replace_object(ldm, data, recon: torch.Tensor, seed: int, kw: dict, batched, out: Path) -> dict:
    """Inpainting judged in the hole: remove each held-out shape, ask for another colour and shape there.
    `recon`: the first stage's reconstructions of `data.images`, the kept region's reference."""
    n, size = len(data), ldm.config.image_size
    holes = torch.stack([mask_box(m, grow=max(1, size // 16)) for m in data.extras["mask"]])  # (n, 1, S, S)
    g = torch.Generator().manual_seed(seed + 104729)
    colours, want = list(PALETTE), []
    for text in data.texts:
        colour, shape, position = parse_caption(text)
        others_c = [c for c in colours if c != colour]
        others_s = [s for s in SHAPE_NAMES if s != shape]
        want.append((others_c[int(torch.randint(len(others_c), (1,), generator=g))],
                     others_s[int(torch.randint(len(others_s), (1,), generator=g))], position))
    captions = [f"a {c} {s} in the {p}" for c, s, p in want]
    x = data.images
    decoded = batched(lambda idx: _draw(ldm, seed + int(idx[0]), [captions[i] for i in idx.tolist()], init_image=x[idx],
                                       mask=holes[idx], overlay=False, **kw))
    imgs = torch.lerp(x, decoded, holes)  # the default output: kept pixels pasted back (`overlay`)
    in_hole = imgs * holes - (1 - holes)  # the kept region set to black: only what fills the hole is judged
    found = [check_attributes(im) for im in in_hole]
    save_grid(torch.cat([x[:12] * (1 - holes[:12]), imgs[:12], x[:12]]), out / "replace.png", nrow=12,
              upscale=3)
    keep = 1 - holes
    # the pixels of latent cells the hole does not touch (the ones pinned to the image's latent)
    outside = 1 - F.interpolate(F.adaptive_max_pool2d(holes, ldm.latent_shape[1:]), size=(size, size), mode="nearest")
    return {"n": n, "colour": sum(f["colour"] == w[0] for f, w in zip(found, want)) / n,
            "shape": sum(f["shape"] == w[1] for f, w in zip(found, want)) / n,
            "kept_psnr": masked_psnr(decoded, x, keep).mean().item(),
            "kept_psnr_first_stage": masked_psnr(recon, x, keep).mean().item(),
            "kept_psnr_outside_repainted_cells": masked_psnr(decoded, x, keep * outside).mean().item(),
            "kept_psnr_outside_repainted_cells_first_stage": masked_psnr(recon, x, keep * outside).mean().item()}


CAPTIONS = ("right", "empty", "other")  # the caption beside each control map: the map's, none, another quadrant's


def _control_fidelity(ldm, control, kind: str, data, n: int, seed: int, kw: dict, batched, out: Path) -> dict:
    """Mask IoU of samples against independently drawn probe maps (`ldmkit.evaluate.probes`), with the
    right caption, an empty one and one naming another quadrant, with the route (scale 1) and without
    it (scale 0: the base model alone); plus where the shape went when map and caption disagree."""
    probes = draw_probes(n, ldm.config.image_size, seed=seed + 7919)  # unseen: not the data's seeds or renderer
    maps, truth = probes.maps(kind), probes.masks
    cc = ldm.config.conditioner
    texts = {"right": probes.captions, "empty": [""] * n, "other": probes.other_captions}
    r: dict = {"kind": type(control).__name__, "map": kind, "probes": "independent (ldmkit.evaluate.probes)",
               "iou_real_images": iou(shape_mask(data.images), data.extras["mask"].float()).mean().item()}
    grid = [maps[:12].expand(-1, 3, -1, -1) * 2 - 1]
    # a class model (no text) gets the probe's class (shape x colour: no quadrant in it) or the null class
    labels = torch.tensor([SHAPE_NAMES.index(s) * len(PALETTE) + list(PALETTE).index(c)
                           for s, c in zip(probes.shapes, probes.colours)])
    class_ok = cc.num_classes == len(SHAPE_NAMES) * len(PALETTE)
    caps = CAPTIONS if cc.text_encoder else ("right", "empty") if class_ok else ("empty",)
    for scale, who in ((1.0, "route"), (0.0, "base")):
        for cap in caps:
            def draw(idx, cap=cap, scale=scale):
                t = [texts[cap][i] for i in idx.tolist()] if cc.text_encoder else None
                lab = labels[idx] if cc.num_classes and cap == "right" and class_ok else None
                return _draw(ldm, seed + int(idx[0]), t, lab, len(idx), control=control, control_image=maps[idx],
                             control_scale=scale, **kw)
            imgs = batched(draw)
            r[f"iou_{who}_{cap}"] = iou(shape_mask(imgs), truth).mean().item()
            found = [check_attributes(im) for im in imgs]
            r[f"shape_{who}_{cap}"] = sum(f["shape"] == s for f, s in zip(found, probes.shapes)) / n
            if cap != "empty":  # the caption's colour (the map has none)
                r[f"colour_{who}_{cap}"] = sum(f["colour"] == c for f, c in zip(found, probes.colours)) / n
            if cap == "other":  # map and caption disagree: whose quadrant did the shape land in?
                r[f"map_wins_{who}"] = sum(f["position"] == q for f, q in zip(found, probes.quadrants)) / n
                r[f"caption_wins_{who}"] = sum(f["position"] == q for f, q in zip(found, probes.other_quadrants)) / n
            if who == "route":
                grid.append(imgs[:12])
    save_grid(torch.cat(grid), out / "control.png", nrow=12, upscale=3)
    return r


def _control_lines(r: dict, kind: str) -> list[str]:
    caps = [c for c in CAPTIONS if f"iou_route_{c}" in r]
    names = {"right": "the map's caption", "empty": "empty caption", "other": "caption naming another quadrant"}
    lines = [f"## {r['kind']} on {kind} maps", "",
             "Probe maps drawn independently of the training renderer (a shape anywhere in its quadrant, radius "
             "0.12–0.30 of the side, any angle). Mask IoU of the sample's shape against the probe's; the route's own "
             "contribution is the difference between the rows.", "",
             "| | " + " | ".join(names[c] for c in caps) + " |", "| --- |" + " --- |" * len(caps)]
    for who, label in (("route", "with the route (scale 1)"), ("base", "base model alone (scale 0)")):
        lines.append(f"| {label} | " + " | ".join(f"{r[f'iou_{who}_{c}']:.3f}" for c in caps) + " |")
    lines += ["", "Shape read back = the map's shape: " + ", ".join(
        f"{names[c]} {100 * r[f'shape_route_{c}']:.0f} % (base {100 * r[f'shape_base_{c}']:.0f} %)" for c in caps) + "."]
    if "colour_route_right" in r:
        other = f", {100 * r['colour_route_other']:.0f} % with another quadrant's" if "colour_route_other" in r else ""
        lines += ["", f"Colour read back = the caption's: {100 * r['colour_route_right']:.0f} % with the map's caption{other}."]
    if "map_wins_route" in r:
        lines += ["", f"With a caption naming another quadrant the shape lands in the map's quadrant in "
                  f"{100 * r['map_wins_route']:.1f} % of samples and in the caption's in {100 * r['caption_wins_route']:.1f} % "
                  f"(base model: {100 * r['map_wins_base']:.1f} % / {100 * r['caption_wins_base']:.1f} %)."]
    lines += ["", f"Segmenter ceiling (its IoU on the real held-out images): {r['iou_real_images']:.3f}.", "",
              "Top row: probe maps; then samples with the right, empty and other-quadrant caption.", "",
              "![control](control.png)", ""]
    return lines


@torch.no_grad()
def evaluate_routes(ldm, out: str | Path, control=None, control_kind: str | None = None, n: int = 128, steps: int = 25,
                    sampler: str = "dpmpp_2m", guidance: float = 2.0, seed: int = 0, batch_size: int = 64,
                    dataset: str = "shapes") -> dict:
    """Per-route fidelity of `ldm` (and `control`, a ControlNet/adapter trained on `control_kind` maps)
    on held-out images of `dataset`, the data they learned."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = held_out(ldm, dataset, n, seed)
    n = len(data)
    res: dict = {"dataset": dataset, "n": n, "steps": steps, "sampler": sampler, "guidance": guidance, "not_judged": []}
    lines = [f"# Spatial route evaluation ('{dataset}', held-out split)", "",
             f"{n} images, {sampler}, {steps} steps, guidance {guidance}.", ""]
    kw = {"steps": steps, "sampler": sampler, "guidance": guidance}

    def batched(fn):
        outs = [fn(torch.arange(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]
        return torch.cat(outs)

    if control is not None and (dataset not in SHAPES_DATASETS or control_kind not in ("edge", "mask")):
        res["not_judged"].append(f"control fidelity: the mask IoU needs the true shape masks of `shapes`, and this "
                                 f"control network learned '{dataset}'")
        maps = control_maps(data, control_kind if control_kind in data.extras else "control", dataset)
        imgs = batched(lambda idx: _draw(ldm, seed + int(idx[0]), *_conditions(ldm, data, idx), control=control,
                                         control_image=maps[idx], **kw))
        save_grid(torch.cat([maps[:12].expand(-1, 3, -1, -1) * 2 - 1, imgs[:12]]), out / "control.png", nrow=12, upscale=3)
        lines += [f"## {type(control).__name__} on {control_kind} maps", "",
                  "Top row: control maps; bottom row: samples.", "", "![control](control.png)", ""]
    elif control is not None:
        res["control"] = _control_fidelity(ldm, control, control_kind, data, n, seed, kw, batched, out)
        lines += _control_lines(res["control"], control_kind)

    cc = ldm.config.concat
    if cc is not None and cc.takes_mask:
        size = ldm.config.image_size
        holes = _rect_masks(n, size, seed)
        x = data.images
        # the decoded network output (overlay=False): the default output pastes the kept pixels back exactly
        imgs = batched(lambda idx: _draw(ldm, seed + int(idx[0]), *_conditions(ldm, data, idx), init_image=x[idx], mask=holes[idx],
                                         overlay=False, **kw))
        # the same samples without pinning the untouched latent cells: what the network alone keeps
        free = batched(lambda idx: _draw(ldm, seed + int(idx[0]), *_conditions(ldm, data, idx), init_image=x[idx], mask=holes[idx],
                                         keep_known=False, overlay=False, **kw))
        recon = batched(lambda idx: ldm.decode(ldm.encode_mean(x[idx])).cpu())
        keep = 1 - holes
        band = (F.max_pool2d(holes, 5, stride=1, padding=2) - holes).clamp(0, 1)  # kept pixels within 2 px of the hole
        res["inpaint"] = {
            "kept_psnr": masked_psnr(imgs, x, keep).mean().item(),
            "kept_psnr_first_stage": masked_psnr(recon, x, keep).mean().item(),
            "kept_psnr_unpinned": masked_psnr(free, x, keep).mean().item(),
            "boundary_psnr": masked_psnr(imgs, x, band).mean().item(),
            "boundary_psnr_first_stage": masked_psnr(recon, x, band).mean().item(),
        }
        r = res["inpaint"]
        save_grid(torch.cat([x[:12] * (1 - holes[:12]), imgs[:12], x[:12]]), out / "inpaint.png", nrow=12, upscale=3)
        lines += ["## Inpainting (random rectangular holes, 1/4–1/2 of the side)", "",
                  "| | kept region PSNR | boundary band PSNR (2 px) |", "| --- | --- | --- |",
                  f"| inpainted | {r['kept_psnr']:.2f} dB | {r['boundary_psnr']:.2f} dB |",
                  f"| first-stage reconstruction | {r['kept_psnr_first_stage']:.2f} dB | {r['boundary_psnr_first_stage']:.2f} dB |",
                  "", f"Without pinning the untouched latent cells to the image's latent (`keep_known=False`) the "
                  f"kept region is {r['kept_psnr_unpinned']:.2f} dB. These are the decoded images; the output "
                  f"(`overlay`, the default) pastes the kept pixels back, so they are the input's exactly.",
                  "", "Rows: masked input, inpainted, original.", "", "![inpaint](inpaint.png)", ""]
    if (cc is not None and cc.takes_mask and dataset in SHAPES_DATASETS and "mask" in data.extras
            and ldm.config.conditioner.text_encoder):
        res["replace"] = _replace_object(ldm, data, recon, seed, kw, batched, out)
        r = res["replace"]
        lines += ["## Inpainting: replace the shape", "",
                  "Each held-out shape is removed (the hole: its bounding box grown by 1/16 of the side) and the "
                  "caption asks for another colour and another shape in the same quadrant. Judged inside the hole by "
                  "the attribute checker; the kept region's PSNR beside the first stage's own reconstruction.", "",
                  "| colour in the hole | shape in the hole | kept region PSNR (decoded) | first stage, same pixels | "
                  "outside the repainted latent cells: decoded / first stage |",
                  "| --- | --- | --- | --- | --- |",
                  f"| {100 * r['colour']:.1f} % | {100 * r['shape']:.1f} % | {r['kept_psnr']:.2f} dB | "
                  f"{r['kept_psnr_first_stage']:.2f} dB | {r['kept_psnr_outside_repainted_cells']:.2f} / "
                  f"{r['kept_psnr_outside_repainted_cells_first_stage']:.2f} dB |", "",
                  "Decoded: the network's image before the kept pixels are pasted back (the output, `overlay`, "
                  "keeps them exactly).", "",
                  "Rows: the image with its hole, the inpainted image (caption: another colour and shape), the original.",
                  "", "![replace](replace.png)", ""]
    if cc is not None and cc.kind == "lowres":
        x = data.images
        imgs = batched(lambda idx: _draw(ldm, seed + int(idx[0]), *_conditions(ldm, data, idx), n=len(idx), init_image=x[idx], **kw))
        bicubic = ldm.degrade(x)
        from ldmkit.evaluate.metrics import psnr

        res["lowres"] = {"factor": cc.lowres_factor, "psnr": psnr(imgs, x).mean().item(), "psnr_bicubic": psnr(bicubic, x).mean().item()}
        r = res["lowres"]
        save_grid(torch.cat([bicubic[:12], imgs[:12], x[:12]]), out / "superres.png", nrow=12, upscale=3)
        lines += [f"## Super-resolution ({cc.lowres_factor}x)", "", "| model PSNR | bicubic PSNR |", "| --- | --- |",
                  f"| {r['psnr']:.2f} dB | {r['psnr_bicubic']:.2f} dB |", "",
                  "Rows: bicubic upscaling, model, ground truth.", "", "![superres](superres.png)", ""]
    if res["not_judged"]:
        lines += ["## Not judged", ""] + [f"- {line}." for line in res["not_judged"]] + [""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res

