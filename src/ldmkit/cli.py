"""`ldmkit …` command line.

Every command takes --help; bad input ends with one line on stderr and a non-zero exit, never a
traceback unless --debug (DESIGN.md, "Contracts").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from ldmkit.errors import LdmkitError, TrainingInterrupted, disk_full
from ldmkit.imageio import check_writable_dir

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse type: a finite `kind` (int or float) in [low, high] ((low, high] with `low_open`), so a bad
    value is refused before any work starts, with argparse's one usage line and exit 2."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (v <= low if low_open else v < low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if low_open else '>='} {low:g}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"{text} must be <= {high:g}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE = _number(int, 1)
NON_NEGATIVE = _number(float, 0)


def _add_config_args(p: argparse.ArgumentParser, presets: list[str]) -> None:
    p.add_argument("--config", default=presets[0], help=f"preset ({', '.join(presets)}) or a YAML/JSON file (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", help="override one field, e.g. optim.steps=200 (repeatable)")


def cmd_train_autoencoder(args: argparse.Namespace) -> int:
    from ldmkit.train.autoencoder import train_autoencoder
    from ldmkit.train.config import AUTOENCODER_PRESETS, AutoencoderTrainConfig, load_config

    cfg = load_config(args.config, AutoencoderTrainConfig, AUTOENCODER_PRESETS, args.overrides)
    if args.data is not None:
        cfg.data.dataset = args.data
    if args.skip_bad_images:
        cfg.data.skip_bad_images = True
    check_writable_dir(args.out)
    folder = train_autoencoder(cfg, args.out, resume=args.resume, progress=not args.quiet)
    meta = json.loads((folder / "config.json").read_text())["meta"]
    v = meta["val"]
    print(
        f"autoencoder saved to {folder}: held-out PSNR {v['psnr']:.2f} dB"
        + (f" (bicubic down/up: {v['bicubic_psnr']:.2f} dB)" if "bicubic_psnr" in v else "")
        + f", SSIM {v['ssim']:.4f}, "
        f"latent scale {1 / meta['latent_stats']['std']:.4f} shift {meta['latent_stats']['mean']:.4f}, "
        f"{meta['train_seconds']:.0f} s"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ldmkit.train.config import DIFFUSION_PRESETS, DiffusionTrainConfig, load_config, parse_overrides
    from ldmkit.train.diffusion import train_diffusion

    cfg = load_config(args.config, DiffusionTrainConfig, DIFFUSION_PRESETS, args.overrides)
    if args.autoencoder:
        cfg.autoencoder = args.autoencoder
    if args.init_from:
        cfg.finetune.init_from = args.init_from
    if cfg.finetune.init_from and (chosen := parse_overrides(args.overrides).get("diffusion")) is not None:
        keys = [f"diffusion.{k}" for k in sorted(chosen)] if isinstance(chosen, dict) else ["diffusion"]
        raise LdmkitError(f"{', '.join(keys)}: a fine-tune trains with the diffusion process of the model it starts "
                          "from; set the loss's finetune.weighting, finetune.min_snr_gamma or finetune.offset_noise "
                          "instead (the schedule and prediction type are the model's)")
    if args.data is not None:
        cfg.data.dataset = args.data
    if args.skip_bad_images:
        cfg.data.skip_bad_images = True
    check_writable_dir(args.out)
    folder = train_diffusion(cfg, args.out, resume=args.resume, progress=not args.quiet)
    print(f"diffusion model saved to {folder}; sample with: ldmkit sample --checkpoint {args.out} --out SAMPLES")
    if cfg.finetune.train == "lora":
        lora = Path(args.out) / "lora.safetensors"
        if cfg.finetune.decoder_steps:
            print(f"LoRA adapter ({cfg.lora.format} layout): {lora}; this run also fine-tuned the first stage's "
                  f"decoder, so apply the adapter to a base with that decoder (the run's own checkpoint has both)")
        else:
            print(f"LoRA adapter ({cfg.lora.format} layout): {lora}; apply it to the base with: "
                  f"ldmkit sample --checkpoint {cfg.finetune.init_from} --lora {lora}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import ldmkit
    from ldmkit.control import Adapter, ControlNet, MultiControlNet
    from ldmkit.pipeline import LatentDiffusion
    from ldmkit.sample import read_image, read_prompts_file, read_tiny_decoder, sample_to_folder
    from ldmkit.device import autocast, pick_device
    from ldmkit.checkpoint import load_control, weights_sha256

    if args.num_samples is not None and (args.prompt or args.prompts_file or args.label):
        raise LdmkitError(f"--num-samples is for unconditional models; with prompts or labels use "
                          f"--num-per-prompt {args.num_samples} (images per prompt)")
    check_writable_dir(args.out)  # before the model is loaded
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    device = pick_device(args.device, "--device")
    amp = autocast(args.precision, device, "--precision")  # refuses fp16 off CUDA before anything is loaded
    unsupported = {"--controlnet": args.controlnet, "--lora-dir": args.lora_dir, "--embeddings-dir": args.embeddings_dir}
    source, skip = None, frozenset()
    if args.backend != "torch":
        from ldmkit.generation.openvino import refuse_unsupported
        from ldmkit.sample import load_skip

        refuse_unsupported(args.backend, **unsupported)
        if not args.lora:  # a merged LoRA changes the weights the files hold: keyed by the weights then
            # the parts whose IR is cached for these files are not read at all (most of a second run's loading)
            source, skip = load_skip(args.backend, args.checkpoint, args.config, args.backend_cache, device,
                                     precision=args.precision)

    ldm = ldmkit.load(args.checkpoint, config=args.config, device=device, skip=skip)
    _fill_sampling_defaults(args, args.checkpoint)
    nets = []
    if isinstance(ldm, (ControlNet, Adapter)):  # a train-control folder: its meta names the base model
        net, ldm, _ = load_control(args.checkpoint, device=device)
        nets.append(net)
    if not isinstance(ldm, LatentDiffusion):
        raise LdmkitError(
            f"{args.checkpoint} holds a {type(ldm).__name__}, not a diffusion model; "
            "give the folder `ldmkit train` wrote or a Stable Diffusion pipeline"
        )
    decoder = read_tiny_decoder(args.tiny_decoder, ldm, device) if args.tiny_decoder else None
    if args.lora:
        from ldmkit.interop.lora import apply_loras

        apply_loras(ldm, args.lora)  # merged into the weights; several add up
    if args.negative_prompt is not None and not ldm.config.conditioner.text_encoder:
        raise LdmkitError("--negative-prompt needs a text-conditioned model; this one has no text route")
    for path in args.controlnet or []:
        net = ldmkit.load(path, device=device)
        if not isinstance(net, (ControlNet, Adapter)):
            raise LdmkitError(f"--controlnet {path} holds a {type(net).__name__}, not a ControlNet or adapter")
        nets.append(net)
    from ldmkit.generation import HiresPass

    spatial = {"strength": args.strength, "keep_known": args.keep_known, "overlay": args.overlay, "spacing": args.sigmas,
               "height": args.height, "width": args.width, "resize_mode": args.resize_mode}
    if args.hires_scale is not None:
        spatial["hires"] = HiresPass(scale=args.hires_scale, upscaler=args.hires_upscaler,
                                     second_pass_steps=args.hires_steps, denoising_strength=args.hires_denoise)
    elif args.hires_steps or args.hires_upscaler != "latent" or args.hires_denoise != 0.7:
        raise LdmkitError("--hires-steps/--hires-upscaler/--hires-denoise set the hires pass; turn it on with --hires-scale")
    from ldmkit.generation.request import micro_option

    spatial.update(micro_option(m) for m in args.micro or [])  # SDXL's size/crop/aesthetic values
    size = None  # images at their own size: generation fits them to --height/--width with --resize-mode
    control = None
    if args.embeddings_dir:
        try:
            from ldmkit.conditioning.embeddings import attach_embeddings
        except ImportError:
            raise LdmkitError("--embeddings-dir needs ldmkit.conditioning.embeddings, which this build lacks") from None
        attach_embeddings(ldm.conditioner, args.embeddings_dir)
    networks = None
    if args.lora_dir:
        try:
            from ldmkit.interop.lora_library import LoraLibrary
        except ImportError:
            raise LdmkitError("--lora-dir needs ldmkit.interop.lora_library, which this build lacks") from None
        networks = LoraLibrary(args.lora_dir)
    maps, scales = list(args.control or []), list(args.control_scale or [])
    if maps and not nets:
        raise LdmkitError("--control needs a ControlNet or adapter: --controlnet DIR, or --checkpoint a train-control run")
    if nets:
        if len(maps) != len(nets):
            raise LdmkitError(f"{len(nets)} ControlNet/adapter(s) but {len(maps)} --control image(s); give one per network, in order")
        if scales and len(scales) not in (1, len(nets)):
            raise LdmkitError(f"{len(scales)} --control-scale values for {len(nets)} networks; give one, or one per network")
        images = [read_image(m, n.config.hint_channels, size, "control image", False) for m, n in zip(maps, nets)]
        if len(nets) == 1:
            control = nets[0]
            spatial.update(control_image=images[0], control_scale=scales[0] if scales else None)
        else:
            if any(isinstance(n, Adapter) for n in nets):
                raise LdmkitError("several control networks can only be ControlNets (their residuals are summed); "
                                  "use one adapter at a time")
            control = MultiControlNet(nets)
            spatial.update(control_image=images,
                           control_scale=(scales * len(nets) if len(scales) == 1 else scales) or None)
    if args.init_image:
        spatial["init_image"] = read_image(args.init_image, 3, size, "init image", True)
    elif args.strength != 1.0:
        raise LdmkitError("--strength is for img2img; give --init-image")
    if args.mask:
        spatial["mask"] = read_image(args.mask, 1, size, "mask", False)
    if args.backend != "torch":  # OpenVINO carries its own precision: no autocast around it
        import contextlib

        from ldmkit.generation.openvino import with_backend

        ldm = with_backend(ldm, args.backend, args.precision, args.backend_cache, source, **unsupported,
                           **{"a ControlNet": nets})
        amp = contextlib.nullcontext()
    with amp:
        paths = sample_to_folder(
            ldm, args.out, prompts=prompts or None, labels=args.label, num_per_prompt=args.num_per_prompt,
            num_samples=args.num_samples or 16, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
            guidance_rescale=args.guidance_rescale, seed=None if args.seed < 0 else args.seed, batch_size=args.batch_size, progress=not args.quiet,
            negative_prompt=args.negative_prompt, model_name=Path(args.checkpoint).name,
            model_hash=(weights_sha256(args.checkpoint) or "")[:10] or None, control=control, networks=networks,
            sampler_options=args.sampler_options, decoder=decoder, **spatial,
        )
    print(f"wrote {len(paths) - 1} images and {paths[-1]}")
    return 0


SAMPLING_DEFAULTS = {"sampler": "dpmpp_2m", "steps": 25}


def _fill_sampling_defaults(args: argparse.Namespace, checkpoint: str, guidance: float = 1.0) -> None:
    """--sampler, --steps and --guidance the user left out: the checkpoint's own (meta.sampling, e.g. a
    distilled model's lcm, 4 steps, guidance 1), else the command's defaults."""
    from ldmkit.interop.convert import sampling_defaults_any

    own = sampling_defaults_any(checkpoint)
    for key, default in {**SAMPLING_DEFAULTS, "guidance": guidance}.items():
        if getattr(args, key) is None:
            setattr(args, key, type(default)(own.get(key, default)))
    # a distilled student's timesteps are its distillation grid (lcm's `grid_steps`), whatever sampler was asked
    args.sampler_options = {"grid_steps": int(own["grid_steps"])} if own.get("grid_steps") else {}


def cmd_distill(args: argparse.Namespace) -> int:
    from ldmkit.train.config import load_config
    from ldmkit.train.distill import DISTILL_PRESETS, DistillConfig, distill

    cfg = load_config(args.config, DistillConfig, DISTILL_PRESETS, args.overrides)
    if args.teacher:
        cfg.teacher = args.teacher
    if args.data is not None:
        cfg.data.dataset = args.data
    check_writable_dir(args.out)
    folder = distill(cfg, args.out, resume=args.resume, progress=not args.quiet)
    if cfg.guidance_range is not None:
        lo, hi = cfg.guidance_range
        scale = f"guidance {cfg.guidance:g} by default, any --guidance in [{lo:g}, {hi:g}] at no extra cost"
    else:
        scale = f"guidance {cfg.guidance:g} folded in, so sample at guidance 1 (the default)"
    print(f"distilled model saved to {folder}; sample with: ldmkit sample --checkpoint {args.out} --out SAMPLES "
          f"(lcm, {cfg.sample_steps} steps; {scale})")
    if cfg.train == "lora":
        print(f"LCM-LoRA adapter: {Path(args.out) / 'lora.safetensors'}; on the teacher: ldmkit sample --checkpoint "
              f"{cfg.teacher} --lora {Path(args.out) / 'lora.safetensors'} --sampler lcm --steps {cfg.sample_steps} "
              "--guidance 1")
    return 0


def cmd_distill_decoder(args: argparse.Namespace) -> int:
    from ldmkit.train.config import load_config
    from ldmkit.train.distill_decoder import DECODER_PRESETS, DecoderDistillConfig, distill_decoder

    cfg = load_config(args.config, DecoderDistillConfig, DECODER_PRESETS, args.overrides)
    if args.autoencoder:
        cfg.autoencoder = args.autoencoder
    if args.data is not None:
        cfg.data.dataset = args.data
    check_writable_dir(args.out)
    folder = distill_decoder(cfg, args.out, resume=args.resume, progress=not args.quiet)
    meta = json.loads((folder / "config.json").read_text())["meta"]
    v, t = meta["val"], meta["decode_time"]
    print(f"tiny decoder saved to {folder}: held-out PSNR {v['psnr_decoder']:.2f} dB against the full decoder, "
          f"{v['psnr_images']:.2f} dB against the images (full decoder: {v['full_psnr_images']:.2f} dB); decodes "
          f"{t['images']} images in {1000 * t['tiny_seconds']:.1f} ms (full decoder: {1000 * t['full_seconds']:.1f} ms), "
          f"trained in {meta['train_seconds']:.0f} s; use it with: ldmkit sample --tiny-decoder {args.out}")
    return 0


def cmd_train_control(args: argparse.Namespace) -> int:
    from ldmkit.train.config import load_config
    from ldmkit.train.control import CONTROL_PRESETS, ControlTrainConfig, train_control

    cfg = load_config(args.config, ControlTrainConfig, CONTROL_PRESETS, args.overrides)
    if args.base:
        cfg.base = args.base
    if args.kind:
        cfg.kind = args.kind
    if args.control:
        cfg.control = args.control
    if args.data is not None:
        cfg.data.dataset = args.data
    check_writable_dir(args.out)
    folder = train_control(cfg, args.out, resume=args.resume, progress=not args.quiet)
    print(f"{cfg.kind} saved to {folder}; sample with: ldmkit sample --checkpoint {args.out} --control PNG --out SAMPLES")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from ldmkit.interop.convert import convert, convert_lora_file
    from ldmkit.interop.lora import is_lora_file

    if is_lora_file(args.src):  # a LoRA file: rewrite it in another layout
        print(convert_lora_file(args.src, args.dst, args.format, model=args.config, overwrite=args.overwrite))
        return 0
    if args.format == "kohya":
        raise LdmkitError("--format kohya is a LoRA layout: give --from a LoRA .safetensors file")
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    print(convert(args.src, args.dst, args.format, config=args.config, overwrite=args.overwrite, dtype=dtype,
                  loras=args.merge_lora or ()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ldmkit.demo import run_demo

    report = run_demo(args.out, quick=args.quick, progress=not args.quiet, seeds=args.seeds)
    print(f"demo finished; report: {report}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from ldmkit.data.folder import ImageFolderDataset, index_path

    t0 = time.time()
    ds = ImageFolderDataset(args.folder, size=args.size, split="all", skip_bad=args.skip_bad_images,
                            allow_outside_links=args.allow_outside_links, caption_extension=args.caption_extension,
                            filename_captions=args.filename_captions, mask=args.mask)
    files, reused = ds.checked
    captions = sum(bool(item.text) for item in ds.items)
    control = "with" if ds.items[0].control else "without"
    print(f"{len(ds)} images ready in {args.folder} ({captions} with captions, {ds.num_classes} classes, {control} "
          f"conditioning images); {files} files checked in {time.time() - t0:.1f} s, {reused} unchanged since the "
          f"last check; index: {index_path(args.folder)}")
    bare = [item.file for item in ds.items if not item.text]
    if bare:
        named = ", ".join(bare[:5]) + (f", and {len(bare) - 5} more" if len(bare) > 5 else "")
        print(f"{len(bare)} image{'s' if len(bare) != 1 else ''} without captions (no metadata text, {args.caption_extension} file or repeat-folder "
              f"word): {named}")
    repeats = {}
    for item in ds.items:
        if item.repeats != 1:
            repeats[item.file.split("/")[0]] = item.repeats
    per_folder = ", ".join(f"{name}/ x{n}" for name, n in repeats.items())
    print(f"an epoch is {len(ds.epoch)} images with repeats" + (f" ({per_folder})" if per_folder else " (no repeat folders)")
          + "; training holds about 5 % of the images out for validation")
    if args.mask == "files":
        print(f"{sum(item.mask is not None for item in ds.items)} of {len(ds)} images have a mask file; the rest train whole")
    return 0


def cmd_data_make_shards(args: argparse.Namespace) -> int:
    from ldmkit.data.shards import make_shards

    t0 = time.time()
    paths = make_shards(args.folder, args.out, args.shard_size, skip_bad=args.skip_bad_images, progress=not args.quiet,
                        mask=args.mask)
    last = len(paths) - 1
    print(f"{len(paths)} shards written to {args.out} in {time.time() - t0:.1f} s; train from them with "
          f"--data '{Path(args.out) / f'{{00000..{last:05d}}}.tar'}'")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from ldmkit.train.config import DataConfig
    from ldmkit.train.diffusion_task import load_first_stage
    from ldmkit.train.distributed import cleanup, setup
    from ldmkit.train.encode import encode_source

    dist, device = setup("auto")
    try:
        ae, meta = load_first_stage(args.autoencoder)
        size = args.size or meta.get("image_size")
        if size is None:
            raise LdmkitError(f"{args.autoencoder} does not record its image size; pass --size")
        d = DataConfig(dataset=args.data, size=size)
        t0 = time.time()
        out = encode_source(ae.to(device), d, args.out, shard_size=args.shard_size, batch_size=args.batch_size,
                            workers=args.workers, rank=dist.rank, world=dist.world,
                            barrier=dist.barrier if dist.enabled else None, progress=not args.quiet and dist.main)
        if dist.main:
            index = json.loads((out / "latents.json").read_text())
            print(f"{index['count']} latents {tuple(index['latent_shape'])} in {len(index['shards'])} shards written to "
                  f"{out} in {time.time() - t0:.1f} s; train with: ldmkit train --data {out} --autoencoder {args.autoencoder}")
    finally:
        cleanup(dist)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ldmkit.checkpoint import read_config

    import ldmkit

    _, kind, _, meta = read_config(args.checkpoint)
    model = ldmkit.load(args.checkpoint)
    _fill_sampling_defaults(args, args.checkpoint, guidance=2.0)
    out = Path(args.out or Path(args.checkpoint) / "evaluation")
    dataset = args.data or meta.get("dataset")  # what the model learned: the only data it can be judged on
    if kind == "autoencoder":
        from ldmkit.evaluate.autoencoder import evaluate_autoencoder

        size = args.size or [meta.get("image_size", 32)]
        # a folder the model did not train on is evaluated whole; its training data on the held-out split
        split = "all" if args.data and args.data != meta.get("dataset") and os.path.isdir(args.data) else "val"
        res = evaluate_autoencoder(model, dataset or "shapes", size, out, n=args.num_images, seed=args.seed, split=split)
    elif kind in ("controlnet", "adapter") or (kind == "latent_diffusion" and model.config.concat is not None):
        from ldmkit.checkpoint import load_control
        from ldmkit.evaluate.routes import evaluate_routes

        if dataset is None:
            raise LdmkitError(f"{args.checkpoint} does not record the data it learned; pass --data NAME_OR_FOLDER "
                              "with images like its training images")
        control, control_kind = None, None
        if kind != "latent_diffusion":
            control, model, _ = load_control(args.checkpoint)
            control_kind = meta.get("control", "mask")
        res = evaluate_routes(model, out, control=control, control_kind=control_kind, n=args.num_images,
                              steps=args.steps, guidance=args.guidance, seed=args.seed, dataset=dataset)
    elif kind == "latent_diffusion":
        from ldmkit.evaluate.diffusion import evaluate_diffusion

        res = evaluate_diffusion(model, out, seeds=args.seeds, steps=args.steps, guidance=args.guidance,
                                 sampler=args.sampler, dataset=dataset, num_images=args.num_images, seed=args.seed,
                                 vocabulary=args.vocabulary or meta.get("vocabulary", "basic"),
                                 sampler_options=args.sampler_options, mask=meta.get("mask", "none"))
    else:
        raise LdmkitError(f"`ldmkit evaluate` does not support checkpoints of kind '{kind}' yet")
    print(json.dumps(res, indent=2))
    for line in res.get("not_judged", []):
        print(f"not judged: {line}", file=sys.stderr)
    print(f"report written to {out / 'report.md'}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from ldmkit.study import run_study

    check_writable_dir(args.out)
    report = run_study(args.which, args.out, budget=args.budget, seeds=args.seeds, progress=not args.quiet)
    print(f"study report written to {report}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ldmkit.serve import run_server

    run_server(args.checkpoint, host=args.host, port=args.port, auth=args.api_auth,
               insecure_no_auth=args.insecure_no_auth, queue_size=args.queue_size, device=args.device,
               preview_every=args.preview_every, lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir,
               precision=args.precision, backend=args.backend, backend_cache=args.backend_cache,
               tiny_decoder=args.tiny_decoder, tiny_final=args.tiny_final)
    return 0


def _add_speed_args(p: argparse.ArgumentParser) -> None:
    """--precision, --backend, --backend-cache of `sample` and `serve` (docs: README "Fast sampling on a CPU")."""
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast for the U-Net; auto: bf16 on a CPU with native bf16 (AVX512-BF16/AMX), else fp32 "
                        "(fp16: CUDA only; the autoencoder decodes in float32 under fp16)")
    p.add_argument("--backend", default="torch", choices=["torch", "openvino"],
                   help="openvino: U-Net, decoder and CLIP text encoder converted once and run by OpenVINO on the CPU "
                        "(needs ldmkit[openvino])")
    p.add_argument("--backend-cache", default=None, metavar="DIR",
                   help="where converted models are kept, by weights digest (default ~/.cache/ldmkit/openvino)")


def build_parser() -> argparse.ArgumentParser:
    from ldmkit.train.config import AUTOENCODER_PRESETS

    p = argparse.ArgumentParser(prog="ldmkit", description="Latent diffusion toolkit")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads (default: all cores)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train-autoencoder", help="train the first stage (KL autoencoder or plain AE)")
    _add_config_args(t, list(AUTOENCODER_PRESETS))
    t.add_argument("--out", required=True, help="output folder (checkpoints, samples, log)")
    t.add_argument("--data", default=None, help="dataset name or image folder (overrides data.dataset)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--skip-bad-images", action="store_true", help="skip unreadable image files instead of stopping")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train_autoencoder)

    from ldmkit.diffusion.samplers import SAMPLERS
    from ldmkit.train.config import DIFFUSION_PRESETS

    d = sub.add_parser("demo", help="train a first stage and a text-to-image LDM on `shapes`, sample, report")
    d.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s)")
    d.add_argument("--quick", action="store_true", help="a one-minute smoke run with tiny models")
    d.add_argument("--seeds", type=POSITIVE, default=3, help="samples per caption for the accuracy figures")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    tr = sub.add_parser("train", help="train the second stage (U-Net denoiser in the latent space)")
    _add_config_args(tr, list(DIFFUSION_PRESETS))
    tr.add_argument("--out", required=True, help="output folder (checkpoints, samples, log)")
    tr.add_argument("--autoencoder", default=None, help="first-stage checkpoint folder (overrides `autoencoder:`)")
    tr.add_argument("--init-from", default=None, metavar="MODEL",
                    help="fine-tune MODEL (ldmkit run, diffusers pipeline folder or SD single file): its U-Net weights, "
                         "first stage and text encoder (sets finetune.init_from; finetune.train: unet | lora)")
    tr.add_argument("--data", default=None, help="dataset name or image folder (overrides data.dataset)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    tr.add_argument("--skip-bad-images", action="store_true", help="skip unreadable image files instead of stopping")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)

    from ldmkit.train.control import CONTROL_PRESETS

    tc = sub.add_parser("train-control", help="train a ControlNet or adapter on top of a frozen diffusion model")
    _add_config_args(tc, list(CONTROL_PRESETS))
    tc.add_argument("--out", required=True, help="output folder (checkpoints, samples, log)")
    tc.add_argument("--base", default=None, help="the trained diffusion model (folder from `ldmkit train`)")
    tc.add_argument("--kind", choices=["controlnet", "adapter"], default=None, help="control network (default: the config's)")
    tc.add_argument("--control", choices=["edge", "mask", "control"], default=None,
                    help="control map from the data: shapes' edge or mask, a folder's conditioning_image (control)")
    tc.add_argument("--data", default=None, help="dataset name or image folder (overrides data.dataset)")
    tc.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    tc.add_argument("--quiet", action="store_true", help="no progress bar")
    tc.set_defaults(func=cmd_train_control)

    from ldmkit.train.distill import DISTILL_PRESETS

    di = sub.add_parser("distill", help="distil a diffusion model into a few-step student (latent consistency distillation)")
    _add_config_args(di, list(DISTILL_PRESETS))
    di.add_argument("--teacher", default=None, help="the trained diffusion model (folder from `ldmkit train`)")
    di.add_argument("--out", required=True, help="output folder (checkpoints, samples, log)")
    di.add_argument("--data", default=None, help="dataset name or image folder (overrides data.dataset)")
    di.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    di.add_argument("--quiet", action="store_true", help="no progress bar")
    di.set_defaults(func=cmd_distill)

    from ldmkit.train.distill_decoder import DECODER_PRESETS

    dd = sub.add_parser("distill-decoder", help="train a tiny decoder (TAESD's architecture) that reproduces a first "
                        "stage's decoder, for fast previews and images (--tiny-decoder)")
    _add_config_args(dd, list(DECODER_PRESETS))
    dd.add_argument("--autoencoder", default=None, help="the first stage (folder from `ldmkit train-autoencoder`, or a "
                    "diffusers VAE / pipeline); its decoder is reproduced")
    dd.add_argument("--out", required=True, help="output folder (checkpoints, grids, log)")
    dd.add_argument("--data", default=None, help="dataset name or image folder (default: the first stage's own)")
    dd.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    dd.add_argument("--quiet", action="store_true", help="no progress bar")
    dd.set_defaults(func=cmd_distill_decoder)

    s = sub.add_parser("sample", help="draw images from a diffusion checkpoint")
    s.add_argument("--checkpoint", required=True, help="checkpoint folder or training output folder")
    s.add_argument("--out", required=True, help="folder for 0000.png, 0001.png, ... and grid.png")
    s.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
    s.add_argument("--prompts-file", help="a text file with one prompt per line")
    s.add_argument("--label", type=_number(int, -1), action="append", help="a class label (repeatable; one per prompt if both)")
    s.add_argument("--num-per-prompt", type=POSITIVE, default=1, help="samples per prompt/label")
    s.add_argument("--num-samples", type=POSITIVE, default=None,
                   help="samples for an unconditional model (default 16; with prompts or labels use --num-per-prompt)")
    s.add_argument("--seed", type=int, default=0,
                   help="batch k is seeded seed + k·batch size; -1: a random seed, written in each PNG's parameters")
    s.add_argument("--steps", type=POSITIVE, default=None, help="sampling steps (default: the checkpoint's, else 25)")
    s.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                   help="default: the checkpoint's (a distilled model: lcm), else dpmpp_2m")
    s.add_argument("--guidance", type=NON_NEGATIVE, default=None,
                   help="classifier-free guidance scale (1 = off; default: the checkpoint's, else 1)")
    s.add_argument("--guidance-rescale", type=_number(float, 0, 1), default=0.0,
                   help="guidance rescale φ in [0, 1] (Lin et al. 2024; 0 = off, 0.7 tames over-saturation at large --guidance)")
    s.add_argument("--batch-size", type=POSITIVE, default=64)
    s.add_argument("--config", default=None, help="diffusers pipeline folder with the configs of a bare single file")
    s.add_argument("--width", type=POSITIVE, default=None,
                   help="image width in pixels, a multiple of the model's granularity (default: the model's size)")
    s.add_argument("--height", type=POSITIVE, default=None,
                   help="image height in pixels, a multiple of the model's granularity (default: the model's size)")
    s.add_argument("--hires-scale", type=_number(float, 0, low_open=True), default=None,
                   help="hires fix (A1111): generate at --width/--height, upscale by this factor, then an img2img pass")
    s.add_argument("--hires-steps", type=_number(int, 0), default=0, help="hires fix: second pass steps (0: --steps)")
    s.add_argument("--hires-upscaler", default="latent", choices=["latent", "latent-nearest", "bicubic"],
                   help="hires fix: bilinear on the latents (A1111 'Latent'), nearest on the latents, or bicubic on pixels")
    s.add_argument("--hires-denoise", type=_number(float, 0, 1), default=0.7, help="hires fix: the second pass's denoising strength")
    s.add_argument("--resize-mode", type=int, default=0, choices=[0, 1, 2],
                   help="fitting init image / mask / control maps of another size: 0 stretch, 1 crop and resize, 2 resize and fill")
    s.add_argument("--lora-dir", default=None, help="folder of LoRA files named in prompts as <lora:NAME:WEIGHT>")
    s.add_argument("--embeddings-dir", default=None, help="folder of textual-inversion embeddings named in prompts")
    s.add_argument("--tiny-decoder", default=None, metavar="DIR",
                   help="decode the images with a tiny autoencoder: a diffusers AutoencoderTiny folder (TAESD) or a "
                        "folder from `ldmkit distill-decoder` (faster, a little softer)")
    s.add_argument("--init-image", default=None, help="image for img2img / inpainting / super-resolution (fitted to the size by --resize-mode)")
    s.add_argument("--mask", default=None, help="inpainting mask image: white (1) = repaint, black = keep")
    s.add_argument("--strength", type=_number(float, 0, 1), default=1.0, help="img2img: 1 = ignore the init image's content, 0 = keep it")
    s.add_argument("--control", action="append", default=None,
                   help="control map image (values in [0, 1]); one per ControlNet/adapter, in order (repeatable)")
    s.add_argument("--controlnet", action="append", default=None,
                   help="ControlNet/adapter run folder (repeatable: several ControlNets are summed; or pass one as --checkpoint)")
    s.add_argument("--control-scale", type=_number(float), action="append", default=None,
                   help="control residual scale, one for all or one per network (default: each network's, 1)")
    s.add_argument("--keep-known", action=argparse.BooleanOptionalAction, default=True,
                   help="inpainting: pin the latent cells the mask does not touch to the image's own latent")
    s.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="apply a LoRA (.safetensors, diffusers or kohya layout) at SCALE (default 1); repeatable, "
                        "the scaled adapters add")
    s.add_argument("--negative-prompt", default=None,
                   help="what to steer away from: the unconditional branch of guidance encodes it (needs --guidance > 1)")
    s.add_argument("--micro", action="append", default=None, metavar="NAME=VALUE",
                   help="SDXL micro-conditioning, diffusers' names (repeatable): original_size=HxW, "
                        "crops_coords_top_left=TOPxLEFT, target_size=HxW, negative_… of each; a refiner's "
                        "aesthetic_score=6 / negative_aesthetic_score=2.5 (docs/sdxl.md)")
    s.add_argument("--sigmas", default=None, choices=["karras", "exponential"],
                   help="space the steps in noise level σ (Karras et al. 2022 / log-uniform) instead of the model's "
                        "timestep spacing")
    s.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=True,
                   help="inpainting: paste the kept pixels of the init image back over the decoded image")
    s.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    _add_speed_args(s)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_sample)

    sv = sub.add_parser("serve", help="a web page and the AUTOMATIC1111-compatible HTTP API (needs ldmkit[serve])")
    sv.add_argument("--checkpoint", action="append", required=True,
                    help="a model to serve, as `sample --checkpoint` takes (repeatable: clients switch between them)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    sv.add_argument("--port", type=_number(int, 1, 65535), default=7860, help="port (default: %(default)s, as A1111)")
    sv.add_argument("--api-auth", default=None, metavar="USER:PASS",
                    help="HTTP basic credentials for the page and the API (several: user:pass,user2:pass2)")
    sv.add_argument("--insecure-no-auth", action="store_true",
                    help="listen on a non-loopback --host without --api-auth (anyone who reaches the port can generate)")
    sv.add_argument("--queue-size", type=POSITIVE, default=8, help="requests that may wait; more get 503 (default: %(default)s)")
    sv.add_argument("--preview-every", type=_number(int, 0), default=5,
                    help="decode a preview of the running generation every N steps (0: none; default: %(default)s)")
    sv.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    sv.add_argument("--lora-dir", default=None, metavar="DIR",
                    help="LoRA files (.safetensors, subfolders too) that prompts name as <lora:name:weight>; "
                         "listed at GET /sdapi/v1/loras")
    sv.add_argument("--embeddings-dir", default=None, metavar="DIR",
                    help="textual-inversion embeddings (A1111 .pt/.safetensors, diffusers learned_embeds) that "
                         "prompts name; listed at GET /sdapi/v1/embeddings")
    _add_speed_args(sv)
    sv.add_argument("--tiny-decoder", default=None, metavar="DIR",
                    help="decode the live previews with a tiny autoencoder: a diffusers AutoencoderTiny folder (TAESD) "
                         "or a folder from `ldmkit distill-decoder`")
    sv.add_argument("--tiny-final", action="store_true",
                    help="decode the final images with the --tiny-decoder too (default: the full first stage)")
    sv.set_defaults(func=cmd_serve)

    st = sub.add_parser("study", help="answer the FAQ's design questions by experiment: first stage, U-Net, "
                        "conditioning routes (report with verdicts, plots and the commands run)")
    st.add_argument("which", choices=["vae", "unet", "routes", "all"], help="which study (all: each into OUT/<name>)")
    st.add_argument("--out", required=True, help="output folder; rerunning on it reuses finished runs")
    st.add_argument("--budget", type=_number(float, 0, low_open=True), default=1.0,
                    help="scales every step and sample count (default 1: each study fits 30 min on 2 CPU cores)")
    st.add_argument("--seeds", type=_number(int, 2), default=3, help="runs per arm (default: %(default)s)")
    st.add_argument("--quiet", action="store_true", help="no progress bar")
    st.set_defaults(func=cmd_study)

    c = sub.add_parser("convert", help="convert between ldmkit, diffusers and original Stable Diffusion formats")
    c.add_argument("--from", dest="src", required=True, help="ldmkit folder, diffusers model/pipeline folder, or .safetensors/.ckpt")
    c.add_argument("--to", dest="dst", required=True, help="output folder (ldmkit, diffusers) or file (original)")
    c.add_argument("--format", required=True, choices=["ldmkit", "diffusers", "original", "kohya"],
                   help="output format (for a LoRA file: diffusers or kohya)")
    c.add_argument("--config", default=None, help="diffusers folder with configs for a single file without them; for "
                   "a kohya LoRA, the model it adapts (its layer names resolve kohya's)")
    c.add_argument("--merge-lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="fold a LoRA into the written model at SCALE (default 1); repeatable, the adapters add")
    c.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights dtype of the output")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output")
    c.set_defaults(func=cmd_convert)

    da = sub.add_parser("data", help="work with image collections")
    dsub = da.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    dc = dsub.add_parser("check", help="decode every image of a folder once, name the bad ones, and index the result "
                         "so training starts without decoding unchanged files again")
    dc.add_argument("folder", help="folder of images (with an optional metadata.jsonl)")
    dc.add_argument("--size", type=_number(int, 8), default=256, help="training image size (JPEG decodes at a "
                    "reduced scale no smaller than it)")
    dc.add_argument("--skip-bad-images", action="store_true", help="report bad files as a warning, not an error")
    dc.add_argument("--allow-outside-links", action="store_true", help="symlinks may point outside the folder")
    dc.add_argument("--caption-extension", default=".txt", help="caption files beside the images (data.caption_extension; "
                    "default %(default)s)")
    dc.add_argument("--filename-captions", action="store_true", help="caption an image without one by its file name "
                    "(data.filename_captions)")
    dc.add_argument("--mask", default="none", choices=["none", "alpha", "files"], help="also check the loss masks "
                    "(data.mask; files: NAME_mask.png or metadata's mask column)")
    dc.set_defaults(func=cmd_data_check)

    ds = dsub.add_parser("make-shards", help="write a folder of images (and its metadata.jsonl) as WebDataset tar "
                         "shards, to stream a big collection from")
    ds.add_argument("folder", help="folder of images (with an optional metadata.jsonl)")
    ds.add_argument("out", help="output folder for 00000.tar, 00001.tar, ...")
    ds.add_argument("--shard-size", type=POSITIVE, default=1000, help="samples per shard (default: %(default)s)")
    ds.add_argument("--skip-bad-images", action="store_true", help="leave unreadable files out instead of stopping")
    ds.add_argument("--mask", default="none", choices=["none", "alpha", "files"], help="data.mask the shards will "
                    "train with: files writes each NAME_mask.png (or metadata's mask) as KEY.mask.png; an image's "
                    "alpha always travels")
    ds.add_argument("--quiet", action="store_true", help="no progress bar")
    ds.set_defaults(func=cmd_data_make_shards)

    en = sub.add_parser("encode", help="encode a collection's training split with a first stage into latent shards "
                        "that `ldmkit train --data LATENTS` reads (resumable; split across torchrun ranks)")
    en.add_argument("--autoencoder", required=True, help="first-stage checkpoint (any format `ldmkit train` accepts)")
    en.add_argument("--data", required=True, help="built-in name, image folder, tar shards or Hugging Face dataset")
    en.add_argument("--out", required=True, help="output folder (latents.json + NNNNN.safetensors)")
    en.add_argument("--size", type=_number(int, 8), default=None, help="image size (default: the first stage's)")
    en.add_argument("--shard-size", type=POSITIVE, default=4096, help="items per latent shard (map-style sources)")
    en.add_argument("--batch-size", type=POSITIVE, default=64, help="images per encoder pass")
    en.add_argument("--workers", type=_number(int, 0), default=2, help="DataLoader workers decoding images")
    en.add_argument("--quiet", action="store_true", help="no progress bar")
    en.set_defaults(func=cmd_encode)

    e = sub.add_parser("evaluate", help="measure a checkpoint and write a report with image grids")
    e.add_argument("--checkpoint", required=True, help="checkpoint folder or training output folder")
    e.add_argument("--out", default=None, help="report folder (default: CHECKPOINT/evaluation)")
    e.add_argument("--data", default=None, help="dataset or folder to evaluate on (default: the one the checkpoint "
                   "learned, from its meta); fidelity is judged only where a judge knows this data")
    e.add_argument("--size", type=_number(int, 8), nargs="+", default=None,
                   help="autoencoder: image size(s), e.g. --size 64 128 256 (default: the training size)")
    e.add_argument("--num-images", type=POSITIVE, default=256, help="held-out images to measure on")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--seeds", type=POSITIVE, default=2, help="diffusion: samples per caption/label")
    e.add_argument("--steps", type=POSITIVE, default=None, help="diffusion: sampling steps (default: the checkpoint's, else 25)")
    e.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                   help="diffusion: sampler (default: the checkpoint's, else dpmpp_2m)")
    e.add_argument("--guidance", type=NON_NEGATIVE, default=None,
                   help="diffusion: guidance scale (default: the checkpoint's, else 2)")
    e.add_argument("--vocabulary", choices=["basic", "extended"], default=None,
                   help="shapes captions to judge: extended adds white and diamond (default: what the model learned)")
    e.set_defaults(func=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun rank 0 reports; the others keep stderr only
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    import warnings

    # Warnings meant for the user (e.g. skipped unreadable images) as one plain line each.
    plain_format, warnings.formatwarning = warnings.formatwarning, lambda msg, cat, *a, **k: f"ldmkit: warning: {msg}\n"
    try:
        return args.func(args)
    except LdmkitError as e:
        if args.debug:
            raise
        print(f"ldmkit: error: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(e, TrainingInterrupted) else EXIT_USER_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("ldmkit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        if args.debug:
            raise
        if not disk_full(e):
            return _internal_error(e)
        where = f" writing {e.filename}" if e.filename else ""
        print(f"ldmkit: error: the disk is full{where} ({e.strerror}); free space or choose another --out, then rerun "
              "(training continues from its last checkpoint with --resume)", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # noqa: BLE001 - a bug, not the user's fault: still one line
        if args.debug:
            raise
        return _internal_error(e)
    finally:
        warnings.formatwarning = plain_format


def _internal_error(e: BaseException) -> int:
    msg = str(e).splitlines()[0] if str(e) else ""
    print(f"ldmkit: internal error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
