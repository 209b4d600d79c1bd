# Written with ldmkit at commit 38cf851 (before the layout change of issue 11).
import torch
from safetensors.torch import save_file
from ldmkit.autoencoder import AutoencoderConfig, AutoencoderKL
from ldmkit.pipeline import LatentDiffusion, LatentDiffusionConfig, ConcatConfig
from ldmkit.conditioning import ConditionerConfig
from ldmkit.unet import UNetConfig
from ldmkit.control import ControlNet, Adapter
from ldmkit.train.checkpoint import save_checkpoint

torch.manual_seed(0)
out = "tests/data/legacy"
aecfg = AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4, scaling_factor=0.9, shift_factor=0.1)
ae = AutoencoderKL(aecfg)
save_checkpoint(f"{out}/autoencoder", 7, "autoencoder", ae, aecfg, meta={"step": 7}, ema=ae, keep=1)
u = UNetConfig(in_channels=4, out_channels=4, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
               mid_attention=False, num_heads=2, norm_groups=4, num_classes=3, zero_init=False, concat_channels=4)
cfg = LatentDiffusionConfig(autoencoder=aecfg, unet=u, conditioner=ConditionerConfig(num_classes=3), image_size=16,
                            concat=ConcatConfig(kind="lowres", lowres_factor=2))
ldm = LatentDiffusion.from_config(cfg)
save_checkpoint(f"{out}/diffusion", 5, "latent_diffusion", ldm, cfg, meta={"step": 5}, ema=ldm, keep=1)
u2 = u.model_copy(update={"concat_channels": 0})
cfg2 = cfg.model_copy(update={"unet": u2, "concat": None})
base = LatentDiffusion.from_config(cfg2)
cn = ControlNet.from_unet(base.unet, hint_channels=1, latent_factor=2)
for p in cn.parameters():
    torch.nn.init.normal_(p, std=0.05)
save_checkpoint(f"{out}/controlnet", 3, "controlnet", cn, cn.config, meta={"step": 3}, keep=1)
ad = Adapter.from_unet(base.unet, hint_channels=1, latent_factor=2)
for p in ad.parameters():
    torch.nn.init.normal_(p, std=0.05)
save_checkpoint(f"{out}/adapter", 3, "adapter", ad, ad.config, meta={"step": 3}, keep=1)

# golden outputs of today's code on fixed inputs
g = torch.Generator().manual_seed(1)
x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
z = torch.randn(2, 4, 8, 8, generator=g)
t = torch.tensor([10, 500])
labels = torch.tensor([0, 3])
concat = torch.randn(2, 4, 8, 8, generator=g)
hint = torch.rand(2, 1, 16, 16, generator=g)
with torch.no_grad():
    rec = ae.decode(ae.encode(x).mean)
    eps = ldm.unet(z, t, class_labels=labels, concat=concat)
    down, mid = cn(z, t, hint, class_labels=labels)
    ctrl = base.unet(z, t, class_labels=labels, down_residuals=down, mid_residual=mid)
    feats = ad(hint)
    adapted = base.unet(z, t, class_labels=labels, adapter_residuals=feats)
save_file({"x": x, "z": z, "t": t, "labels": labels, "concat": concat, "hint": hint, "rec": rec.contiguous(), "eps": eps.contiguous(),
           "controlled": ctrl.contiguous(), "adapted": adapted.contiguous()}, f"{out}/expected.safetensors")
# base weights for the controlnet/adapter runs
save_checkpoint(f"{out}/base", 5, "latent_diffusion", base, cfg2, meta={"step": 5}, keep=1)
