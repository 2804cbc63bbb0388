"""Optuna's plots of a tuning study, drawn with matplotlib (offline), and the choice of its best trial."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402

from pipeline.errors import VaebenchError  # noqa: E402
from pipeline.tuning.search_space import TuneSpace  # noqa: E402

log = logging.getLogger(__name__)


def best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The best trial first. Single objective: Optuna's best. Several: the Pareto front, ordered by the sum
    of the objectives (for rate and distortion, their sum is the negative ELBO)."""
    if len(study.directions) == 1:
        if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
            raise VaebenchError(
                f"tuning study {study.study_name} has no completed trial; see the FAIL errors in MLflow"
            )
        return [study.best_trial]
    front = study.best_trials
    if not front:
        raise VaebenchError(f"tuning study {study.study_name} has no completed trial; see the FAIL errors in MLflow")
    return sorted(front, key=lambda t: sum(t.values))


def plot_study(study: optuna.Study, space: TuneSpace, folder: Path, dpi: int = 200) -> list[Path]:
    """Every Optuna plot that applies to the study, as PNG; a plot the study cannot support is skipped."""
    names = [p.name for p in space.params]
    if len(study.directions) == 1:
        plots = {
            "optimization_history": lambda: optuna_plots.plot_optimization_history(study),
            "param_importances": lambda: optuna_plots.plot_param_importances(study),
            "parallel_coordinate": lambda: optuna_plots.plot_parallel_coordinate(study),
            "slice": lambda: optuna_plots.plot_slice(study),
            "contour": lambda: optuna_plots.plot_contour(study, params=names[:2]),
            "intermediate_values": lambda: optuna_plots.plot_intermediate_values(study),
        }
    else:
        labels = list(space.metrics)
        plots = {
            "pareto_front": lambda: optuna_plots.plot_pareto_front(study, target_names=labels),
            "parallel_coordinate": lambda: optuna_plots.plot_parallel_coordinate(
                study, target=lambda t: sum(t.values), target_name="sum"
            ),
        }
    written = []
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
                warnings.simplefilter("ignore")
                axes = draw()
        except (ValueError, RuntimeError) as error:  # e.g. importances need two or more completed trials
            log.info("tune plot %s skipped: %s", name, error)
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=dpi, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written
