"""The benchmark's Markdown tables and its results files (reports/benchmarks/)."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.outputs import write_json, write_text

log = logging.getLogger(__name__)

OUT_DIR = Path("reports") / "benchmarks"
MISSING = "–"


def spread(values: list[float], digits: int = 0, scale: float = 1.0) -> str:
    """median (min–max) of repeated measurements."""
    values = sorted(value * scale for value in values)
    median = (
        values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    )
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({values[0]:.{digits}f}–{values[-1]:.{digits}f})"


def table(results: dict) -> str:
    runs = results["runs"]
    machine = results["machine"]
    lines = [
        f"{len(runs)} run(s); each figure is the median (min–max) over them. matmul float32: "
        f"{spread(machine['matmul_gflops'])} GFLOP/s on {machine['cpu_threads']} threads ({machine['cpu_capability']})",
        "",
        "| cell | (a) engine img/s | (b) standard img/s | (c) bound img/s | a/b | a/c | engine GFLOP/s | of matmul "
        "| stacked/engine | peak MiB a / b / c |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for index, row in enumerate(runs[0]["architectures"]):
        rows = [run["architectures"][index] for run in runs]

        def over(key: str, digits: int = 0, scale: float = 1.0) -> str:
            return spread([r[key] for r in rows], digits, scale)

        memory = {key: spread([r["peak_memory_mib"][key] for r in rows]) for key in row["peak_memory_mib"]}
        lines.append(
            f"| {row['cell']} | {over('engine_images_per_s')} | {over('standard_images_per_s')} | "
            f"{over('compute_bound_images_per_s')} | {over('engine_over_standard', 2)} | "
            f"{over('engine_over_compute_bound', 2)} | "
            f"{over('engine_gflops')} | {over('engine_share_of_matmul_peak', 0, 100)}% | "
            f"{over('stacked_over_engine', 2)} ({row['stacked_copies']} seeds) | "
            f"{memory['engine']} / {memory['standard']} / {memory['compute_bound']} |"
        )
    wholes = [run["whole_process"] for run in runs if "whole_process" in run]
    if wholes:
        first = wholes[0]

        def whole(path: tuple[str, ...], digits: int = 0) -> str:
            values = []
            for entry in wholes:
                for key in path:
                    entry = entry.get(key, {}) if isinstance(entry, dict) else {}
                if isinstance(entry, (int, float)):
                    values.append(entry)
            return spread(values, digits) if values else MISSING

        def parts(stage: str) -> str:
            names = dict.fromkeys(part for entry in wholes for part in entry[stage]["parts"])
            return ", ".join(f"{part} {whole((stage, 'parts', part), 1)}" for part in names)

        network = (
            "the classic recipe's network"
            if first.get("same_network")
            else ("NOT the classic recipe's 784-400-20-400-784 network, so the rates compare different models")
        )
        lines += [
            "",
            f"Whole processes, {first['epochs']} epochs on {first['train_images']:,} images; cell {first['cell']} "
            f"({network}) on {first.get('device', 'cpu')}, the classic recipe on cpu:",
            "",
            "| process | seconds | images/s | test ELBO (nats/image) |",
            "|---|---|---|---|",
            f"| classic recipe (benchmarks/reference_vae.py) | {whole(('reference', 'seconds'), 1)} | "
            f"{whole(('reference', 'images_per_s'))} | {whole(('reference', 'test_elbo'), 2)} |",
            f"| `python -m pipeline train {first['cell']}` | {whole(('train', 'seconds'), 1)} | "
            f"{whole(('train', 'images_per_s'))} | — |",
            f"| `python -m pipeline evaluate {first['cell']}` | {whole(('evaluate', 'seconds'), 1)} | — | "
            f"{whole(('evaluate', 'test_elbo'), 2)} |",
            "",
            f"train over the classic recipe: {whole(('train_over_reference',), 2)}×; test ELBO difference "
            f"{whole(('test_elbo_difference',), 2)} nats/image; `import pipeline.train` "
            f"{whole(('train', 'import_seconds'), 1)} s",
            f"train stage by part (s): {parts('train')}",
            f"evaluate stage by part (s): {parts('evaluate')}",
        ]
    study = results.get("study_repro")
    if study:
        lines += ["", study_table(study)]
    return "\n".join(lines)


def study_table(study: dict) -> str:
    """The study's wall time by stage, and where each cell's train and evaluate time went."""
    if not study["outputs_compared"]:
        same = "no output to compare with (the commit has no dvc.lock, or none of these outputs)"
    elif not study["outputs_differing"]:
        same = "every output has the committed dvc.lock's md5"
    else:
        same = (
            f"{len(study['outputs_differing'])} outputs differ from the committed dvc.lock: "
            f"{', '.join(study['outputs_differing'][:5])}"
        )
    lines = [
        f"dvc repro of the study from clean ({study['cells']} cells, commit {study['commit'][:7]}): "
        f"{study['seconds'] / 60:.1f} min; {study['outputs_compared']} outputs compared, {same}",
        "",
        "| stage | seconds | train: epochs / logging the model | evaluate: biggest parts |",
        "|---|---|---|---|",
    ]
    for stage, seconds in study["stages"].items():
        cell = stage.split("@", 1)[1] if "@" in stage else None
        parts = study["cell_parts"].get(cell, {})
        detail = ["", ""]
        if stage.startswith(("train@", "finetune@")) and parts.get("train"):
            detail[0] = f"{parts['train'].get('epochs', 0):.1f} / {parts['train'].get('log_model', 0):.1f}"
        if stage.startswith("evaluate") and parts.get("evaluate"):
            top = sorted(parts["evaluate"].items(), key=lambda item: -item[1])[:3]
            detail[1] = ", ".join(f"{part} {value:.1f}" for part, value in top)
        lines.append(f"| {stage} | {seconds:.1f} | {detail[0]} | {detail[1]} |")
    return "\n".join(lines)


def write_results(results: dict) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_json(OUT_DIR / "bench.json", results)
    write_text(OUT_DIR / "bench.md", table(results) + "\n")
    return OUT_DIR / "bench.json"
