"""The training log: OUT/log.jsonl, one JSON line per logged step, and its loss-curve PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path


class TrainLog:
    """Append-only JSONL log (one line per logged step) and a loss-curve PNG drawn from it."""

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.path = out_dir / "log.jsonl"
        self.enabled = enabled

    def write(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the log matches the weights."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]

    def plot(self, keys: list[str], out: Path) -> None:
        """Loss curves as a PNG (matplotlib, headless)."""
        if not self.enabled:
            return
        recs = self.records()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in keys if any(k in r for r in recs)]
        if not keys:
            return
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
        for ax, k in zip(axes[0], keys):
            pts = [(r["step"], r[k]) for r in recs if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts])
            ax.set_title(k)
            ax.set_xlabel("step")
            if k in ("loss", "rec") and all(p[1] > 0 for p in pts):
                ax.set_yscale("log")
        fig.tight_layout()
        fig.savefig(out, dpi=80)
        plt.close(fig)
