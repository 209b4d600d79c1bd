"""Study 1 of the FAQ: why the first stage is a KL-regularised autoencoder.

The FAQ (and Rombach et al., 2022, §3) says the first stage is an autoencoder with a slight KL
penalty towards N(0, I) (and an adversarial loss on its decodes) because (a) the KL term gives a
smooth, structured latent space, (b) at little cost in reconstruction, (c) so that the second stage
learns better on it than on a plain autoencoder's latents, (d) the adversarial loss gives more
realistic decodes at some PSNR cost, and (e) the factor f trades compression against fidelity.

Every arm is the same network trained by `ldmkit train-autoencoder` with `--set` overrides: a plain
AE, KL at several weights, KL + PatchGAN, at f = 4 and f = 8; then the same second-stage recipe (a
class-conditioned U-Net on `shapes`, an unconditional one on `faces`) is trained on each latent
space for the same number of steps and judged: the attribute checker on `shapes`, a Fréchet
distance in the features of a small network trained on the faces on `faces`. A plain AE's latents
are normalised by their measured mean and std exactly like a VAE's (the latent scale, §4.3.2), so
the second stage sees unit-variance inputs from every arm: the comparison is of the spaces' shape,
not of their scale.
"""

from __future__ import annotations

import math

import torch

from ldmkit.study.common import Study, compare, fmt_ci, mean_ci

TITLE = "Why a KL-regularised first stage? (FAQ question 1)"

# First-stage arms: label and the overrides of the `shapes` / `faces` autoencoder presets.
KINDS = {
    "ae": ("plain AE", ["model.variational=false"]),
    "kl1e-6": ("KL 1e-6", ["loss.kl_weight=1e-6"]),
    "kl1e-4": ("KL 1e-4", ["loss.kl_weight=1e-4"]),
    "kl1e-2": ("KL 1e-2", ["loss.kl_weight=1e-2"]),
    "kl-gan": ("KL 1e-6 + PatchGAN", ["loss.kl_weight=1e-6", "loss.disc_enabled=true", "loss.disc_channels=32"]),
}
KL_KINDS = ("kl1e-6", "kl1e-4", "kl1e-2")
# f = 2^(levels − 1); f = 8 adds one level of the same width, so only the factor changes (4 latent
# channels at both: f = 8 keeps 4 values per 8x8 block where f = 4 keeps 4 per 4x4).
FACTORS = {4: "model.channel_mult=[1, 2, 2]", 8: "model.channel_mult=[1, 2, 2, 2]"}

# Recipes at budget 1, sized so that the default grid (27 first stages, each with its second stage)
# fits 30 min on this 2-core CPU with nothing else running: it took 15.6 min there (a first stage of
# 1,000 steps at batch 4 ~23 s, a second stage of 300 steps at batch 16 ~11 s; fixed costs such as
# building the data weigh as much as the steps). The first stages get 1,000 steps, not the 600 of an
# earlier version, because they reconstruct better (shapes: 27.8 dB against 25.1). At equal compute, more
# small steps beat fewer large ones: on held-out shapes, 800 steps of batch 4 reconstructed at 26.3 dB
# (the attribute checker reading 91 % of reconstructions as their originals) where 400 of batch 8
# reached 22.1 dB (31 %).
AE_STEPS = 1000
AE_SETS = ["model.base_channels=16", "model.norm_groups=8", "optim.batch_size=4", "optim.lr=1e-3",
           "optim.warmup_steps=50", "latent_stat_batches=10", "data.val_images=128"]
LDM_STEPS = {"shapes": 300, "faces": 300}
LDM_PRESET = {"shapes": "shapes-class", "faces": "faces"}
LDM_SETS = ["unet.model_channels=16", "optim.batch_size=16", "optim.warmup_steps=20", "data.val_images=64",
            "sample.num=8"]
SAMPLE_STEPS = 20  # dpmpp_2m steps when judging samples
FAKES = 180  # unconditional samples per `faces` run, judged against the 90 training faces
LITTLE_DB = 1.0  # "costs little reconstruction": a PSNR loss below this, in dB


def plan(budget: float) -> dict[tuple[str, int], tuple[str, ...]]:
    """(dataset, f) -> first-stage kinds run at this budget. Budget ≥ 2 runs every kind at f = 4 and
    8 on both datasets; the default (≥ 0.25) narrows f = 8 and `faces` to the arms the key claims
    need; below that (tests) a smoke grid keeps one arm per claim."""
    every = tuple(KINDS)
    if budget >= 2:
        return {(d, f): every for d in ("shapes", "faces") for f in (4, 8)}
    if budget >= 0.25:
        return {("shapes", 4): every, ("shapes", 8): ("ae", "kl1e-6"), ("faces", 4): ("ae", "kl1e-6")}
    return {("shapes", 4): ("ae", "kl1e-6", "kl1e-2", "kl-gan"), ("shapes", 8): ("kl1e-6",), ("faces", 4): ("ae", "kl1e-6")}


def arm_name(dataset: str, f: int, kind: str) -> str:
    return f"{dataset}-f{f}-{kind}"


# --- one arm, one seed -------------------------------------------------------------------------


def _length(study: Study, dataset: str) -> list[str]:
    """`shapes` is procedural: 20 jittered copies of each of the 72 combinations at budget 1 are plenty
    for a few thousand training images, and rendering (and encoding) the preset's default set would
    cost each run more than its steps."""
    return [f"data.length={study.n(1440, floor=144)}"] if dataset == "shapes" else []


def _first_stage(study: Study, dataset: str, f: int, kind: str, seed: int):
    steps = study.n(AE_STEPS, floor=4)
    sets = [*AE_SETS, FACTORS[f], *KINDS[kind][1], f"optim.steps={steps}", f"optim.seed={seed}",
            f"logging.val_every={steps}", f"logging.ckpt_every={steps}", *_length(study, dataset)]
    if kind == "kl-gan":  # the discriminator joins half-way, as the LDM recipe starts it late (App. G)
        sets.append(f"loss.disc_start={steps // 2}")
    if study.budget < 0.25:
        sets += ["data.val_images=16", "latent_stat_batches=2"]
    return study.train_autoencoder(f"{arm_name(dataset, f, kind)}-s{seed}-ae", dataset, sets)


def _second_stage(study: Study, dataset: str, f: int, kind: str, seed: int, ae_dir):
    steps = study.n(LDM_STEPS[dataset], floor=4)
    sets = [*LDM_SETS, f"optim.steps={steps}", f"optim.seed={seed}", f"logging.val_every={steps}",
            f"logging.ckpt_every={steps}", *_length(study, dataset)]
    if study.budget < 0.25:
        sets += ["data.val_images=16"]
    return study.train_diffusion(f"{arm_name(dataset, f, kind)}-s{seed}-ldm", LDM_PRESET[dataset], sets, ae_dir)


@torch.no_grad()
def _measure_first_stage(study: Study, dataset: str, ae_dir, meta: dict) -> dict:
    import ldmkit
    from ldmkit.data import build_dataset
    from ldmkit.data.tensors import materialize
    from ldmkit.evaluate.autoencoder import reconstruction_figures
    from ldmkit.evaluate.latent_probes import (interpolation_roughness, latent_statistics, prior_realism,
                                               prior_samples, sharpness)

    ae = ldmkit.load(ae_dir)
    n = study.n(128, floor=16)
    val = materialize(build_dataset(dataset, 32, "val"), n, progress=False).images
    rec_figures, _ = reconstruction_figures(ae, val)
    rec = torch.cat([ae.decode(ae.encode(val[i : i + 64]).mode()).clamp(-1, 1) for i in range(0, len(val), 64)])
    res = {"psnr": rec_figures["psnr"], "ssim": rec_figures["ssim"], "kl_per_element": rec_figures["kl_per_element"],
           "latent": latent_statistics(ae, val), "roughness": interpolation_roughness(ae, val, pairs=min(16, len(val) // 2)),
           "sharpness": sharpness(rec, val), "train_seconds": meta.get("train_seconds")}
    if dataset == "shapes":
        res["prior_realism"] = prior_realism(ae, n=study.n(256, floor=16))
    else:  # faces: no judge reads a face, so a distribution distance to the training faces stands in
        from ldmkit.evaluate.frechet import frechet_distance

        real = _real_images(dataset)
        recon = torch.cat([ae.decode(ae.encode(real[i : i + 64]).mode()).clamp(-1, 1) for i in range(0, len(real), 64)])
        res["recon_distance"] = frechet_distance(real, recon, dataset)
        res["prior_distance"] = frechet_distance(real, prior_samples(ae, len(real), 32), dataset)
    return res


def unet_step_seconds(ldm, batch: int = 16, repeats: int = 5) -> float:
    """Seconds of one training step (forward, backward) of `ldm`'s U-Net on a batch of its latents: the
    fastest of `repeats`, since other work on a shared CPU only ever adds time."""
    import time

    unet = ldm.unet
    c, s = unet.config.in_channels, ldm.config.image_size // ldm.autoencoder.downsample_factor
    z = torch.randn(batch, c, s, s)
    t = torch.randint(0, 1000, (batch,))
    cond = ldm.conditioner.uncond(batch)
    best = math.inf
    with torch.enable_grad():
        unet.train()
        for _ in range(repeats):
            start = time.perf_counter()
            unet(z, t, cond).pow(2).mean().backward()
            best = min(best, time.perf_counter() - start)
        unet.zero_grad(set_to_none=True)
        unet.eval()
    return best


def unet_gflops(ldm, batch: int = 16) -> float:
    """GFLOPs of one training step (forward and backward) of `ldm`'s U-Net on a batch of its latents,
    counted by torch's FlopCounterMode (matrix products and convolutions): the cost of a step on any
    machine, where a timed step measures this machine and whatever else it is running."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = ldm.unet
    c, s = unet.config.in_channels, ldm.config.image_size // ldm.autoencoder.downsample_factor
    z, t = torch.randn(batch, c, s, s), torch.randint(0, 1000, (batch,))
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), counter:
        unet(z, t, ldm.conditioner.uncond(batch)).pow(2).mean().backward()
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


def _real_images(dataset: str) -> torch.Tensor:
    from ldmkit.data import build_dataset
    from ldmkit.data.tensors import materialize

    return materialize(build_dataset(dataset, 32, "train"), 10_000, progress=False).images


@torch.no_grad()
def _measure_second_stage(study: Study, dataset: str, ldm_dir, meta: dict) -> dict:
    import ldmkit

    ldm = ldmkit.load(ldm_dir)
    steps = int(meta.get("step", 1))
    res = {"seconds_per_step": float(meta.get("train_seconds", math.nan)) / max(1, steps),
           "unet_step": unet_step_seconds(ldm)}
    if dataset == "shapes":
        from ldmkit.evaluate.diffusion import evaluate_diffusion

        seeds = study.n(4, floor=1)
        r = evaluate_diffusion(ldm, ldm_dir / "evaluation", seeds=seeds, steps=SAMPLE_STEPS, guidance=2.0,
                               dataset=dataset, num_images=study.n(64, floor=8))
        res.update(colour=r["label"]["colour"], shape=r["label"]["shape"],
                   fidelity=(r["label"]["colour"] + r["label"]["shape"]) / 2, samples=r["label"]["n"])
    else:
        from ldmkit.evaluate.frechet import frechet_distance
        from ldmkit.imageio import save_grid

        real = _real_images(dataset)
        n = study.n(FAKES, floor=16)  # more than the 90 real faces: the fake side's estimate is then the surer
        from ldmkit.generation import GenerationRequest, generate

        # batches of 60, batch k seeded 1000 + 60·k (GenerationRequest.batches)
        fake = generate(ldm, GenerationRequest(num_images=n, batch_size=60, steps=SAMPLE_STEPS, sampler="dpmpp_2m",
                                               seed=1000)).images
        save_grid(fake[:32], ldm_dir / "samples_judged.png", nrow=8, upscale=2)
        res.update(distance=frechet_distance(real, fake, dataset), samples=len(fake))
    return res


# --- the study ---------------------------------------------------------------------------------


def run(study: Study) -> None:
    grid = plan(study.budget)
    if any(d == "faces" for d, _ in grid):  # trained once (and cached) before any no-grad measurement needs it
        from ldmkit.evaluate.frechet import feature_network

        feature_network("faces", 32)
    res: dict[tuple[str, int, str], list[dict]] = {}
    for (dataset, f), kinds in grid.items():
        for kind in kinds:
            for seed in range(study.seeds):
                name = f"{arm_name(dataset, f, kind)}-s{seed}"
                ae_dir, ae_meta = _first_stage(study, dataset, f, kind, seed)
                first = study.cached(f"{name}-first-stage", lambda: _measure_first_stage(study, dataset, ae_dir, ae_meta))
                ldm_dir, ldm_meta = _second_stage(study, dataset, f, kind, seed, ae_dir)
                second = study.cached(f"{name}-second-stage",
                                      lambda: _measure_second_stage(study, dataset, ldm_dir, ldm_meta))
                res.setdefault((dataset, f, kind), []).append(
                    {**first, **second, "abs_kurtosis": abs(first["latent"]["kurtosis"])})
    _record_evaluations(study, grid)
    _report(study, grid, res)


def _record_evaluations(study: Study, grid) -> None:
    """The in-process measurements, as the commands that give the same figures (or what they are)."""
    runs = study.out / "runs"
    study.command(f"# each first stage: ldmkit evaluate --checkpoint {runs}/ARM-sSEED-ae --num-images {study.n(128, 16)} "
                  "(PSNR, SSIM, KL); plus ldmkit.evaluate.latent_probes on the same held-out images")
    study.command(f"# each shapes second stage: ldmkit evaluate --checkpoint {runs}/ARM-sSEED-ldm --seeds "
                  f"{study.n(4, 1)} --steps {SAMPLE_STEPS} --guidance 2 --num-images {study.n(64, 8)}")
    if any(d == "faces" for d, _ in grid):
        n = study.n(FAKES, floor=16)
        study.command(f"# each faces second stage: ldmkit sample --checkpoint {runs}/ARM-sSEED-ldm --num-samples {n} "
                      f"--steps {SAMPLE_STEPS} --sampler dpmpp_2m (in batches of 60, seeds 1000, 1060, ...), then "
                      "ldmkit.evaluate.frechet.frechet_distance against the 90 training faces")


# --- claims ------------------------------------------------------------------------------------


def _vals(res, key, dataset, f, kind, sub: str | None = None) -> list[float]:
    runs = res.get((dataset, f, kind), [])
    return [float(r[key][sub] if sub else r[key]) for r in runs if key in r]


def _ci(res, key, dataset, f, kind, sub=None, scale=1.0, digits=2, unit="") -> str:
    v = _vals(res, key, dataset, f, kind, sub)
    return fmt_ci(v, scale, digits, unit) if v else "–"


def _better(res, key, dataset, f, kind, ref, higher: bool) -> int:
    """+1 if `kind` beats `ref` on `key` (resolved by Welch at p < 0.05), −1 if worse, 0 unresolved."""
    a, b = _vals(res, key, dataset, f, kind), _vals(res, key, dataset, f, ref)
    if not a or not b:
        return 0
    return compare(a, b) * (1 if higher else -1)


def _aggregate(outcomes: list[tuple[str, int]], groups: list[str] | None = None) -> tuple[str, str]:
    """Verdict from (what, +1/0/−1) comparisons, each of a group (the KL weight it tests; one group if
    None): wins and losses both → depends; wins in every group and no loss → supported; wins in some
    groups and nothing resolved in the others → depends (on the group); losses only, or nothing
    resolved → not supported."""
    groups = groups or [""] * len(outcomes)
    wins = [w for w, o in outcomes if o > 0]
    losses = [w for w, o in outcomes if o < 0]
    won = {g for g, (_, o) in zip(groups, outcomes) if o > 0}
    silent = [g for g in dict.fromkeys(groups) if g not in won]
    if wins and losses:
        return "depends", f"better: {', '.join(wins)}; worse: {', '.join(losses)}"
    if wins and silent:
        return "depends", (f"on the KL weight: better only at {', '.join(sorted(won))} ({', '.join(wins)}); "
                           f"nothing resolved at {', '.join(silent)}")
    if wins:
        return "supported", f"better: {', '.join(wins)}; no comparison resolved the other way"
    if losses:
        return "not supported", f"worse: {', '.join(losses)}; none resolved better"
    return "not supported", "no difference resolved at p < 0.05"


def _report(study: Study, grid, res) -> None:
    shapes_f = sorted(f for d, f in grid if d == "shapes")
    faces_f = sorted(f for d, f in grid if d == "faces")
    n_ae, n_ldm = study.n(AE_STEPS, floor=4), {d: study.n(s, floor=4) for d, s in LDM_STEPS.items()}

    study.add("## What was run\n\n"
              f"Each arm is the same first-stage network (widths 16/32/32, one ResBlock per level, 4 latent channels, "
              f"L2 reconstruction) trained {n_ae} steps at batch 4 on 32-px images, {study.seeds} seeds; on each, the "
              f"same second stage for {n_ldm['shapes']} steps at batch 16 (`shapes`: the `shapes-class` U-Net at widths 16/32, "
              f"class = shape × colour) or {n_ldm['faces']} steps (`faces`: the unconditional `faces` U-Net at widths 16/32). The grid "
              "at this budget (kinds per dataset and factor):\n\n"
              + "\n".join(f"- `{d}`, f = {f}: {', '.join(KINDS[k][0] for k in kinds)}" for (d, f), kinds in grid.items())
              + ("\n\nNarrowed at this budget: f = 8 only for the plain AE and KL 1e-6, `faces` only at f = 4 and "
                 "for the plain AE and KL 1e-6; `--budget 2` or more runs every kind at both factors "
                 "on both datasets." if study.budget < 2 else "")
              + "\n\n**The latent scale.** Every first stage, the plain AE included, stores the mean and std of its "
              "training latents, and the second stage learns z' = (z − shift) · scale, unit variance for every arm. "
              "So the plain AE is not handicapped by an arbitrary scale: what differs between arms is the shape of the "
              "latent distribution, not its size. Without that normalisation a plain AE's latents would meet a noise "
              "schedule built for unit variance, and the comparison would measure the scale instead.\n\n"
              "**Earlier measurement** (docs/design.md, \"Why a VAE and not a plain AE?\"): at kl_weight 1e-6 the KL "
              "term did not make the latent space smoother by these probes (700 steps, widths 32/64/64).")

    # first-stage table
    rows = []
    for (d, f), kinds in grid.items():
        for k in kinds:
            row = [f"`{d}` f={f}", KINDS[k][0], _ci(res, "psnr", d, f, k), _ci(res, "ssim", d, f, k, digits=3),
                   _ci(res, "kl_per_element", d, f, k), _ci(res, "latent", d, f, k, "std", digits=3),
                   _ci(res, "latent", d, f, k, "kurtosis"), _ci(res, "roughness", d, f, k),
                   _ci(res, "sharpness", d, f, k, digits=3)]
            row.append(_ci(res, "prior_realism", d, f, k, scale=100, digits=1, unit=" %") if d == "shapes"
                       else _ci(res, "prior_distance", d, f, k, digits=1))
            rows.append(row)
    study.add("## First stage\n\nHeld-out images; PSNR (dB) and SSIM of the posterior mean's decode; KL per latent "
              "element (nats; 0 for the plain AE); the raw latent std (what the KL term acts on) and the excess "
              "kurtosis of the normalised latents (0 for a Gaussian); interpolation roughness (decoded path length "
              "over endpoint distance along the straight line between two latents, 1 = straight); sharpness (Laplacian "
              "energy of decodes over the originals', < 1 = blur); decoded N(0, I) samples: on `shapes` the fraction "
              "the attribute checker reads as one palette-coloured shape, on `faces` their distance to the training "
              "faces (lower is better). Mean ± 95 % interval over seeds.")
    study.table(["data", "first stage", "PSNR", "SSIM", "KL/element", "latent std", "kurtosis", "roughness",
                 "sharpness", "prior samples"], rows)

    # second-stage table
    rows = []
    for (d, f), kinds in grid.items():
        for k in kinds:
            fid = (f"colour {_ci(res, 'colour', d, f, k, scale=100, digits=1)} %, shape "
                   f"{_ci(res, 'shape', d, f, k, scale=100, digits=1)} %, mean {_ci(res, 'fidelity', d, f, k, scale=100, digits=1)} %"
                   if d == "shapes" else _ci(res, "distance", d, f, k, digits=1))
            rows.append([f"`{d}` f={f}", KINDS[k][0], fid, _ci(res, "seconds_per_step", d, f, k, scale=1000, digits=0),
                         _ci(res, "unet_step", d, f, k, scale=1000, digits=1)])
    dist = _distance_name("faces") if faces_f else "the distance"
    study.add(f"## Second stage on each latent space\n\nThe same recipe and steps on every arm. `shapes`: class "
              f"fidelity of {study.n(4, 1) * 18} samples per run (every class × {study.n(4, 1)} seeds, dpmpp_2m "
              f"{SAMPLE_STEPS} steps, guidance 2), read by the independent attribute checker; 'mean' is the mean of "
              f"colour and shape accuracy, the run's fidelity. `faces`: {dist} between {study.n(FAKES, floor=16)} "
              "unconditional samples and "
              "the 90 training faces (lower is better). Milliseconds per training step: the run's wall time over its steps "
              "(start-up and the latent encoding included, on a shared CPU), and the fastest of 5 timed U-Net steps "
              "(forward and backward, batch 16) after training.")
    study.table(["data", "first stage", "fidelity / distance", "ms per step (run)", "ms per U-Net step"], rows)
    _figures(study, grid, res)
    best = max((mean_ci(_vals(res, "psnr", "shapes", 4, k))[0] for k in grid.get(("shapes", 4), ())), default=math.nan)
    study.add("## Reading these figures\n\n"
              f"- **Short training.** At this budget the best `shapes` first stage reconstructs at {best:.1f} dB, where "
              "the `shapes` preset's recipe (700 steps at batch 32, twice as wide) reaches 33.7 dB; the verdicts are about first and "
              "second stages trained for minutes on a CPU. `--budget 4` trains every run four times longer.\n"
              "- **Roughness and blur.** A decoder that loses detail draws straight, featureless paths: a first stage "
              "whose latent carries little (a strong KL weight) scores a low roughness for that reason. Read roughness "
              "beside PSNR and sharpness.\n"
              "- **Kurtosis** is that of all normalised latent values pooled. On `shapes` most latent cells code the "
              "black background and a few code the shape, so every arm's latents can be heavy-tailed; the probe asks "
              "which is nearer a Gaussian, the distribution the noise schedule assumes.\n"
              "- **Time per step** of the second stage depends on the latent's size alone, not on how the first stage "
              "was trained; f = 8 has a quarter of f = 4's latent positions.")
    _claims(study, grid, res, shapes_f, faces_f)


def _distance_name(dataset: str) -> str:
    try:
        from ldmkit.evaluate.frechet import distance_name

        return distance_name(dataset)
    except Exception:  # noqa: BLE001 - a name only, for the text
        return "Fréchet distance"


def _claims(study: Study, grid, res, shapes_f, faces_f) -> None:
    has = lambda d, f, k: k in grid.get((d, f), ())  # noqa: E731

    # (1) smoother, more structured latent space: the probes, each KL weight against the plain AE
    out, groups = [], []
    for d, f in grid:
        for k in KL_KINDS:
            if not (has(d, f, k) and has(d, f, "ae")):
                continue
            groups += [KINDS[k][0]] * 3
            where = f"{KINDS[k][0]} {d} f={f}"
            out.append((f"{where} roughness", _better(res, "roughness", d, f, k, "ae", higher=False)))
            out.append((f"{where} |kurtosis|", _better(res, "abs_kurtosis", d, f, k, "ae", higher=False)))
            if d == "shapes":
                out.append((f"{where} prior realism", _better(res, "prior_realism", d, f, k, "ae", higher=True)))
            else:
                out.append((f"{where} prior distance", _better(res, "prior_distance", d, f, k, "ae", higher=False)))
    verdict, why = _aggregate(out, groups)
    m = "; ".join(f"{KINDS[k][0]} `{d}` f={f}: roughness {_ci(res, 'roughness', d, f, k)}, kurtosis "
                  f"{_ci(res, 'latent', d, f, k, 'kurtosis')}, prior "
                  + (f"{_ci(res, 'prior_realism', d, f, k, scale=100, digits=1)} %" if d == "shapes"
                     else f"distance {_ci(res, 'prior_distance', d, f, k, digits=1)}")
                  for d, f in grid for k in ("ae", *KL_KINDS) if has(d, f, k))
    study.claim("The KL term gives a smoother, more structured latent space than a plain AE's",
                "interpolation roughness (lower = smoother), excess kurtosis of the normalised latents (nearer 0 = "
                f"nearer a Gaussian) and decoded N(0, I) samples: {m}", verdict, why)

    # (2) at little cost in reconstruction
    out, cost_txt = [], []
    for d, f in grid:
        for k in KL_KINDS:
            if not (has(d, f, k) and has(d, f, "ae")):
                continue
            cost = mean_ci(_vals(res, "psnr", d, f, "ae"))[0] - mean_ci(_vals(res, "psnr", d, f, k))[0]
            worse = _better(res, "psnr", d, f, k, "ae", higher=True) < 0
            little = cost < LITTLE_DB or not worse
            cost_txt.append(f"`{d}` f={f}: {KINDS[k][0]} {_ci(res, 'psnr', d, f, k)} dB against "
                            f"{_ci(res, 'psnr', d, f, 'ae')} dB, cost {cost:+.2f} dB")
            out.append((f"{KINDS[k][0]} {d} f={f}", 1 if little else -1))
    cheap = [w for w, o in out if o > 0]
    dear = [w for w, o in out if o < 0]
    verdict = "supported" if cheap and not dear else "not supported" if dear and not cheap else "depends"
    why = (f"little (< {LITTLE_DB:g} dB or unresolved): {', '.join(cheap) or 'none'}; more: {', '.join(dear) or 'none'}"
           + ("; depends on the KL weight" if verdict == "depends" else ""))
    study.claim("The KL term costs little reconstruction quality",
                "held-out PSNR of each KL arm against the plain AE; cost = the plain AE's minus the KL arm's (positive = "
                "the KL costs): " + "; ".join(cost_txt),
                verdict, why)

    # (3) the key claim: the second stage learns better on KL latents
    out, groups = [], []
    for d, f in grid:
        for k in KL_KINDS:
            if has(d, f, k) and has(d, f, "ae"):
                key, higher = ("fidelity", True) if d == "shapes" else ("distance", False)
                out.append((f"{KINDS[k][0]} {d} f={f}", _better(res, key, d, f, k, "ae", higher)))
                groups.append(KINDS[k][0])
    verdict, why = _aggregate(out, groups)
    m = "; ".join(f"`{d}` f={f} {KINDS[k][0]}: "
                  + (f"fidelity {_ci(res, 'fidelity', d, f, k, scale=100, digits=1)} %" if d == "shapes"
                     else f"distance {_ci(res, 'distance', d, f, k, digits=1)}")
                  for d, f in grid for k in ("ae", *KL_KINDS) if has(d, f, k))
    study.claim("The second stage learns better on KL latents than on a plain AE's (same recipe, same steps)",
                m, verdict, why)

    # (4) adversarial decoder loss: more realistic decodes at some PSNR cost
    out, psnr_txt = [], []
    for d, f in grid:
        if has(d, f, "kl-gan") and has(d, f, "kl1e-6"):
            out.append((f"sharpness {d} f={f}", _better(res, "sharpness", d, f, "kl-gan", "kl1e-6", higher=True)))
            if d == "faces":
                out.append((f"decode distance {d} f={f}",
                            _better(res, "recon_distance", d, f, "kl-gan", "kl1e-6", higher=False)))
            psnr_txt.append(f"`{d}` f={f}: PSNR {_ci(res, 'psnr', d, f, 'kl-gan')} against {_ci(res, 'psnr', d, f, 'kl1e-6')}, "
                            f"sharpness {_ci(res, 'sharpness', d, f, 'kl-gan', digits=3)} against "
                            f"{_ci(res, 'sharpness', d, f, 'kl1e-6', digits=3)}"
                            + (f", decode distance {_ci(res, 'recon_distance', d, f, 'kl-gan', digits=1)} against "
                               f"{_ci(res, 'recon_distance', d, f, 'kl1e-6', digits=1)}" if d == "faces" else ""))
    verdict, why = _aggregate(out)
    cost = [f"{d} f={f}" for d, f in grid if has(d, f, "kl-gan") and has(d, f, "kl1e-6")
            and _better(res, "psnr", d, f, "kl-gan", "kl1e-6", higher=True) < 0]
    why += f"; PSNR cost resolved: {', '.join(cost) or 'none'}"
    study.claim("An adversarial (PatchGAN) decoder loss gives more realistic decodes (sharper, closer in distribution) "
                "at some PSNR cost", "KL 1e-6 + PatchGAN against KL 1e-6: " + "; ".join(psnr_txt), verdict, why)

    # (5) f = 4 against f = 8: compression against fidelity, and a cheaper second stage
    pairs = [(d, k) for d in ("shapes", "faces") for k in KINDS if has(d, 4, k) and has(d, 8, k)]
    lower_psnr = [compare(_vals(res, "psnr", d, 8, k), _vals(res, "psnr", d, 4, k)) for d, k in pairs]
    # the cost of a step is counted, not timed: a count needs no test, and times on a shared CPU wander
    flops = {(d, f): _step_gflops(study, d, f, k) for d, k in pairs for f in (4, 8)}
    cheaper = all(flops[(d, 8)] < flops[(d, 4)] for d, _ in pairs)
    if not pairs:
        verdict, why = "depends", "no arm was run at both factors at this budget"
    elif not cheaper:
        verdict, why = "not supported", "the f = 8 second stage does not cost fewer FLOPs per step"
    elif all(x < 0 for x in lower_psnr):
        verdict, why = "supported", "f = 8 reconstructs worse (every pair resolved) and its second stage costs fewer FLOPs"
    elif all(x >= 0 for x in lower_psnr):
        verdict, why = "not supported", "f = 8 did not reconstruct measurably worse in any pair"
    else:
        verdict, why = "depends", (f"on the first stage: PSNR resolved lower at f = 8 for "
                                   f"{', '.join(KINDS[k][0] for (d, k), x in zip(pairs, lower_psnr) if x < 0)}, not for "
                                   f"{', '.join(KINDS[k][0] for (d, k), x in zip(pairs, lower_psnr) if x >= 0)}; "
                                   "the second stage costs fewer FLOPs at f = 8")
    m = "; ".join(f"`{d}` {KINDS[k][0]}: PSNR {_ci(res, 'psnr', d, 4, k)} (f=4) / {_ci(res, 'psnr', d, 8, k)} (f=8), "
                  f"GFLOPs per U-Net training step (batch 16) {flops[(d, 4)]:.2f} / {flops[(d, 8)]:.2f}, "
                  f"timed ms per step {_ci(res, 'unet_step', d, 4, k, scale=1000, digits=1)} / "
                  f"{_ci(res, 'unet_step', d, 8, k, scale=1000, digits=1)}, "
                  + (f"fidelity {_ci(res, 'fidelity', d, 4, k, scale=100, digits=1)} % / "
                     f"{_ci(res, 'fidelity', d, 8, k, scale=100, digits=1)} %" if d == "shapes" else
                     f"distance {_ci(res, 'distance', d, 4, k, digits=1)} / {_ci(res, 'distance', d, 8, k, digits=1)}")
                  for d, k in pairs)
    study.claim("A larger factor (f = 8 against f = 4, 4 latent channels) trades reconstruction fidelity for a "
                "cheaper second stage", m or "no arm at both factors", verdict, why)


def _step_gflops(study: Study, dataset: str, f: int, kind: str) -> float:
    import ldmkit

    name = f"{arm_name(dataset, f, kind)}-s0"
    return study.cached(f"{name}-unet-gflops", lambda: unet_gflops(ldmkit.load(study.run_dir(f"{name}-ldm"))))


def _figures(study: Study, grid, res) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # reconstruction against second-stage quality, every arm of `shapes`
    panels = [d for d in ("shapes", "faces") if any(dd == d for dd, _ in grid)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, d in zip(axes[0], panels):
        key, label = (("fidelity", "class fidelity (%)") if d == "shapes" else
                      ("distance", _distance_name(d).split(" (")[0] + " (lower is better)"))
        scale = 100 if d == "shapes" else 1
        for (dd, f), kinds in grid.items():
            if dd != d:
                continue
            for k in kinds:
                x, xe = mean_ci(_vals(res, "psnr", d, f, k))
                y, ye = mean_ci([v * scale for v in _vals(res, key, d, f, k)])
                if math.isnan(x) or math.isnan(y):
                    continue
                ax.errorbar(x, y, xerr=0 if math.isnan(xe) else xe, yerr=0 if math.isnan(ye) else ye,
                            fmt="o" if f == 4 else "s", capsize=3, label=f"{KINDS[k][0]}, f={f}")
        ax.set_xlabel("first-stage held-out PSNR (dB)")
        ax.set_ylabel(label)
        ax.set_title(f"{d}: second stage against reconstruction")
        ax.legend(fontsize=7)
    study.figure(fig, "reconstruction_vs_second_stage.png",
                 "Each first stage's reconstruction (x) against the second stage trained on it (y); mean ± 95 % interval "
                 "over seeds; circles f = 4, squares f = 8.")

    # images of seed 0: reconstructions, interpolation, prior samples, second-stage samples (shapes, f = 4)
    import ldmkit
    from ldmkit.data import build_dataset
    from ldmkit.data.tensors import materialize
    from ldmkit.evaluate.latent_probes import prior_samples
    from ldmkit.generation import GenerationRequest, generate

    kinds = grid.get(("shapes", 4), ())
    if not kinds:
        return
    val = materialize(build_dataset("shapes", 32, "val"), 8, progress=False).images
    rows = []
    with torch.no_grad():
        for k in kinds:
            ae = ldmkit.load(study.run_dir(f"{arm_name('shapes', 4, k)}-s0-ae"))
            rec = ae.decode(ae.encode(val[:4]).mode()).clamp(-1, 1)
            za, zb = ae.encode(val[4:5]).mode(), ae.encode(val[5:6]).mode()
            s = torch.linspace(0, 1, 6)[:, None, None, None]
            interp = ae.decode((1 - s) * za + s * zb).clamp(-1, 1)
            prior = prior_samples(ae, 6, 32, seed=0)
            ldm = ldmkit.load(study.run_dir(f"{arm_name('shapes', 4, k)}-s0-ldm"))
            samples = generate(ldm, GenerationRequest(labels=[0, 4, 8, 13, 17, 3], batch_size=6, steps=SAMPLE_STEPS,
                                                      sampler="dpmpp_2m", guidance=2.0, seed=7)).images
            rows.append((KINDS[k][0], [rec, interp, prior, samples]))
    titles = ["reconstructions", "interpolation", "decoded N(0, I)", "second-stage samples"]
    fig, axes = plt.subplots(len(rows), 4, figsize=(16, 1.3 * len(rows) + 0.6), squeeze=False)
    for r, (label, panels_) in enumerate(rows):
        for c, imgs in enumerate(panels_):
            strip = torch.cat(list(imgs), dim=2)  # (3, H, n·W)
            axes[r][c].imshow(((strip.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
            if r == 0:
                axes[r][c].set_title(titles[c], fontsize=9)
            if c == 0:
                axes[r][c].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    study.figure(fig, "shapes_f4_images.png",
                 "`shapes`, f = 4, seed 0 of each arm: reconstructions of held-out images, a straight-line interpolation "
                 "between two latents, decoded N(0, I) samples, and the second stage's samples (classes red circle, "
                 "magenta circle, blue square, green triangle, cyan triangle, yellow circle).")
