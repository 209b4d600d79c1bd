"""Study 2: why the U-Net suits denoising — each part switched off at the same training budget.

The FAQ's answer (Rombach et al., 2022, §3.3; Ho et al., 2020, App. B; Ronneberger et al., 2015):
ResBlocks modulated by the timestep, attention for global relations, skip connections that carry the
detail the bottleneck loses, several scales (detail at low noise, semantics at high noise), and
stable training. Every part is a switch of `UNetConfig`, so each arm is the recipe plus one `--set`:

    full          the recipe (`shapes-class`): skips, attention at level 1 and in the middle, the
                  (time + label) embedding as FiLM scale-shift in every ResBlock, two scales (8x8, 4x4)
    no-skips      the decoder gets only the bottleneck (`unet.use_skip_connections=false`)
    no-attention  no transformer anywhere (`unet.use_attention=false`)
    add           the embedding added as a bias, as in SD (`unet.emb_mode=add`), instead of FiLM
    one-scale     no down/upsampling: both levels at 8x8 (`unet.multiscale=false`)
    no-time       no time embedding (`unet.use_time_modulation=false`), and so no label either
    uncond        the full U-Net without the label: the control no-time is compared with

Conditioning is a class label (shape × colour, 18 classes) through the class embedding, for every
arm that has a time embedding: unlike a caption through cross-attention, it survives
`use_attention=false`, so the no-attention arm is judged on the same task. The label is added to the
time embedding, so the arm without time modulation cannot take it; it is compared with `uncond`,
the full U-Net trained without labels, on unconditional samples and held-out error.

All arms train on one first stage (trained once, seed 0, inside the study) for the same steps ×
batch, with 3 seeds each, and are judged by (i) the held-out denoising error per noise level
(`heldout_error`), (ii) the independent shapes judge on class-conditional samples (colour, shape)
and on the layout every training image has (one object, centred in a quadrant), (iii) parameters,
training step time and sampling time, (iv) the training loss (spikes, spread over seeds).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings

import numpy as np
import torch

from ldmkit.study.common import Study, compare, fmt_ci, mean_ci

TITLE = "Why the U-Net suits denoising: each part switched off"

RECIPE = "shapes-class"
AE_PRESET = "shapes"
ARMS: dict[str, tuple[list[str], str]] = {
    "full": ([], "the recipe: skips, attention, FiLM (time + label) embedding, two scales"),
    "no-skips": (["unet.use_skip_connections=false"], "the decoder gets only the bottleneck"),
    "no-attention": (["unet.use_attention=false"], "no transformer (self-attention) anywhere"),
    "add": (["unet.emb_mode=add"], "the embedding added as a bias (SD) instead of FiLM scale-shift"),
    "one-scale": (["unet.multiscale=false"], "no down/upsampling: both levels at the 8x8 latent resolution"),
    "no-time": (["unet.use_time_modulation=false", "unet.num_classes=0", "conditioner.num_classes=0"],
                "no time embedding, so no label either (labels enter through it)"),
    "uncond": (["unet.num_classes=0", "conditioner.num_classes=0"], "the full U-Net without labels: no-time's control"),
}
UNCONDITIONAL = ("no-time", "uncond")

# Budget at --budget 1, measured on the shared 2-core machine with 1 thread (see the report's timing).
STEPS = 400  # diffusion steps per run
BATCH = 32  # the recipe's batch
LR = 2e-3  # short runs: twice the recipe's rate (grad clipping at 1 keeps it stable)
AE_STEPS = 300  # first stage (batch 32): 26.5 dB, and the judge reads 100 % colour, 85 % shape on its reconstructions
HELDOUT_IMAGES = 128
SAMPLES_PER_LABEL = 4  # class-conditional samples per label per run (18 labels)
SAMPLE_STEPS, SAMPLER, GUIDANCE = 25, "dpmpp_2m", 2.0
# Noise levels of the held-out error: the low end is where fine detail is decided, the high end
# where the layout is (Rombach et al., 2022, Fig. 2; Choi et al., 2022, "Perception prioritized training").
T_GRID = (25, 100, 200, 400, 600, 800, 950)
LOW_T, HIGH_T = (25, 100), (800, 950)
SPIKE = 3.0  # a logged loss above SPIKE × the median of the previous SPIKE_WINDOW ones is a spike
SPIKE_WINDOW = 10
STABLE_CV = 0.05  # the full U-Net's held-out error may vary by at most 5 % (std / mean) over seeds


# --- measures -------------------------------------------------------------------------------------


def layout(image) -> dict[str, bool]:
    """The layout every `shapes` training image has, read from a sample (3, H, W) in [-1, 1]:
    `one_object` — exactly one foreground blob of at least MIN_PIXELS pixels; `placed` — the largest
    blob's centroid within 0.1 of the side from a quadrant centre (the data puts it within 0.02 of it
    plus, for a triangle, a third of its radius). Both are relations across the whole image, which a
    network sees only through a receptive field as large as the image: attention's claimed job."""
    from scipy import ndimage

    from ldmkit.evaluate.attributes import FOREGROUND, MIN_PIXELS, _to_uint8

    img = _to_uint8(image)
    h, w, _ = img.shape
    blobs, n = ndimage.label(img.max(axis=2) > FOREGROUND, structure=np.ones((3, 3)))
    sizes = np.bincount(blobs.ravel())[1:] if n else np.zeros(0, int)
    big = int((sizes >= MIN_PIXELS).sum())
    if big == 0:
        return {"one_object": False, "placed": False}
    ys, xs = np.nonzero(blobs == 1 + int(sizes.argmax()))
    cy, cx = (ys.mean() + 0.5) / h, (xs.mean() + 0.5) / w
    off = min(math.hypot(cy - qy, cx - qx) for qy in (0.25, 0.75) for qx in (0.25, 0.75))
    return {"one_object": big == 1, "placed": off <= 0.1}


def spikes(losses: list[float], skip: int = 0, factor: float = SPIKE, window: int = SPIKE_WINDOW) -> int:
    """Logged losses (after the first `skip`) above `factor` × the median of the `window` before them."""
    return sum(1 for i in range(max(skip, window), len(losses))
               if losses[i] > factor * statistics.median(losses[i - window : i]))


def excess(arm: list[list[float]], ref: list[list[float]]) -> list[list[float]]:
    """Per-seed relative excess of an arm's error over the reference's mean, at each timestep:
    arm_s(t) / mean_s'(ref_s'(t)) − 1 (scale-free, so noise levels with large and small errors count alike)."""
    ref_mean = [sum(col) / len(col) for col in zip(*ref)]
    return [[a / r - 1 for a, r in zip(row, ref_mean)] for row in arm]


def _at(rows: list[list[float]], ts: tuple[int, ...], which: tuple[int, ...]) -> list[float]:
    """Per-seed mean of the columns of `rows` (one per timestep of `ts`) at the timesteps `which`."""
    cols = [ts.index(t) for t in which if t in ts]
    return [sum(r[c] for c in cols) / len(cols) for r in rows]


# --- runs -----------------------------------------------------------------------------------------


def _first_stage(study: Study):
    return study.train_autoencoder("autoencoder", AE_PRESET, [
        f"optim.steps={study.n(AE_STEPS, 4)}", f"optim.warmup_steps={study.n(50, 1)}",
        f"data.length={study.n(7200, 144)}", f"data.val_images={study.n(256, 16)}",
        f"logging.val_every={study.n(AE_STEPS, 4)}", f"logging.ckpt_every={study.n(AE_STEPS, 4)}",
        f"latent_stat_batches={study.n(20, 2)}"])


def _warmup(steps: int) -> int:
    return max(1, steps // 10)


def _overrides(study: Study, arm: str, seed: int) -> list[str]:
    steps = study.n(STEPS, 4)
    return [*ARMS[arm][0], f"optim.steps={steps}", f"optim.lr={LR}", f"optim.warmup_steps={_warmup(steps)}",
            f"optim.seed={seed}", f"data.length={study.n(7200, 144)}",
            f"data.latent_cache={study.out / 'latents'}", "logging.log_every=5", f"logging.val_every={steps}",
            f"logging.ckpt_every={steps}", "sample.num=8", "sample.steps=10"]


@torch.no_grad()
def _measure(study: Study, arm: str, run, data) -> dict:
    """Held-out error per timestep, judged samples, parameters, step and sampling time, loss log."""
    import ldmkit
    from ldmkit.data.shapes import COLOURS, SHAPES
    from ldmkit.evaluate.attributes import check_attributes
    from ldmkit.evaluate.diffusion import heldout_error
    from ldmkit.generation import GenerationRequest, generate
    from ldmkit.imageio import save_grid
    from ldmkit.train.log import TrainLog

    ldm = ldmkit.load(run)
    h = heldout_error(ldm, data, seed=0, timesteps=T_GRID)
    k = study.n(SAMPLES_PER_LABEL, 1)
    labels = list(range(len(SHAPES) * len(COLOURS)))
    t0 = time.perf_counter()
    if arm in UNCONDITIONAL:
        images = torch.cat([generate(ldm, GenerationRequest(batch_size=len(labels), seed=1000 * s + 7, steps=SAMPLE_STEPS,
                                                           sampler=SAMPLER, guidance=1.0)).images for s in range(k)])
    else:
        images = torch.cat([generate(ldm, GenerationRequest(labels=labels, batch_size=len(labels), seed=1000 * s + 7,
                                                           steps=SAMPLE_STEPS, sampler=SAMPLER, guidance=GUIDANCE)).images
                            for s in range(k)])
    sample_s = (time.perf_counter() - t0) / len(images)
    res = {"params": sum(p.numel() for p in ldm.unet.parameters()), "sample_ms": 1000 * sample_s,
           "eps_t": h["eps_mse_t"], "eps": h["eps_mse"], "t": h["t"]}
    lay = [layout(img) for img in images]
    res["one_object"] = sum(x["one_object"] for x in lay) / len(lay)
    res["placed"] = sum(x["placed"] for x in lay) / len(lay)
    if arm not in UNCONDITIONAL:
        want = [(SHAPES[lab // len(COLOURS)], list(COLOURS)[lab % len(COLOURS)]) for lab in labels] * k
        found = [check_attributes(img) for img in images]
        ok_c = [f["colour"] == w[1] for f, w in zip(found, want)]
        ok_s = [f["shape"] == w[0] for f, w in zip(found, want)]
        res.update(colour=sum(ok_c) / len(want), shape=sum(ok_s) / len(want),
                   both=sum(a and b for a, b in zip(ok_c, ok_s)) / len(want), gain=h["gain"])
    recs = [r for r in TrainLog(run).records() if "loss" in r]
    warm = _warmup(study.n(STEPS, 4))
    rates = [r["images_per_s"] for r in recs if r["step"] > warm]
    res["step_ms"] = 1000 * BATCH / statistics.median(rates) if rates else math.nan
    res["losses"] = [r["loss"] for r in recs]
    res["loss_steps"] = [r["step"] for r in recs]
    res["spikes"] = spikes(res["losses"], skip=sum(1 for r in recs if r["step"] <= warm))
    if not (study.out / f"samples_{arm}.png").exists():
        save_grid(images[: len(labels)], study.out / f"samples_{arm}.png", nrow=len(labels), upscale=2)
    return res


@torch.no_grad()
def _ceiling(ae_dir, data) -> dict:
    """The judge on the first stage's reconstructions of the held-out images: what no sample can beat."""
    import ldmkit
    from ldmkit.evaluate.attributes import score_captions

    ae = ldmkit.load(ae_dir)
    return score_captions(ae.decode(ae.encode(data.images).mean), list(data.texts))


# --- the study ------------------------------------------------------------------------------------


def run(study: Study) -> None:
    from ldmkit.data import build_dataset
    from ldmkit.data.tensors import materialize

    ae, ae_meta = _first_stage(study)
    steps = study.n(STEPS, 4)
    data = materialize(build_dataset("shapes", 32, "val", seed=0, length=study.n(HELDOUT_IMAGES, 8)),
                       limit=study.n(HELDOUT_IMAGES, 8), progress=False)
    k = study.n(SAMPLES_PER_LABEL, 1)
    m: dict[str, list[dict]] = {}
    for arm in ARMS:
        for seed in range(study.seeds):
            name = f"{arm}-s{seed}"
            run_dir, meta = study.train_diffusion(name, RECIPE, _overrides(study, arm, seed), ae)
            study.command(f"# in-process: held-out ε-error at t = {', '.join(map(str, T_GRID))} on {len(data)} "
                          f"validation images (ldmkit.evaluate.diffusion.heldout_error), {k} samples per label "
                          f"({SAMPLER}, {SAMPLE_STEPS} steps, guidance "
                          f"{1.0 if arm in UNCONDITIONAL else GUIDANCE}) read by the shapes judge — as "
                          f"`ldmkit evaluate --checkpoint {run_dir} --data shapes --seeds {k} --num-images {len(data)}`")
            m.setdefault(arm, []).append(study.cached(f"{name}-{steps}", lambda: _measure(study, arm, run_dir, data)))
    _report(study, m, ae_meta, study.cached("first-stage-ceiling", lambda: _ceiling(ae, data)), steps, k, len(data))


def _col(m: dict[str, list[dict]], arm: str, key: str) -> list[float]:
    return [float(r[key]) for r in m[arm]]


def _pct(values: list[float]) -> str:
    return fmt_ci(values, 100, 1, " %")


def _report(study: Study, m: dict[str, list[dict]], ae_meta: dict, ceiling: dict, steps: int, k: int,
            n_heldout: int) -> None:
    ts = tuple(m["full"][0]["t"])
    val = ae_meta.get("val") or {}
    study.add(f"""## Setup

Every arm is the `{RECIPE}` recipe plus one switch, trained for {steps} steps × batch {BATCH} at learning rate
{LR} (the same for all) with {study.seeds} seeds, on one first stage trained once inside the study
(`{AE_PRESET}` preset, {study.n(AE_STEPS, 4)} steps × batch 32: held-out PSNR {val.get('psnr', math.nan):.1f} dB). The judge reads colour
{100 * ceiling['colour']:.1f} % and shape {100 * ceiling['shape']:.1f} % right on its reconstructions of the held-out images: the
ceiling of every arm's sample scores.

**Conditioning.** Every arm with a time embedding is conditioned on a class label (shape × colour, 18 classes)
through the class embedding, not on a caption: a caption enters through cross-attention, which
`use_attention=false` removes, so the no-attention arm would lose its condition; the label does not. The label
is added to the time embedding, so the arm without time modulation cannot take it: that arm is compared with
`uncond`, the full U-Net trained without labels, on unconditional samples.

**Measures.** Held-out error: mean ‖ε̂ − ε‖² over {n_heldout} validation images at each t of {list(ts)}
(seeded noise, the same for every arm). Samples: {k} per label ({SAMPLER}, {SAMPLE_STEPS} steps, guidance
{GUIDANCE}; unconditional arms {k}×18 samples at guidance 1), read by the independent shapes judge (colour,
shape) and for the layout every training image has (*one object*; *placed*: centroid within 0.1 of the side from
a quadrant centre). Step time: median over the logged intervals after warm-up (1 thread, shared machine);
sampling time per image. Loss spikes: a logged batch loss above {SPIKE:g}× the median of the {SPIKE_WINDOW} before it.

| arm | what is switched off |
| --- | --- |
""" + "\n".join(f"| {a} | {ARMS[a][1]} (`{' '.join('--set ' + o for o in ARMS[a][0]) or 'the recipe'}`) |"
                 for a in ARMS))

    rows = []
    for arm in ARMS:
        cond = arm not in UNCONDITIONAL
        rows.append([arm, f"{m[arm][0]['params'] / 1e6:.3f} M", fmt_ci(_col(m, arm, "step_ms"), 1, 0),
                     fmt_ci(_col(m, arm, "sample_ms"), 1, 1), fmt_ci(_col(m, arm, "eps"), 1, 4),
                     _pct(_col(m, arm, "colour")) if cond else "–", _pct(_col(m, arm, "shape")) if cond else "–",
                     _pct(_col(m, arm, "both")) if cond else "–", _pct(_col(m, arm, "one_object")),
                     _pct(_col(m, arm, "placed")), sum(int(r["spikes"]) for r in m[arm])])
    study.add("## Results\n\nMeans ± 95 % interval over seeds.")
    study.table(["arm", "U-Net params", "train step (ms)", "sampling (ms/image)", "held-out ε-MSE", "colour",
                 "shape", "colour & shape", "one object", "placed", "loss spikes (all seeds)"], rows)
    study.table(["arm", *[f"t = {t}" for t in ts]],
                [[arm, *[fmt_ci([r["eps_t"][i] for r in m[arm]], 1, 4) for i in range(len(ts))]] for arm in ARMS])
    _figures(study, m, ts)
    with warnings.catch_warnings():  # Welch's test on seeds that agree exactly (e.g. 100 % everywhere) warns
        warnings.simplefilter("ignore", RuntimeWarning)
        _claims(study, m, ts)


def _figures(study: Study, m: dict[str, list[dict]], ts: tuple[int, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in ARMS:
        rows = [r["eps_t"] for r in m[arm]]
        mean = [mean_ci(col)[0] for col in zip(*rows)]
        half = [mean_ci(col)[1] for col in zip(*rows)]
        a1.errorbar(ts, mean, yerr=[0 if math.isnan(h) else h for h in half], label=arm, capsize=3, marker="o", ms=3)
        ref = "uncond" if arm in UNCONDITIONAL else "full"
        if arm != ref:
            ex = excess(rows, [r["eps_t"] for r in m[ref]])
            a2.errorbar(ts, [100 * mean_ci(c)[0] for c in zip(*ex)],
                        yerr=[0 if math.isnan(h) else 100 * h for h in (mean_ci(c)[1] for c in zip(*ex))],
                        label=f"{arm} vs {ref}", capsize=3, marker="o", ms=3)
    a1.set(xlabel="timestep t (noise level)", ylabel="held-out ε-MSE", yscale="log", title="held-out error per noise level")
    a2.axhline(0, color="grey", lw=0.8)
    a2.set(xlabel="timestep t (noise level)", ylabel="excess over the reference (%)", title="what each switch costs, per noise level")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    study.figure(fig, "heldout_by_t.png", "Held-out denoising error per noise level (left) and each arm's relative "
                 "excess over its reference (right): full for the conditional arms, uncond for no-time. Bars: 95 % intervals over seeds.")

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in ARMS:
        curves = [r["losses"] for r in m[arm]]
        n = min(len(c) for c in curves)
        mean = np.mean([c[:n] for c in curves], axis=0)
        ax.plot(m[arm][0]["loss_steps"][:n], mean, label=arm, lw=1)
    ax.set(xlabel="step", ylabel="training loss (batch, mean over seeds)", yscale="log", title="training loss")
    ax.legend(fontsize=7)
    study.figure(fig, "loss.png", "Training loss of each arm (logged batch losses, mean over seeds).")

    from PIL import Image

    fig, axes = plt.subplots(len(ARMS), 1, figsize=(10, 0.8 * len(ARMS) + 0.4))
    for ax, arm in zip(axes, ARMS):
        path = study.out / f"samples_{arm}.png"
        if path.exists():
            with Image.open(path) as im:
                ax.imshow(np.asarray(im.convert("RGB")))
        ax.set_ylabel(arm, rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    study.figure(fig, "samples.png", "Samples of seed 0 of each arm: one per label (circle, square, triangle × "
                 "red, green, blue, yellow, magenta, cyan) for the conditional arms; 18 unconditional ones for no-time and uncond.")


# --- claims ---------------------------------------------------------------------------------------

LOWER_IS_BETTER = {"eps", "eps_low", "eps_high", "step_ms", "sample_ms"}
NAMES = {"eps": "held-out ε-MSE", "eps_low": f"ε-MSE at t ∈ {set(LOW_T)}", "eps_high": f"ε-MSE at t ∈ {set(HIGH_T)}",
         "colour": "colour", "shape": "shape", "both": "colour & shape", "one_object": "one object",
         "placed": "placed", "step_ms": "train step (ms)"}


def _values(m: dict[str, list[dict]], arm: str, key: str, ts: tuple[int, ...]) -> list[float]:
    if key == "eps_low":
        return _at([r["eps_t"] for r in m[arm]], ts, LOW_T)
    if key == "eps_high":
        return _at([r["eps_t"] for r in m[arm]], ts, HIGH_T)
    return _col(m, arm, key)


def _vs(m, arm: str, ref: str, key: str, ts) -> tuple[str, int]:
    """'shape 40.1 ± 3.0 % vs 80.2 ± 2.0 % (p = 0.001)' and +1 when `arm` is resolved worse than `ref`,
    -1 when resolved better, 0 when not resolved (Welch, p < 0.05)."""
    from ldmkit.study.common import welch_p

    a, b = _values(m, arm, key, ts), _values(m, ref, key, ts)
    lower = key in LOWER_IS_BETTER
    show = (lambda v: fmt_ci(v, 1, 4)) if key.startswith("eps") else (lambda v: fmt_ci(v, 1, 0)) if lower else _pct
    c = compare(a, b)
    return f"{NAMES[key]} {show(a)} vs {show(b)} (p = {welch_p(a, b):.3f})", (c if lower else -c)


def _split(m, arm: str, ref: str, keys: list[str], ts) -> tuple[list[str], list[str], list[str]]:
    """(all comparisons as text, the measures on which `arm` is resolved worse, those resolved better)."""
    texts, worse, better = [], [], []
    for key in keys:
        text, sign = _vs(m, arm, ref, key, ts)
        texts.append(text)
        (worse if sign > 0 else better if sign < 0 else []).append(NAMES[key])
    return texts, worse, better


def _located(m, arm: str, ref: str, ts, where: str) -> tuple[str, bool]:
    """Does switching a part off cost most at one end of the noise range? Per-seed relative excess
    over `ref` at that end against the other end (Welch): True when resolved larger there."""
    from ldmkit.study.common import welch_p

    ex = excess([r["eps_t"] for r in m[arm]], [r["eps_t"] for r in m[ref]])
    low, high = _at(ex, ts, LOW_T), _at(ex, ts, HIGH_T)
    here, there = (low, high) if where == "low" else (high, low)
    per_t = [sum(col) / len(col) for col in zip(*ex)]
    peak = max(range(len(ts)), key=lambda i: per_t[i])
    text = (f"excess over {ref} at low noise {fmt_ci(low, 100, 1, ' %')}, at high noise {fmt_ci(high, 100, 1, ' %')} "
            f"(p = {welch_p(low, high):.3f}), largest at t = {ts[peak]} ({100 * per_t[peak]:+.1f} %)")
    return text, compare(here, there) == 1


def _harm_verdict(arm: str, worse: list[str], better: list[str]) -> tuple[str, str]:
    """Supported when switching the part off (`arm`) is resolved worse on some measure and better on none."""
    if worse and not better:
        return "supported", f"{arm} is resolved worse on {', '.join(worse)}, better on nothing"
    if worse and better:
        return "depends", f"on the measure: {arm} is worse on {', '.join(worse)}, better on {', '.join(better)}"
    if better:
        return "not supported", f"{arm} is resolved better on {', '.join(better)}, worse on nothing"
    return "not supported", f"no difference between {arm} and its reference resolved"


def _two_facets(a: bool, b: bool, a_name: str, b_name: str) -> tuple[str, str]:
    if a and b:
        return "supported", f"both the {a_name} and the {b_name} say so"
    if a or b:
        yes, no = (a_name, b_name) if a else (b_name, a_name)
        return "depends", f"on the measure: the {yes} says so, the {no} does not"
    return "not supported", f"neither the {a_name} nor the {b_name} says so"


def _claims(study: Study, m: dict[str, list[dict]], ts: tuple[int, ...]) -> None:
    # 1. Time modulation (Ho et al., 2020, App. B: the timestep embedding added in every ResBlock).
    texts, worse, better = _split(m, "no-time", "uncond", ["eps", "one_object", "placed"], ts)
    study.claim("ResBlocks modulated by the timestep matter: without the time embedding the U-Net denoises worse",
                "no-time vs uncond (both without labels): " + "; ".join(texts), *_harm_verdict("no-time", worse, better))

    # 2. FiLM / AdaGN scale-shift against the additive bias (Dhariwal & Nichol, 2021, §3: AdaGN helps FID).
    texts, worse, better = _split(m, "add", "full", ["eps", "colour", "shape", "both"], ts)
    study.claim("Timestep/label modulation as FiLM scale-shift beats adding the embedding as a bias",
                "add vs full (FiLM): " + "; ".join(texts), *_harm_verdict("add", worse, better))

    # 3. Attention: global relations, decided at high noise (where the layout is set).
    texts, worse, _ = _split(m, "no-attention", "full", ["eps_high", "one_object", "placed", "both"], ts)
    where, concentrated = _located(m, "no-attention", "full", ts, "high")
    noise = NAMES["eps_high"] in worse and concentrated
    lay = NAMES["one_object"] in worse or NAMES["placed"] in worse
    study.claim("Attention captures global relations: removing it costs most at high noise and in the image's layout",
                "no-attention vs full: " + "; ".join(texts) + "; " + where,
                *_two_facets(noise, lay, "loss per noise level (worse at high noise, and most there)",
                             "sample layout (one object, placed)"))

    # 4. Skips: the detail the bottleneck loses, decided at low noise.
    texts, worse, _ = _split(m, "no-skips", "full", ["eps_low", "shape", "colour"], ts)
    where, concentrated = _located(m, "no-skips", "full", ts, "low")
    noise = NAMES["eps_low"] in worse and concentrated
    study.claim("Skip connections carry the detail the bottleneck loses: removing them costs most at low noise "
                "and in the shape", "no-skips vs full: " + "; ".join(texts) + "; " + where,
                *_two_facets(noise, NAMES["shape"] in worse, "loss per noise level (worse at low noise, and most there)",
                             "shape accuracy"))

    # 5. Several scales: one scale at the full resolution is worse, or slower for the same steps.
    texts, worse, better = _split(m, "one-scale", "full", ["eps", "both", "one_object", "placed"], ts)
    step_text, slower = _vs(m, "one-scale", "full", "step_ms", ts)
    if worse and not better:
        verdict, why = "supported", f"worse on {', '.join(worse)}" + (", and slower" if slower > 0 else "")
    elif slower > 0:
        verdict, why = "depends", ("on what is counted: no worse at equal steps" if not better else
                                   f"on what is counted: better on {', '.join(better)} at equal steps") + ", but slower per step"
    elif worse:
        verdict, why = "depends", f"on the measure: worse on {', '.join(worse)}, better on {', '.join(better)}"
    else:
        verdict, why = "not supported", "neither worse nor slower"
    study.claim("Several scales help: a single-scale network is worse or slower", "one-scale vs full: "
                + "; ".join(texts + [step_text]), verdict, why)

    # 6. Stable training: no loss spikes, the same result from every seed.
    parts, unstable = [], []
    for arm in ARMS:
        eps = _col(m, arm, "eps")
        cv = statistics.stdev(eps) / statistics.mean(eps) if len(eps) > 1 else math.nan
        n_spikes = sum(int(r["spikes"]) for r in m[arm])
        parts.append(f"{arm} {n_spikes} spikes, ε-MSE {fmt_ci(eps, 1, 4)} (spread {100 * cv:.1f} %)")
        if arm != "full" and (n_spikes or cv > STABLE_CV):
            unstable.append(arm)
        if arm == "full":
            stable = n_spikes == 0 and cv <= STABLE_CV
    why = (f"the full U-Net had no spike and its held-out error varied by at most {100 * STABLE_CV:g} % over seeds"
           if stable else f"the full U-Net spiked or varied by more than {100 * STABLE_CV:g} % over seeds")
    study.claim("The U-Net trains stably (no loss spikes, the same result from every seed)",
                "loss spikes over all seeds and the seed spread (std / mean) of the held-out ε-MSE: " + "; ".join(parts),
                "supported" if stable else "not supported",
                why + (f"; less stable without a part: {', '.join(unstable)}" if unstable else ""))
