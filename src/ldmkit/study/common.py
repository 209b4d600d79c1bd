"""What every study shares: arms trained as the exact commands they record, resumable; means with
a confidence interval over seeds; claims with a verdict; the Markdown report.

A study never calls a private path: an arm is a preset plus `--set` overrides, built with the same
`load_config` the command line uses and trained by the same function, so the command written in
the report reproduces the arm. Rerunning a study on the same OUT skips every finished run.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from ldmkit.checkpoint import read_config
from ldmkit.errors import LdmkitError

VERDICTS = ("supported", "not supported", "depends")


# --- statistics ----------------------------------------------------------------------------------


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t interval at `level` (nan for fewer than 2 values)."""
    from scipy import stats

    xs = [float(v) for v in values]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, math.nan
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, float(stats.t.ppf(0.5 + level / 2, len(xs) - 1)) * sd / math.sqrt(len(xs))


def fmt_ci(values: Sequence[float], scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    """'12.34 ± 0.56' (mean ± 95 % half-width) of `values` × `scale`."""
    m, h = mean_ci([v * scale for v in values])
    half = "n/a" if math.isnan(h) else f"{h:.{digits}f}"
    return f"{m:.{digits}f} ± {half}{unit}"


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test that `a` and `b` have the same mean (1.0 when undefined,
    e.g. both constant and equal)."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return 1.0
    p = stats.ttest_ind(list(a), list(b), equal_var=False).pvalue
    return 1.0 if p is None or math.isnan(p) else float(p)


def compare(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> int:
    """+1 if mean(a) > mean(b) at significance `alpha` (Welch), -1 if below, 0 if not resolved."""
    if welch_p(a, b) >= alpha:
        return 0
    return 1 if sum(a) / len(a) > sum(b) / len(b) else -1


# --- claims and the report -----------------------------------------------------------------------


@dataclass
class Claim:
    """One statement of the FAQ, what was measured about it, and the verdict."""

    claim: str
    measurement: str
    verdict: str
    why: str = ""


def _finished(folder: Path, steps: int) -> bool:
    try:
        _, _, _, meta = read_config(folder)
    except Exception:  # noqa: BLE001 - no finished checkpoint there yet
        return False
    return int(meta.get("step", -1)) >= steps and "train_seconds" in meta


class Study:
    """Collects a study's runs, commands, figures and claims, and writes OUT/report.md.

    `budget` scales every step count and sample count (`self.n`); `seeds` runs per arm."""

    def __init__(self, name: str, title: str, out: str | Path, budget: float = 1.0, seeds: int = 3,
                 progress: bool = True):
        if budget <= 0:
            raise LdmkitError(f"--budget must be > 0, got {budget}")
        if seeds < 1:
            raise LdmkitError(f"--seeds must be >= 1, got {seeds}")
        self.name, self.title = name, title
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.budget, self.seeds, self.progress = budget, seeds, progress
        self.commands: list[str] = [f"ldmkit study {name} --out {shlex.quote(str(self.out))} --budget {budget:g} "
                                    f"--seeds {seeds}"]
        self.claims: list[Claim] = []
        self.body: list[str] = []
        self.started = time.time()
        self.run_seconds = 0.0  # training time of every run the study used, trained now or reused

    def log(self, message: str) -> None:
        """One progress line (the runs themselves train without bars: a study is many short runs)."""
        if self.progress:
            print(f"[study {self.name} {(time.time() - self.started) / 60:5.1f} min] {message}", flush=True)

    # sizes
    def n(self, full: int, floor: int = 1) -> int:
        """`full` (a step or sample count at budget 1) scaled by the budget, at least `floor`."""
        return max(floor, round(full * self.budget))

    def run_dir(self, *parts: str) -> Path:
        return self.out.joinpath("runs", *parts)

    # runs
    def command(self, cmd: str) -> None:
        """Record a command the study ran (or its exact equivalent, for in-process evaluation)."""
        self.commands.append(cmd)

    def _cmd(self, verb: str, preset: str, overrides: list[str], out: Path, extra: str = "") -> str:
        sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
        return f"ldmkit {verb} --config {preset} {sets}{extra} --out {shlex.quote(str(out))} --quiet".replace("  ", " ")

    def _run(self, verb: str, name: str, preset: str, overrides: list[str], cls, presets, train,
             field: str | None = None, value: Path | None = None) -> tuple[Path, dict]:
        """Build the config as `ldmkit VERB --config PRESET --set …` does (`field` = `value`: the run's input, its
        own flag), record that command, and train unless a finished run is there; returns (folder, meta)."""
        from ldmkit.train.config import load_config

        out = self.run_dir(name)
        cfg = load_config(preset, cls, presets, overrides)
        extra = ""
        if field is not None:
            setattr(cfg, field, str(value))
            extra = f" --{field.replace('_', '-')} {shlex.quote(str(value))}"
        self.command(self._cmd(verb, preset, overrides, out, extra))
        if not _finished(out, cfg.optim.steps):
            self.log(f"{verb} {name}")
            train(cfg, out, resume=(out / "latest").exists(), progress=False)
        return out, self._used(out)

    def train_autoencoder(self, name: str, preset: str, overrides: list[str]) -> tuple[Path, dict]:
        """Train (or reuse a finished) first stage; returns (folder, checkpoint meta)."""
        from ldmkit.train.autoencoder import train_autoencoder
        from ldmkit.train.config import AUTOENCODER_PRESETS, AutoencoderTrainConfig

        return self._run("train-autoencoder", name, preset, overrides, AutoencoderTrainConfig, AUTOENCODER_PRESETS,
                         train_autoencoder)

    def train_diffusion(self, name: str, preset: str, overrides: list[str], autoencoder: Path) -> tuple[Path, dict]:
        """Train (or reuse a finished) second stage on `autoencoder`; returns (folder, meta)."""
        from ldmkit.train.config import DIFFUSION_PRESETS, DiffusionTrainConfig
        from ldmkit.train.diffusion import train_diffusion

        return self._run("train", name, preset, overrides, DiffusionTrainConfig, DIFFUSION_PRESETS, train_diffusion,
                         "autoencoder", autoencoder)

    def train_control(self, name: str, preset: str, overrides: list[str], base: Path) -> tuple[Path, dict]:
        """Train (or reuse a finished) ControlNet/adapter on `base`; returns (folder, meta)."""
        from ldmkit.train.control import CONTROL_PRESETS, ControlTrainConfig, train_control

        return self._run("train-control", name, preset, overrides, ControlTrainConfig, CONTROL_PRESETS, train_control,
                         "base", base)

    def _used(self, out: Path) -> dict:
        meta = read_config(out)[3]
        self.run_seconds += float(meta.get("train_seconds") or 0.0)
        return meta

    def cached(self, name: str, compute) -> Any:
        """`compute()`'s JSON result, kept in OUT/results/NAME.json so a rerun does not measure twice."""
        path = self.out / "results" / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, indent=1))
        tmp.replace(path)
        return value

    # report
    def claim(self, claim: str, measurement: str, verdict: str, why: str = "") -> None:
        if verdict not in VERDICTS:
            raise ValueError(f"verdict {verdict!r} is not one of {VERDICTS}")
        self.claims.append(Claim(claim, measurement, verdict, why))

    def add(self, markdown: str) -> None:
        self.body.append(markdown.rstrip() + "\n")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        self.add("\n".join(lines))

    def figure(self, fig, filename: str, caption: str) -> None:
        """Save a matplotlib figure into OUT and show it in the report."""
        import matplotlib.pyplot as plt

        fig.tight_layout()
        fig.savefig(self.out / filename, dpi=110)
        plt.close(fig)
        self.add(f"![{caption}]({filename})\n\n*{caption}*")

    def _machine(self) -> str:
        """The threads the study ran on and whether other work shared the CPU (the 5-minute load average
        beyond the study's own threads), which every time in the report depends on."""
        import os

        import torch

        threads = torch.get_num_threads()
        text = f"on {threads} CPU thread(s)"
        if hasattr(os, "getloadavg"):
            load = os.getloadavg()[1]
            busy = load > threads + 0.5
            text += (f", 5-minute load average {load:.1f} at the end" + (
                " (other work shared the CPU: times are longer than on a quiet machine)" if busy else ""))
        return text

    def write(self) -> Path:
        minutes = (time.time() - self.started) / 60
        lines = [f"# {self.title}", "",
                 f"`ldmkit study {self.name}`, budget {self.budget:g}, {self.seeds} seeds per arm; this invocation "
                 f"took {minutes:.1f} min {self._machine()}, and the training of the runs it used "
                 f"{self.run_seconds / 60:.1f} min (runs reused from an earlier invocation count there too). "
                 "Intervals are 95 % "
                 "Student-t intervals of the mean over seeds; 'resolved' means Welch's t-test at p < 0.05.", "",
                 "## Verdicts", "", "| claim | measurement | verdict |", "| --- | --- | --- |"]
        lines += [f"| {c.claim} | {c.measurement} | **{c.verdict}**{' — ' + c.why if c.why else ''} |"
                  for c in self.claims]
        lines += ["", *self.body, "## Commands run", "", "```bash", *self.commands, "```", ""]
        report = self.out / "report.md"
        report.write_text("\n".join(lines))
        (self.out / "verdicts.json").write_text(json.dumps(
            {"study": self.name, "budget": self.budget, "seeds": self.seeds, "minutes": minutes,
             "run_training_minutes": self.run_seconds / 60,
             "claims": [asdict(c) for c in self.claims]}, indent=1))
        return report
