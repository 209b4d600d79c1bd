"""`ldmkit study routes`: how a condition enters the U-Net, each route measured on one task.

The FAQ's third question (Rombach et al. 2022, §3.3; DESIGN.md's table of routes). Two tasks, each
learnable by every route that claims it, on the bundled `shapes` data at 32 px (8x8x4 latents of one
shared first stage), one U-Net (widths 32, 64) per task and the same steps for every arm:

- the class (shape x colour, 18 classes) as concatenated one-hot maps (`routes-onehot`), as FiLM
  (the class embedding in the time embedding drives each ResBlock's scale and shift, `routes-film`),
  as a class-embedding bias (the same embedding added as a per-channel bias, `routes-bias`), and as
  a caption through cross-attention (`routes-caption`). The arms train on the 60 combinations left
  when 12 of the 72 (shape, colour, position) are held out (`data.holdout: 12`), so the caption run
  also answers the composition question: are the held-out captions drawn as well as the seen ones?
  A class id cannot compose a held-out combination by construction (position is not in it, and an
  id never seen has an embedding no gradient reached), so the label route it is compared with is
  the combination as three one-hot groups, shape, colour and position (`routes-factors`).
- the shape's mask on `shapes-free` (a shape anywhere, any size and angle) through concatenation
  (pixel-unshuffled onto the latent grid, trained from scratch, `routes-free-map`), a ControlNet and
  a T2I-style adapter, both trained on a frozen unconditional model (`routes-free`). Judged against
  probe masks drawn independently of the training renderer (`ldmkit.evaluate.probes`) by IoU.

Fidelity is read by the independent attribute judge (`ldmkit.evaluate.attributes`); parameters
added are counted against the same U-Net without the route; training time per step comes from each
run's own clock, sampling time per image is measured here.
"""

from __future__ import annotations

import math
import time

import torch

from ldmkit.study.common import Study, compare, fmt_ci, mean_ci, welch_p

TITLE = "How a condition enters the U-Net: the conditioning routes, measured"

CLASS_ROUTES = {  # arm -> (preset, what it is)
    "onehot": ("routes-onehot", "one-hot maps, concatenated"),
    "film": ("routes-film", "FiLM (embedding → scale, shift)"),
    "bias": ("routes-bias", "class-embedding bias"),
    "caption": ("routes-caption", "caption, cross-attention"),
}
SPATIAL_ROUTES = {  # arm -> what it is
    "map": "mask, concatenated (from scratch)",
    "controlnet": "ControlNet on the frozen base",
    "adapter": "adapter on the frozen base",
}
HOLDOUT = 12
# The class arms get 600 steps: with the v-loss weighted uniformly (the routes presets) the caption route
# has learned the named quadrant by then for one seed of three and half of it for the others (seen
# captions: 100, 53 and 55 % placed, chance 25 %), enough for composition to be judged within each
# seed; at 300 steps with min-SNR-γ it had barely started. 900 steps would not fit 30 minutes. The first
# stage is the `demo` recipe on `shapes-free` (700 steps, 30 dB): shape accuracy, the weakest
# attribute, is capped by its decodes.
CLASS_STEPS, BASE_STEPS, CONTROL_STEPS, AE_STEPS = 600, 300, 150, 700
SAMPLE_STEPS, GUIDANCE = 20, 2.0
COMPOSE_RATIO = 0.8  # held-out accuracy at least this fraction of the seen one: "composes"


def run(study: Study) -> None:
    ae = _first_stage(study)
    classes = {arm: [] for arm in (*CLASS_ROUTES, "factors")}
    spatial = {arm: [] for arm in (*SPATIAL_ROUTES, "base")}
    for seed in range(study.seeds):
        for arm, (preset, _) in CLASS_ROUTES.items():
            classes[arm].append(_class_arm(study, arm, preset, seed, ae))
        classes["factors"].append(_class_arm(study, "factors", "routes-factors", seed, ae))
        spatial_seed = _spatial_arms(study, seed, ae)
        for arm in spatial:
            spatial[arm].append(spatial_seed[arm])
    _report(study, classes, spatial)


# --- training ------------------------------------------------------------------------------------


def _common(study: Study, steps: int, seed: int) -> list[str]:
    sets = [f"optim.steps={study.n(steps)}", f"optim.seed={seed}", f"sample.steps={study.n(SAMPLE_STEPS, 2)}",
            "sample.num=8", f"data.latent_cache={study.out / 'latents'}"]
    if study.budget < 1:  # fewer images at a small budget, so a test renders and encodes in seconds
        sets.append(f"data.length={study.n(7200, 72)}")
    return sets


def _first_stage(study: Study):
    """One first stage for every arm: the `demo` recipe (the shapes recipe at half width) on `shapes-free`,
    whose shapes of any size, place and angle include the fixed layout's."""
    steps = study.n(AE_STEPS, 4)
    sets = ["model.base_channels=16", "model.norm_groups=8", f"optim.steps={steps}", f"logging.val_every={steps}",
            f"logging.ckpt_every={steps}", f"latent_stat_batches={study.n(10, 2)}", f"data.val_images={study.n(128, 16)}"]
    if study.budget < 1:
        sets.append(f"data.length={study.n(7200, 72)}")
    folder, meta = study.train_autoencoder("ae", "shapes-free", sets)
    study.ae_val = meta.get("val", {})
    return folder


def _class_arm(study: Study, arm: str, preset: str, seed: int, ae) -> dict:
    name = f"{arm}-s{seed}"
    folder, meta = study.train_diffusion(name, preset, _common(study, CLASS_STEPS, seed), ae)
    return study.cached(name, lambda: _class_eval(study, folder, meta, arm, seed))


def _spatial_arms(study: Study, seed: int, ae) -> dict:
    base, base_meta = study.train_diffusion(f"base-s{seed}", "routes-free", _common(study, BASE_STEPS, seed), ae)
    mapped, map_meta = study.train_diffusion(f"map-s{seed}", "routes-free-map", _common(study, BASE_STEPS, seed), ae)
    ctrl = {}
    for kind, preset in (("controlnet", "shapes-free-edge"), ("adapter", "shapes-free-mask-adapter")):
        steps = study.n(CONTROL_STEPS)
        sets = ["control=mask", f"optim.steps={steps}", f"optim.seed={seed}", "optim.lr=1e-3", "optim.warmup_steps=20",
                f"logging.val_every={steps}", f"logging.ckpt_every={steps}", "sample.num=4",
                f"sample.steps={study.n(SAMPLE_STEPS, 2)}", "sample.guidance=1", f"data.latent_cache={study.out / 'latents'}"]
        if study.budget < 1:
            sets.append(f"data.length={study.n(7200, 72)}")
        ctrl[kind] = study.train_control(f"{kind}-s{seed}", preset, sets, base)
    return study.cached(f"spatial-s{seed}", lambda: _spatial_eval(study, base, base_meta, mapped, map_meta, ctrl, seed))


# --- measuring -----------------------------------------------------------------------------------


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _route_params(ldm) -> int:
    """Parameters the route adds: this U-Net against the same U-Net with no label, context or concat."""
    from ldmkit.unet import UNet

    plain = ldm.config.unet.model_copy(update={"num_classes": 0, "context_dim": None, "concat_channels": 0})
    return _params(ldm.unet) - _params(UNet(plain))


def _timed_sample(ldm, texts=None, labels=None, num_samples=None, control=None, **fields) -> tuple[torch.Tensor, float]:
    """One batch (one generator seeded `seed`) with dpmpp_2m, and the seconds it took."""
    from ldmkit.generation import GenerationRequest, generate

    labels = labels.tolist() if isinstance(labels, torch.Tensor) else labels
    n = len(texts) if texts is not None else len(labels) if labels is not None else num_samples
    t0 = time.perf_counter()
    request = GenerationRequest(prompt=texts, labels=labels, num_images=n, batch_size=n, sampler="dpmpp_2m", **fields)
    images = generate(ldm, request, control=control).images
    return images, time.perf_counter() - t0


def _class_eval(study: Study, folder, meta: dict, arm: str, seed: int) -> dict:
    """Samples for every seen combination's condition (2 each) and, for the routes that can name a
    combination (caption, factors), every held-out one (4 each); each judged for shape, colour, position."""
    import ldmkit
    from ldmkit.data.shapes import COLOURS, COMBOS, SHAPES, caption, heldout_combos
    from ldmkit.evaluate.attributes import check_attributes

    study.log(f"sampling {folder.name}")
    ldm = ldmkit.load(folder)
    held = heldout_combos(HOLDOUT)
    seen = [c for c in COMBOS if c not in held]
    per_seen, per_held = study.n(2), study.n(4)
    combos = seen * per_seen
    composes = arm in ("caption", "factors")
    if composes:
        combos += list(held) * per_held
    kw = dict(steps=study.n(SAMPLE_STEPS, 2), guidance=GUIDANCE, seed=10_000 + seed)
    if arm == "caption":
        images, seconds = _timed_sample(ldm, texts=[caption(*c) for c in combos], **kw)
    elif arm == "factors":
        images, seconds = _timed_sample(ldm, labels=torch.tensor([COMBOS.index(c) for c in combos]), **kw)
    else:
        labels = [SHAPES.index(s) * len(COLOURS) + list(COLOURS).index(c) for s, c, _ in combos]
        images, seconds = _timed_sample(ldm, labels=torch.tensor(labels), **kw)
    found = [check_attributes(im) for im in images]
    right = [{"shape": f["shape"] == c[0], "colour": f["colour"] == c[1], "position": f["position"] == c[2]}
             for f, c in zip(found, combos)]
    n_seen = len(seen) * per_seen

    def acc(rows, keys):
        return sum(all(r[k] for k in keys) for r in rows) / max(1, len(rows))

    res = {"class_acc": acc(right[:n_seen], ("shape", "colour")),  # shape and colour both right
           "shape_acc": acc(right[:n_seen], ("shape",)), "colour_acc": acc(right[:n_seen], ("colour",)),
           "route_params": _route_params(ldm), "unet_params": _params(ldm.unet),
           "train_s_per_step": meta["train_seconds"] / max(1, meta["step"]),
           "sample_s_per_image": seconds / len(combos)}
    if composes:
        all3 = ("shape", "colour", "position")
        res |= {"seen_acc": acc(right[:n_seen], all3), "held_acc": acc(right[n_seen:], all3),
                **{f"held_{k}": acc(right[n_seen:], (k,)) for k in all3},
                "seen_position": acc(right[:n_seen], ("position",))}
    study.command(f"# in-process: {arm} seed {seed}: generate({n_seen} seen conditions"
                  + (f" + {len(combos) - n_seen} held-out" if composes else "")
                  + f", dpmpp_2m, {kw['steps']} steps, guidance {GUIDANCE}) judged by check_attributes "
                  f"(≈ ldmkit evaluate --checkpoint {folder} --guidance {GUIDANCE})")
    return res


def _spatial_eval(study: Study, base, base_meta, mapped, map_meta, ctrl: dict, seed: int) -> dict:
    """Mask IoU of samples against independent probe masks: the map route given the probe mask, the
    ControlNet and adapter given it on the base model, the base model alone (no map: chance)."""
    import ldmkit
    from ldmkit.evaluate.probes import draw_probes
    from ldmkit.evaluate.routes import iou, shape_mask

    study.log(f"sampling the spatial routes, seed {seed}")
    n = study.n(64, 4)
    probes = draw_probes(n, 32, seed=20_000 + seed)
    maps = probes.masks  # (n, 1, 32, 32) in {0, 1}
    kw = dict(num_samples=n, steps=study.n(SAMPLE_STEPS, 2), guidance=1.0, seed=30_000 + seed)
    base_ldm, map_ldm = ldmkit.load(base), ldmkit.load(mapped)
    out = {}
    images, s = _timed_sample(base_ldm, **kw)
    out["base"] = {"iou": iou(shape_mask(images), maps).mean().item(), "sample_s_per_image": s / n,
                   "route_params": 0, "train_s_per_step": base_meta["train_seconds"] / max(1, base_meta["step"])}
    images, s = _timed_sample(map_ldm, mask=maps, **kw)
    out["map"] = {"iou": iou(shape_mask(images), maps).mean().item(), "sample_s_per_image": s / n,
                  "route_params": _route_params(map_ldm),
                  "train_s_per_step": map_meta["train_seconds"] / max(1, map_meta["step"])}
    for kind, (folder, meta) in ctrl.items():
        net = ldmkit.load(folder)
        images, s = _timed_sample(base_ldm, control=net, control_image=maps, **kw)
        out[kind] = {"iou": iou(shape_mask(images), maps).mean().item(), "sample_s_per_image": s / n,
                     "route_params": _params(net), "train_s_per_step": meta["train_seconds"] / max(1, meta["step"])}
    study.command(f"# in-process: seed {seed}: {n} probe masks (ldmkit.evaluate.probes.draw_probes, seed {20_000 + seed}) "
                  f"→ samples ({kw['steps']} steps) → mask IoU (≈ ldmkit evaluate --checkpoint CONTROL_RUN)")
    return out


# --- verdicts ------------------------------------------------------------------------------------


def _vals(runs: list[dict], key: str) -> list[float]:
    return [r[key] for r in runs]


def _ci(runs: list[dict], key: str, pct: bool = True) -> str:
    return fmt_ci(_vals(runs, key), 100 if pct else 1, 1 if pct else 2, " %" if pct else "")


def _above(values: list[float], level: float) -> bool:
    """The mean's 95 % interval lies above `level` (a single value: the value itself does)."""
    m, h = mean_ci(values)
    return m - (0 if math.isnan(h) else h) > level


def _report(study: Study, classes: dict, spatial: dict) -> None:
    chance_class, chance_combo = 1 / 18, 1 / 72
    names = {arm: what for arm, (_, what) in CLASS_ROUTES.items()} | {"factors": "shape, colour, position one-hot groups"}

    # 1. every route carries the class
    above = {arm: _above(_vals(classes[arm], "class_acc"), chance_class) for arm in CLASS_ROUTES}
    figures = "; ".join(f"{arm} {_ci(classes[arm], 'class_acc')}" for arm in CLASS_ROUTES)
    verdict = "supported" if all(above.values()) else "not supported" if not any(above.values()) else "depends"
    why = "" if verdict != "depends" else "on the route: above chance for " + ", ".join(a for a, ok in above.items() if ok)
    study.claim("A class can enter through any route: concatenated one-hot maps, FiLM, a class-embedding bias or a "
                "caption through cross-attention all learn it",
                f"shape-and-colour accuracy of samples (chance {100 * chance_class:.1f} %): {figures}", verdict,
                why or "rule: every route's 95 % interval above chance")

    # 2. FiLM vs bias
    film, bias = _vals(classes["film"], "class_acc"), _vals(classes["bias"], "class_acc")
    c = compare(film, bias)
    study.claim("FiLM (the embedding scales and shifts normalised features) carries a class better than adding it "
                "as a bias",
                f"accuracy FiLM {_ci(classes['film'], 'class_acc')} vs bias {_ci(classes['bias'], 'class_acc')} "
                f"(Welch p = {welch_p(film, bias):.3f})",
                "supported" if c > 0 else "not supported",
                "rule: FiLM above bias at p < 0.05" + ("" if c else "; not resolved at this budget"))

    # 3. concatenation suits spatial conditions, not a global class
    onehot = _vals(classes["onehot"], "class_acc")
    best = max(("film", "bias", "caption"), key=lambda a: sum(_vals(classes[a], "class_acc")))
    c = compare(onehot, _vals(classes[best], "class_acc"))
    study.claim("Concatenation is a route for spatial conditions: a global class given as constant one-hot maps "
                "does worse than a route made for it",
                f"accuracy one-hot maps {_ci(classes['onehot'], 'class_acc')} vs the best other route ({best}) "
                f"{_ci(classes[best], 'class_acc')} (Welch p = {welch_p(onehot, _vals(classes[best], 'class_acc')):.3f})",
                "supported" if c < 0 else "not supported",
                "rule: one-hot maps below the best other route at p < 0.05" + ("" if c else "; not resolved"))

    # 4. cross-attention for text: a caption does as well as a label
    cap = _vals(classes["caption"], "class_acc")
    labels_best = max(("film", "bias", "onehot"), key=lambda a: sum(_vals(classes[a], "class_acc")))
    c = compare(cap, _vals(classes[labels_best], "class_acc"))
    study.claim("Cross-attention on tokens lets a caption steer the model as well as a class label does",
                f"accuracy caption {_ci(classes['caption'], 'class_acc')} vs the best label route ({labels_best}) "
                f"{_ci(classes[labels_best], 'class_acc')}",
                "not supported" if c < 0 else "supported",
                "rule: the caption not below the best label route at p < 0.05")

    # 5. composition. Held-out and seen combinations are drawn by the same model, so they are compared
    # within each seed (the held-out / seen ratio per seed) and the ratios averaged. Pooling each over seeds
    # instead measures how far the seeds got with the quadrant (the attribute learned last), not whether
    # what a model learned carries over to combinations it never saw.
    ratios = lambda runs: [r["held_acc"] / r["seen_acc"] if r["seen_acc"] else 0.0 for r in runs]  # noqa: E731
    cap_seen, fac_seen = _vals(classes["caption"], "seen_acc"), _vals(classes["factors"], "seen_acc")
    cap_r, fac_r = ratios(classes["caption"]), ratios(classes["factors"])
    # nothing is composed by a route that has not learned the seen combinations: its seen accuracy must
    # stand clear of chance (3x, by its interval) before the held-out ratio means anything
    learned = lambda seen: _above(seen, 3 * chance_combo)  # noqa: E731
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    composes = learned(cap_seen) and mean(cap_r) >= COMPOSE_RATIO
    per_seed = ", ".join(f"{r:.2f}" for r in cap_r)
    study.claim(f"Cross-attention on tokens composes what it saw apart: captions of the {HOLDOUT} (shape, colour, "
                "position) combinations held out of training are drawn about as well as seen ones",
                f"all three attributes right, caption: held-out {_ci(classes['caption'], 'held_acc')} vs seen "
                f"{_ci(classes['caption'], 'seen_acc')} (chance {100 * chance_combo:.1f} %); held-out / seen per seed "
                f"{per_seed}, mean {mean(cap_r):.2f}",
                "supported" if composes else "not supported",
                f"rule: seen accuracy above 3 × chance and held-out at least {COMPOSE_RATIO:g} × seen (mean of the "
                "per-seed ratios)" + ("" if learned(cap_seen) else "; the caption route did not learn the seen "
                                      "combinations at this budget, so nothing was composed"))
    c = compare(cap_r, fac_r)
    fac_composes = learned(fac_seen) and mean(fac_r) >= COMPOSE_RATIO
    verdict = "supported" if composes and not fac_composes and c > 0 else "not supported"
    study.claim("Composition is cross-attention's own: a label that names the same three attributes (as one-hot "
                "groups, concatenated) does not compose held-out combinations as the caption does",
                f"held-out / seen accuracy, mean of the per-seed ratios: caption {mean(cap_r):.2f}, factorised label "
                f"{mean(fac_r):.2f} (held-out {_ci(classes['factors'], 'held_acc')}, seen "
                f"{_ci(classes['factors'], 'seen_acc')}); per-seed ratios Welch p = {welch_p(cap_r, fac_r):.3f}",
                verdict, "rule: the caption composes, the factorised label does not, and the caption's per-seed "
                "ratio is above the label's at p < 0.05" + (
                    "; the factorised label composes too" if fac_composes else ""))

    # 6. spatial routes follow the map
    base_iou = _vals(spatial["base"], "iou")
    follows = {arm: compare(_vals(spatial[arm], "iou"), base_iou) > 0 for arm in SPATIAL_ROUTES}
    verdict = "supported" if all(follows.values()) else "not supported" if not any(follows.values()) else "depends"
    study.claim("A spatial map steers the sample through concatenation, a ControlNet or an adapter",
                "mask IoU against independent probe masks: " + "; ".join(
                    f"{arm} {_ci(spatial[arm], 'iou', pct=False)}" for arm in SPATIAL_ROUTES)
                + f"; the base model with no map {_ci(spatial['base'], 'iou', pct=False)}",
                verdict, ("on the route: above the base for " + ", ".join(a for a, ok in follows.items() if ok))
                if verdict == "depends" else "rule: each route's IoU above the base model's at p < 0.05")

    # 7. control on a frozen model vs training with the map
    map_iou = _vals(spatial["map"], "iou")
    worse = {arm: compare(_vals(spatial[arm], "iou"), map_iou) < 0 for arm in ("controlnet", "adapter")}
    verdict = "supported" if not any(worse.values()) else "not supported" if all(worse.values()) else "depends"
    study.claim("A ControlNet or adapter adds spatial control to a trained, frozen model as faithfully as training "
                "the model with the map concatenated from the start",
                f"mask IoU: ControlNet {_ci(spatial['controlnet'], 'iou', False)} and adapter "
                f"{_ci(spatial['adapter'], 'iou', False)} after {study.n(CONTROL_STEPS)} steps on the base, vs "
                f"concatenation {_ci(spatial['map'], 'iou', False)} "
                f"after {study.n(BASE_STEPS)} from scratch",
                verdict, ("on the network: below concatenation for " + ", ".join(a for a, w in worse.items() if w))
                if verdict == "depends" else "rule: neither below concatenation at p < 0.05")

    # 8. cost
    p = {arm: spatial[arm][0]["route_params"] for arm in SPATIAL_ROUTES}
    p |= {arm: classes[arm][0]["route_params"] for arm in CLASS_ROUTES}
    ctl_t, ada_t = _vals(spatial["controlnet"], "sample_s_per_image"), _vals(spatial["adapter"], "sample_s_per_image")
    heaviest = max(p, key=p.get)
    slower = compare(ctl_t, ada_t) > 0
    verdict = "supported" if heaviest == "controlnet" and p["adapter"] < p["controlnet"] and slower else "not supported"
    study.claim("A ControlNet is the costly route: it adds the most parameters (a trainable copy of the encoder) and "
                "slows sampling, where an adapter is light",
                "parameters added: " + ", ".join(f"{arm} {p[arm]:,}" for arm in sorted(p, key=p.get, reverse=True))
                + f"; sampling ms per image: ControlNet {fmt_ci(ctl_t, 1000, 1)}, adapter {fmt_ci(ada_t, 1000, 1)}",
                verdict, "rule: ControlNet adds the most parameters, more than the adapter, and samples slower than "
                "the adapter at p < 0.05")

    _tables(study, classes, spatial, names)
    _plots(study, classes, spatial, names)


def _tables(study: Study, classes: dict, spatial: dict, names: dict) -> None:
    from ldmkit.data.shapes import heldout_combos

    study.add("## The class routes\n\nOne U-Net (widths 32, 64; transformers at the 8x8 and 4x4 levels and the middle), "
              f"{study.n(CLASS_STEPS)} steps per arm on the first stage `runs/ae`; samples with DPM-Solver++ 2M, "
              f"{study.n(SAMPLE_STEPS, 2)} steps, guidance {GUIDANCE:g} against each route's own null condition. "
              "Accuracy is read by the independent attribute judge on the seen combinations' conditions (a label "
              "route gets the class, the caption the whole caption). Parameters added are counted against the "
              "same U-Net without the route (the caption route also reads a frozen MiniLM text encoder, 22.7 M "
              "parameters, not counted).")
    rows = []
    for arm, what in names.items():
        r = classes[arm]
        rows.append([f"{arm}: {what}", _ci(r, "class_acc"), _ci(r, "shape_acc"), _ci(r, "colour_acc"),
                     f"{r[0]['route_params']:,}", fmt_ci(_vals(r, "train_s_per_step"), 1000, 0),
                     fmt_ci(_vals(r, "sample_s_per_image"), 1000, 1)])
    study.table(["route", "shape and colour", "shape", "colour", "parameters added", "training ms/step",
                 "sampling ms/image"], rows)
    held = ", ".join(f"{c} {s} in the {p}" for s, c, p in heldout_combos(HOLDOUT))
    study.add(f"## Composition\n\nHeld out of training ({HOLDOUT} of 72, no attribute pair twice, so each pair was "
              f"seen together): {held}. Accuracy counts a sample right when shape, colour and position all are. A "
              "class id cannot compose a held-out combination by construction (it names no position, and an id "
              "never seen has an embedding no gradient reached), so the label route compared is the combination "
              "as three one-hot groups (3 + 6 + 4 maps, concatenated).")
    rows = []
    for arm in ("caption", "factors"):
        r = classes[arm]
        ratio = ", ".join(f"{x['held_acc'] / x['seen_acc']:.2f}" if x["seen_acc"] else "n/a" for x in r)
        seen_pos = _ci(r, "seen_position") if all("seen_position" in x for x in r) else "n/a"
        rows.append([names[arm], _ci(r, "seen_acc"), _ci(r, "held_acc"), ratio, _ci(r, "held_shape"),
                     _ci(r, "held_colour"), seen_pos, _ci(r, "held_position")])
    study.table(["route", "seen", "held out", "held-out / seen, per seed", "held-out shape", "held-out colour",
                 "seen position", "held-out position"], rows)
    study.add(f"## The spatial routes\n\n`shapes-free` (a shape anywhere in its quadrant, any size and angle), a "
              "U-Net of the same widths with self-attention at the 4x4 level and the middle; the "
              f"base model and the concatenation model train {study.n(BASE_STEPS)} steps, the ControlNet and the "
              f"adapter {study.n(CONTROL_STEPS)} more on the frozen base. Each is given {study.n(64, 4)} probe masks "
              "drawn independently of the training renderer; IoU of the generated shape's mask with the probe's.")
    rows = []
    for arm, what in (SPATIAL_ROUTES | {"base": "the base model, no map"}).items():
        r = spatial[arm]
        rows.append([f"{arm}: {what}", _ci(r, "iou", pct=False), f"{r[0]['route_params']:,}",
                     fmt_ci(_vals(r, "train_s_per_step"), 1000, 0), fmt_ci(_vals(r, "sample_s_per_image"), 1000, 1)])
    study.table(["route", "mask IoU", "parameters added", "training ms/step", "sampling ms/image"], rows)
    val = getattr(study, "ae_val", {}) or {}
    if val:
        study.add("First stage (held-out): " + ", ".join(f"{k} {v:.3g}" for k, v in val.items()
                                                        if isinstance(v, (int, float))) + ".")


def _plots(study: Study, classes: dict, spatial: dict, names: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bars(ax, labels, groups, title, ylabel):
        width = 0.8 / len(groups)
        for g, (name, series) in enumerate(groups.items()):
            ms = [mean_ci(v) for v in series]
            xs = [i + g * width for i in range(len(labels))]
            ax.bar(xs, [m for m, _ in ms], width, yerr=[0 if math.isnan(h) else h for _, h in ms], capsize=3, label=name)
        ax.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(labels))], labels, rotation=20)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if len(groups) > 1:
            ax.legend()

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    arms = list(CLASS_ROUTES)
    bars(axes[0], arms, {"accuracy": [_vals(classes[a], "class_acc") for a in arms]},
         "class (shape and colour) by route", "accuracy")
    axes[0].axhline(1 / 18, color="grey", linestyle=":", label="chance")
    bars(axes[1], ["caption", "factors"], {"seen": [_vals(classes[a], "seen_acc") for a in ("caption", "factors")],
                                           "held out": [_vals(classes[a], "held_acc") for a in ("caption", "factors")]},
         "composition: all three attributes", "accuracy")
    axes[1].axhline(1 / 72, color="grey", linestyle=":")
    sp = [*SPATIAL_ROUTES, "base"]
    bars(axes[2], sp, {"IoU": [_vals(spatial[a], "iou") for a in sp]}, "spatial map: mask IoU", "IoU")
    study.figure(fig, "routes.png", "Means over seeds with 95 % intervals: class accuracy per route, seen against "
                 "held-out combinations, and mask IoU of the spatial routes (base: no map); dotted: chance.")
