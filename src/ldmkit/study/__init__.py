"""`ldmkit study`: the FAQ's three design questions answered by experiment.

- `vae`: why a KL-regularised first stage (`ldmkit.study.vae`)
- `unet`: why the U-Net's parts (`ldmkit.study.unet`)
- `routes`: how each conditioning route does on one task (`ldmkit.study.routes`)

Each study trains its arms through the same functions as the commands it records
(`ldmkit.study.common.Study`), at several seeds, and writes OUT/report.md (claims, measurements,
verdicts, plots, the exact commands) and OUT/verdicts.json.
"""

from __future__ import annotations

import importlib
from pathlib import Path

STUDIES = {"vae": "ldmkit.study.vae", "unet": "ldmkit.study.unet", "routes": "ldmkit.study.routes"}


def run_study(which: str, out: str | Path, budget: float = 1.0, seeds: int = 3, progress: bool = True) -> Path:
    """Run one study (`vae`, `unet`, `routes`) into OUT, or `all` into OUT/<name>; returns the report.

    Each study module has a TITLE and `run(study)`, which trains its arms through the `Study` and
    states its claims; this writes the report (and, for `all`, OUT/README.md linking the three)."""
    from ldmkit.errors import LdmkitError
    from ldmkit.study.common import Study

    if which == "all":
        reports = {name: run_study(name, Path(out) / name, budget, seeds, progress) for name in STUDIES}
        return _index(Path(out), reports)
    if which not in STUDIES:
        raise LdmkitError(f"unknown study '{which}' (known: {', '.join(STUDIES)}, all)")
    module = importlib.import_module(STUDIES[which])
    study = Study(which, module.TITLE, out, budget=budget, seeds=seeds, progress=progress)
    module.run(study)
    return study.write()


def _index(out: Path, reports: dict[str, Path]) -> Path:
    import json

    lines = ["# The FAQ's design questions, measured", "",
             "Each report states the FAQ's claims, what was measured and a verdict; the commands it ran are at its end.", ""]
    for name, report in reports.items():
        v = json.loads((report.parent / "verdicts.json").read_text())
        lines += [f"## [{name}]({name}/report.md)", "",
                  f"Budget {v['budget']:g}, {v['seeds']} seeds per arm; {v['minutes']:.1f} min for the invocation "
                  f"that wrote the report, {v['run_training_minutes']:.1f} min of it training.", "",
                  "| claim | verdict |", "| --- | --- |"]
        lines += [f"| {c['claim']} | {c['verdict']} |" for c in v["claims"]]
        lines.append("")
    index = out / "README.md"
    index.write_text("\n".join(lines))
    return index
