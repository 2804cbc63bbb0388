"""`vaebench verify` (pipeline/verify.py): a reproduced study against the committed metrics, within a
tolerance from the seeds study's spread; in a Git repository of its own."""

import json
import shutil
import subprocess

import pytest
import yaml

from conftest import TINY_STUDY
from pipeline.cli import main
from pipeline.config import load_study
from pipeline.verify import TOLERANCE_SPREADS, seed_tolerances, verify

COMMITTED = {"linear-z2-b1-s0": {"recon": 150.0, "fid_mnist_cnn": 500.0}, "ae-linear-z2-s0": {"recon": 140.0}}
SEEDS = {  # recon: standard deviation 1 in one group, 0.5 in the other; fid: 10
    "linear-z2-b1-s0": {"recon": 150.0, "fid_mnist_cnn": 500.0},
    "linear-z2-b1-s1": {"recon": 151.0, "fid_mnist_cnn": 510.0},
    "linear-z2-b1-s2": {"recon": 152.0, "fid_mnist_cnn": 520.0},
    "conv-z2-b1-s0": {"recon": 100.0},
    "conv-z2-b1-s1": {"recon": 100.5},
    "conv-z2-b1-s2": {"recon": 101.0},
}


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A checkout whose HEAD holds the committed tiny-study and seeds metrics, with a reproduced tiny study of
    two cells (the committed values exactly)."""
    monkeypatch.chdir(tmp_path)
    study = load_study(TINY_STUDY)
    cells = {name: spec for name, spec in study.raw["cells"].items() if name in COMMITTED}
    raw = dict(study.raw, cells=cells, finetuned={})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    write(tmp_path / "results/tiny/metrics.json", COMMITTED)
    write(tmp_path / "results/seeds/metrics.json", SEEDS)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["git", "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "committed study"], check=True)
    for cell, metrics in COMMITTED.items():
        write(tmp_path / f"results/tiny/evaluate/{cell}/metrics.json", metrics)
    return tmp_path


def reproduce(repo, cell, metric, value):
    path = repo / f"results/tiny/evaluate/{cell}/metrics.json"
    metrics = json.loads(path.read_text())
    path.write_text(json.dumps(metrics | {metric: value}))


def test_tolerances_are_the_largest_seed_spread_times_the_factor():
    tolerances = seed_tolerances(SEEDS)
    assert tolerances["recon"] == pytest.approx(TOLERANCE_SPREADS * 1.0)
    assert tolerances["fid_mnist_cnn"] == pytest.approx(TOLERANCE_SPREADS * 10.0)


def test_the_committed_values_pass_and_a_difference_within_the_spread_passes(repo, capsys):
    config = load_study("params.yaml")
    differences, lines = verify(config)
    assert len(differences) == 3 and not any(d.beyond for d in differences)
    assert lines == [
        "study tiny: 3 metric values of 2 cells against HEAD: 3 identical, 0 within the seed spread "
        f"({TOLERANCE_SPREADS:g} standard deviations of the seeds study), 0 beyond it"
    ]
    reproduce(repo, "linear-z2-b1-s0", "recon", 152.9)  # 2.9 < 3 x 1
    assert main(["verify"]) == 0
    assert "2 identical, 1 within the seed spread" in capsys.readouterr().out


def test_a_difference_beyond_the_spread_fails_naming_the_cell_and_metric(repo, capsys):
    reproduce(repo, "ae-linear-z2-s0", "recon", 143.5)  # 3.5 > 3 x 1
    assert main(["verify"]) == 1
    captured = capsys.readouterr()
    assert (
        "ae-linear-z2-s0 recon: reproduced 143.5, committed 140, difference 3.5 beyond the tolerance 3" in captured.out
    )
    assert "1 metric value(s) differ from the committed study beyond the seed spread" in captured.err


def test_a_study_not_reproduced_or_not_committed_is_one_line(repo, capsys):
    shutil.rmtree(repo / "results/tiny/evaluate/ae-linear-z2-s0")
    assert main(["verify"]) == 1
    assert "have no evaluate output (ae-linear-z2-s0); reproduce the study first" in capsys.readouterr().err
    assert main(["verify", "--revision", "no-such-revision"]) == 1
    assert "Git has no results/tiny/metrics.json at no-such-revision" in capsys.readouterr().err
