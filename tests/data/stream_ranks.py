"""Run under torchrun by tests/test_streaming.py: each rank reads `steps` batches of its rows from a lazy
source exactly as a trainer does, and writes the captions it saw to OUT/rank{r}.json."""

import json
import sys

from ldmkit.train.config import DataConfig
from ldmkit.train.data import open_train_data
from ldmkit.train.distributed import cleanup, micro_batches, setup

spec, out, steps, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dist, _ = setup("cpu")
source = open_train_data(DataConfig(dataset=spec, size=16, in_memory=False, workers=2), batch, 0, dist, 1, False)
lo, hi = micro_batches(batch, dist, 1)[0]
seen = []
for step in range(steps):
    texts = source.batch(step, lo, hi)["text"]
    epochs = source._current.get("_epochs", [step // (len(getattr(source, "dataset", [])) // batch or 1)] * len(texts))
    seen += [[text, int(epoch)] for text, epoch in zip(texts, epochs)]
with open(f"{out}/rank{dist.rank}.json", "w") as fh:
    json.dump({"seen": seen, "state": source.state_dict()}, fh)
source.close()
cleanup(dist)
