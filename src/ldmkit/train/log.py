"""The training log: OUT/log.jsonl, one JSON line per logged step, its loss-curve PNG and, with
`logging.tensorboard`, the same scalars and the sample grids as TensorBoard event files."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ldmkit.errors import LdmkitError
from ldmkit.imageio import atomic_write


class TrainLog:
    """Append-only JSONL log (one line per logged step) and a loss-curve PNG drawn from it; with
    `tensorboard`, every value also goes to a TensorBoard SummaryWriter under OUT/tensorboard."""

    def __init__(self, out_dir: Path, enabled: bool = True, tensorboard: bool = False):
        self.path = out_dir / "log.jsonl"
        self.enabled = enabled
        self.board = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise LdmkitError("logging.tensorboard needs the tensorboard package: pip install 'ldmkit[tensorboard]' "
                                  "(or set logging.tensorboard=false)") from None
            self.board = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        if self.board is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, step)

    def image(self, tag: str, path: Path, step: int) -> None:
        """A grid PNG already written to `path`, also as a TensorBoard image."""
        if self.board is None:
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            self.board.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the log matches the weights."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = [ln for ln in self.path.read_text().splitlines() if (r := _record(ln)) is not None and r["step"] <= step]
        atomic_write(self.path, "".join(ln + "\n" for ln in keep).encode())  # a kill mid-rewrite keeps the old log

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [r for ln in self.path.read_text().splitlines() if (r := _record(ln)) is not None]

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


def _record(line: str) -> dict | None:
    """One log line as a dict; None for a blank line or a line torn by a kill or a full disk mid-write."""
    try:
        r = json.loads(line)
    except json.JSONDecodeError:
        return None
    return r if isinstance(r, dict) and "step" in r else None
