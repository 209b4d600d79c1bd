"""Randomness of a training batch that does not depend on how the batch is split.

A training step draws noise, timesteps and condition dropout for every item of its global batch.
When that batch is split across processes (DistributedDataParallel) or into micro-batches (gradient
accumulation), each piece would normally draw from its own generator, and the run would depend on
the split. `BatchRandom` instead draws every tensor for the *whole* global batch from the step's
generator and keeps only the piece's rows: item i gets the same noise, timestep and dropout
whether it is trained in one process, two, or four micro-batches — so 2 processes reproduce
1 process with the same global batch, and a run resumes on a different number of processes.
The extra draws are tiny next to one U-Net evaluation (a latent per item, not an image).
"""

from __future__ import annotations

import torch


class BatchRandom:
    """Draws for rows [lo, hi) of a global batch of n items, all from one `torch.Generator`.

    Every method draws the full (n, ...) tensor and returns rows lo:hi, so the pieces of a batch
    consume the generator identically; callers then use the same sequence of calls in every piece.
    """

    def __init__(self, generator: torch.Generator | None, n: int, lo: int = 0, hi: int | None = None):
        hi = n if hi is None else hi
        if not 0 <= lo < hi <= n:
            raise ValueError(f"rows [{lo}, {hi}) are not inside a batch of {n}")
        self.generator, self.n, self.lo, self.hi = generator, n, lo, hi

    @classmethod
    def of(cls, source: "BatchRandom | torch.Generator | None", rows: int) -> "BatchRandom":
        """`source` as a BatchRandom for a local batch of `rows` items (a plain generator or None:
        the local batch is the whole batch). A BatchRandom must cover exactly `rows` items."""
        if isinstance(source, BatchRandom):
            if source.rows != rows:
                raise ValueError(f"the batch has {rows} items but its random draws cover {source.rows}")
            return source
        return cls(source, rows)

    @property
    def rows(self) -> int:
        return self.hi - self.lo

    @property
    def device(self) -> torch.device:
        return self.generator.device if self.generator is not None else torch.device("cpu")

    def _keep(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.lo : self.hi]

    def randn(self, *tail: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(rows, *tail) standard normal, on the generator's device."""
        return self._keep(torch.randn((self.n, *tail), generator=self.generator, device=self.device, dtype=dtype))

    def rand(self, *tail: int) -> torch.Tensor:
        """(rows, *tail) uniform in [0, 1)."""
        return self._keep(torch.rand((self.n, *tail), generator=self.generator, device=self.device))

    def randint(self, high: int, *tail: int) -> torch.Tensor:
        """(rows, *tail) int64 uniform in [0, high)."""
        return self._keep(torch.randint(0, high, (self.n, *tail), generator=self.generator, device=self.device))

    def multinomial(self, probs: torch.Tensor) -> torch.Tensor:
        """(rows,) category indices drawn with replacement from `probs` (normalised here)."""
        full = torch.multinomial(probs / probs.sum(), self.n, replacement=True, generator=self.generator)
        return self._keep(full)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of training step `step` of a run seeded `seed`: every random draw of the step comes
    from it (through a BatchRandom), so a resumed run repeats the uninterrupted run's draws exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 1)
