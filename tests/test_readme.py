"""Every `ldmkit ...` command in README.md can run as written: it parses against the real argument
parser, the presets it names exist, its `--set` overrides validate, and a second-stage command names the
first stage (or control base) it needs. Commands with `...` (an elided tail) are skipped."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ldmkit.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    commands = []
    blocks, inside, lines = [], None, []
    for line in text.splitlines():  # fenced blocks, opened and closed line by line (their language may vary)
        if line.startswith("```"):
            if inside is None:
                inside, lines = line[3:].strip(), []
            else:
                blocks.append("\n".join(lines)) if inside in ("", "bash", "sh") else None
                inside = None
        elif inside is not None:
            lines.append(line)
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            for part in line.split("&&"):
                part = part.split("   #")[0].strip()  # a trailing comment
                part = re.sub(r"^torchrun .*?-m ldmkit\.cli ", "ldmkit ", part)  # the same CLI under torchrun
                if re.match(r"(\.venv/bin/)?ldmkit ", part):
                    commands.append(part)
    # inline code spans that are whole commands (they carry an option)
    commands += [c for c in re.findall(r"`((?:\.venv/bin/)?ldmkit [a-z-]+ [^`]*--[^`]*)`", re.sub(r"\n", " ", text))]
    return [c for c in dict.fromkeys(commands) if "..." not in c]


COMMANDS = readme_commands()


def test_the_readme_has_commands():
    assert len(COMMANDS) >= 15 and any(c.startswith(".venv/bin/ldmkit demo") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_can_run_as_written(command):
    from ldmkit.train.config import AUTOENCODER_PRESETS, DIFFUSION_PRESETS, AutoencoderTrainConfig, DiffusionTrainConfig, load_config
    from ldmkit.train.control import CONTROL_PRESETS, ControlTrainConfig
    from ldmkit.train.distill import DISTILL_PRESETS, DistillConfig
    from ldmkit.train.distill_decoder import DECODER_PRESETS, DecoderDistillConfig

    argv = shlex.split(command)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"README command does not parse: {command}")
    kinds = {"train-autoencoder": (AutoencoderTrainConfig, AUTOENCODER_PRESETS),
             "train": (DiffusionTrainConfig, DIFFUSION_PRESETS), "train-control": (ControlTrainConfig, CONTROL_PRESETS),
             "distill": (DistillConfig, DISTILL_PRESETS), "distill-decoder": (DecoderDistillConfig, DECODER_PRESETS)}
    if args.command in kinds:
        cls, presets = kinds[args.command]
        assert args.config in presets, f"{command}: no preset {args.config!r} (have {', '.join(presets)})"
        cfg = load_config(args.config, cls, presets, args.overrides)  # validates every --set
        if args.command == "train":
            assert args.autoencoder or cfg.autoencoder or args.init_from, \
                f"{command}: needs --autoencoder or --init-from (the preset names no first stage)"
        if args.command == "train-control":
            assert args.base or cfg.base, f"{command}: needs --base"
        if args.command == "distill":
            assert args.teacher or cfg.teacher, f"{command}: needs --teacher"
