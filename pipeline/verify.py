"""`vaebench verify`: is a reproduced study the committed one, up to noise?

It compares each cell's reproduced test metrics (the evaluate stages' `metrics.json`) with the committed
`results/<study>/metrics.json` (Git's copy at a revision, HEAD by default). The tolerance of a metric is
TOLERANCE_SPREADS times its largest seed-to-seed standard deviation over the groups of the seeds study
(`results/seeds/metrics.json`, committed): the spread that training noise alone gives. A metric the seeds
study has no spread for (a family's own metric) must match exactly. Another CPU type changes the last
digits of training; a difference beyond the tolerance is more than that.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from dataclasses import dataclass

from pipeline.config import StudyConfig
from pipeline.errors import ArtifactError, VaebenchError
from pipeline.paths import METRICS_FILE, evaluate_dir

TOLERANCE_SPREADS = 3.0  # standard deviations of the seed-to-seed spread
SPREAD_STUDY = "seeds"
SEED_SUFFIX = re.compile(r"-s\d+$")


@dataclass(frozen=True)
class Difference:
    cell: str
    metric: str
    reproduced: float
    committed: float
    tolerance: float | None  # None: no spread measured, so exact

    @property
    def beyond(self) -> bool:
        gap = abs(self.reproduced - self.committed)
        return gap > 0 if self.tolerance is None else gap > self.tolerance


def committed_metrics(study: str, revision: str = "HEAD") -> dict:
    """`results/<study>/metrics.json` as Git holds it at `revision`."""
    path = f"results/{study}/metrics.json"
    shown = subprocess.run(["git", "show", f"{revision}:{path}"], capture_output=True, text=True)
    if shown.returncode != 0:
        reason = shown.stderr.strip().splitlines()[-1] if shown.stderr.strip() else "no output"
        raise ArtifactError(
            f"Git has no {path} at {revision} ({reason}); verify compares a reproduced study with a committed one: "
            "pass --revision, or commit the study's results"
        )
    return json.loads(shown.stdout)


def seed_tolerances(spread_metrics: dict) -> dict[str, float]:
    """TOLERANCE_SPREADS x the largest standard deviation of each metric across the seeds of any group
    (cells named alike but for their -sN suffix) of the seeds study."""
    groups: dict[str, list[dict]] = {}
    for cell, metrics in spread_metrics.items():
        groups.setdefault(SEED_SUFFIX.sub("", cell), []).append(metrics)
    largest: dict[str, float] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        for metric in set.intersection(*(set(m) for m in members)):
            values = [m[metric] for m in members]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            largest[metric] = max(largest.get(metric, 0.0), std)
    return {metric: TOLERANCE_SPREADS * std for metric, std in largest.items()}


def reproduced_metrics(config: StudyConfig) -> dict:
    """Every cell's metrics as its evaluate stage wrote them; a cell without them was not reproduced."""
    missing = [name for name in config.cells if not (evaluate_dir(config.study, name) / METRICS_FILE).is_file()]
    if missing:
        raise ArtifactError(
            f"{len(missing)} cell(s) of study {config.study} have no evaluate output ({', '.join(missing[:3])}"
            f"{', …' if len(missing) > 3 else ''}); reproduce the study first (dvc repro), then verify"
        )
    return {name: json.loads((evaluate_dir(config.study, name) / METRICS_FILE).read_text()) for name in config.cells}


def compare(reproduced: dict, committed: dict, tolerances: dict[str, float]) -> list[Difference]:
    """Every metric of every committed cell, against its reproduced value."""
    differences = []
    for cell, metrics in committed.items():
        if cell not in reproduced:
            raise ArtifactError(
                f"the committed study has cell {cell}, which the active params.yaml does not; verify the same study "
                "that was committed (vaebench use-study NAME)"
            )
        for metric, value in metrics.items():
            if metric not in reproduced[cell]:
                raise ArtifactError(f"cell {cell}: reproduced metrics lack {metric}; re-run its evaluate stage")
            differences.append(Difference(cell, metric, reproduced[cell][metric], value, tolerances.get(metric)))
    return differences


class NotReproduced(VaebenchError):
    """A reproduced metric differs from the committed one beyond its tolerance."""


def verify(config: StudyConfig, revision: str = "HEAD") -> tuple[list[Difference], list[str]]:
    """(every difference, the report's lines: one per value beyond its tolerance, then a summary). The caller
    prints the lines and raises NotReproduced when any difference is beyond."""
    committed = committed_metrics(config.study, revision)
    tolerances = seed_tolerances(committed_metrics(SPREAD_STUDY, revision))
    differences = compare(reproduced_metrics(config), committed, tolerances)
    beyond = [d for d in differences if d.beyond]
    lines = [
        f"{d.cell} {d.metric}: reproduced {d.reproduced:.6g}, committed {d.committed:.6g}, difference "
        f"{abs(d.reproduced - d.committed):.3g} beyond "
        + ("exact (no seed spread measured)" if d.tolerance is None else f"the tolerance {d.tolerance:.3g}")
        for d in beyond
    ]
    identical = sum(d.reproduced == d.committed for d in differences)
    lines.append(
        f"study {config.study}: {len(differences)} metric values of {len(committed)} cells against {revision}: "
        f"{identical} identical, {len(differences) - identical - len(beyond)} within the seed spread "
        f"({TOLERANCE_SPREADS:g} standard deviations of the seeds study), {len(beyond)} beyond it"
    )
    return differences, lines
