"""The vaebench app (`make app`): browse a study, explore a trained cell's latent space, train a model and
generate from it. A thin layer: outputs are read through pipeline/reporting/results.py (the report's
reader), models through the train stage's loader, and training runs the pipeline's own commands
(pipeline/app/training.py). Run from the repository root: streamlit run pipeline/app/main.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402
import torch  # noqa: E402

from pipeline.app import latent, training  # noqa: E402
from pipeline.config import PARAMS_FILE, ConfigError, StudyConfig, cell_as_dict, load_study  # noqa: E402
from pipeline.data import images_to_tensor, load_prepared  # noqa: E402
from pipeline.engine import encode_all, resolve_device  # noqa: E402
from pipeline.errors import VaebenchError  # noqa: E402
from pipeline.models import FAMILIES  # noqa: E402
from pipeline.paths import MODEL_FILE, PREPARED_FILE, evaluate_stage, train_dir, train_stage  # noqa: E402
from pipeline.reporting import results  # noqa: E402
from pipeline.trained import load_trained  # noqa: E402

PAGES = {"browser": "Study browser", "explorer": "Latent explorer", "train": "Train, then generate"}
CODES_SHOWN = 2000  # training codes in the explorer's scatter
SLIDER_RANGE = 3.0  # the explorer's sliders span ± this many standard deviations (prior units for z)
AXES_SHOWN = 4  # principal directions with a slider, for latents larger than 2


def device() -> torch.device:
    return resolve_device("auto")


@st.cache_resource(max_entries=8)
def model_of(folder: str, study: str, name: str, stamp: float):
    """The trained model, cached per checkout folder until its model.pt changes (`stamp`, its mtime)."""
    return load_trained(study, cells_of(study)[name], device())


def load_model(study: str, name: str):
    """The cell's model, or None after showing why it cannot be loaded (with the command that fixes it)."""
    try:
        return model_of(str(Path.cwd()), study, name, (train_dir(study, name) / MODEL_FILE).stat().st_mtime)
    except (VaebenchError, OSError) as error:
        st.error(f"vaebench: error: {error}")
        return None


def cells_of(study: str) -> dict:
    """The study's trained cells; when one's recorded configuration cannot be read, the page says so."""
    try:
        return results.trained_cells(study)
    except (VaebenchError, ValueError, KeyError) as error:
        st.error(
            f"vaebench: error: a trained cell of study {study} has an unreadable config.json ({error}); "
            f"retrain it with dvc repro"
        )
        return {}


@st.cache_resource(max_entries=2)
def arrays_of(path: str, stamp: float) -> dict[str, np.ndarray]:
    return load_prepared(Path(path))


def prepared_arrays() -> dict[str, np.ndarray] | None:
    """The study's prepared split, else the app's own (after training on the third page), else None."""
    for path in (PREPARED_FILE, training.workspace_prepared_file()):
        if path.is_file():
            return arrays_of(str(path.resolve()), path.stat().st_mtime)
    return None


def training_codes(model, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Codes and digit labels of the first CODES_SHOWN training images."""
    images = images_to_tensor(arrays["train_images"][:CODES_SHOWN], device())
    return encode_all(model, images).cpu().numpy(), arrays["train_labels"][:CODES_SHOWN]


def digit_image(pixels: np.ndarray, caption: str, width: int = 140) -> None:
    st.image(np.clip(pixels, 0, 1), caption=caption, width=width, clamp=True, output_format="PNG")


def image_row(images: np.ndarray, captions: list[str], width: int = 90) -> None:
    for column, pixels, caption in zip(st.columns(len(images)), images, captions):
        with column:
            digit_image(pixels, caption, width)


def no_study_yet() -> None:
    st.info(
        "No study has been run yet: run `make study` (or `dvc repro`) in the repository, then reload; "
        "or train a model on the page *Train, then generate*."
    )


def active_study() -> StudyConfig | None:
    """The study of params.yaml, whose cells the browser lists even before they are trained."""
    try:
        return load_study(PARAMS_FILE)
    except ConfigError:
        return None


def active_first(studies: list[str], active: StudyConfig | None) -> int:
    """Where the study of params.yaml is in the list (the one selected first), else 0."""
    return studies.index(active.study) if active and active.study in studies else 0


def pick_cell(label: str, key: str) -> tuple[str, str] | None:
    """A study and one of its trained cells, chosen in the sidebar; None when nothing is trained yet."""
    studies = results.studies_with_results()
    if not studies:
        return None
    study = st.sidebar.selectbox(
        f"{label}: study", studies, index=active_first(studies, active_study()), key=f"{key}_study"
    )
    cells = list(cells_of(study))
    if not cells:
        return None
    name = st.sidebar.selectbox(f"{label}: cell", cells, key=f"{key}_cell")
    return study, name


# --- 1. Study browser -----------------------------------------------------------------------------------


def browser_page() -> None:
    st.header("Study browser")
    active = active_study()
    with_results = results.studies_with_results()
    studies = sorted(set(with_results) | ({active.study} if active else set()))
    if not with_results:
        no_study_yet()
        if not studies:
            return
    study = st.sidebar.selectbox("Browse: study", studies, index=active_first(studies, active), key="browse_study")
    trained = cells_of(study)
    planned = list(active.cells) if active and active.study == study else []
    name = st.sidebar.selectbox("Browse: cell", list(dict.fromkeys([*planned, *trained])), key="browse_cell")
    if name not in trained:
        st.warning(f"Cell {name} has no trained model yet: run `dvc repro {train_stage(active.cell(name))}`.")
        return
    cell = trained[name]
    left, right = st.columns([1, 2])
    with left:
        st.subheader(name)
        st.table(pd.DataFrame({"value": {k: str(v) for k, v in cell_as_dict(cell).items()}}))
    with right:
        metrics = results.cell_metrics(study, name)
        if metrics is None:
            st.warning(f"Cell {name} is trained but not evaluated yet: {how_to_evaluate(study, cell, active)}.")
        else:
            st.subheader("Test metrics")
            st.dataframe(
                pd.DataFrame({"metric": list(metrics), "value": list(metrics.values())}),
                hide_index=True,
                key="browse_metrics",
            )
        for picture, path in results.cell_images(study, name).items():
            st.image(str(path), caption=f"{picture} (evaluate stage)")
    side_by_side(study, name)


def how_to_evaluate(study: str, cell, active: StudyConfig | None) -> str:
    if study == training.APP_STUDY:
        return "train it again with *evaluate after training* ticked"
    if active and active.study == study:
        return f"run `dvc repro {evaluate_stage(cell)}`"
    return (
        f"make study {study} the active one (`vaebench use-study {study}`), then run `dvc repro {evaluate_stage(cell)}`"
    )


def side_by_side(study: str, name: str) -> None:
    st.subheader("Two cells decoding the same z")
    model = load_model(study, name)
    if model is None:
        return
    others = [other for other, cell in cells_of(study).items() if cell.latent_dim == model.latent_dim]
    other = st.selectbox(f"Compare {name} with (cells with latent_dim {model.latent_dim})", others, key="browse_other")
    seed = st.number_input("seed of the noise", min_value=0, value=0, step=1, key="browse_seed")
    st.caption(
        "The same noise for both (drawn from one seed); each model's sampler turns it into its own latents (a prior, "
        "or one fitted ex post)."
    )
    for shown in dict.fromkeys([name, other]):
        decoder = load_model(study, shown)
        if decoder is not None:
            st.caption(shown)
            noise = decoder.sample_noise(8, torch.Generator().manual_seed(int(seed)))
            image_row(latent.decode_noise(decoder, noise), [""] * len(noise), width=70)


# --- 2. Latent explorer ---------------------------------------------------------------------------------


def explorer_page() -> None:
    st.header("Latent explorer")
    picked = pick_cell("Explore", "explore")
    if picked is None:
        no_study_yet()
        return
    study, name = picked
    model = load_model(study, name)
    if model is None:
        return
    if not model.capabilities.encoder:
        st.caption(f"{name} is a {model.family} generator (no encoder): z ~ N(0, I) moved along its first axes.")
        generator_explorer(model)
        return
    if not model.capabilities.continuous_code:
        st.caption(f"{name}'s code is quantised: moving through code space does not apply; samples of its sampler:")
        noise = model.sample_noise(8, torch.Generator().manual_seed(0))
        image_row(latent.decode_noise(model, noise), [""] * len(noise), width=70)
        return
    arrays = prepared_arrays()
    if arrays is None:
        st.warning("The prepared data (results/prepare/mnist.npz) is missing: run `dvc repro prepare`.")
        return
    codes, labels = training_codes(model, arrays)
    if model.latent_dim == 2:
        plane_explorer(model, codes, labels)
    else:
        axes_explorer(model, codes, labels)
    interpolation(model, arrays)


def plane_explorer(model, codes: np.ndarray, labels: np.ndarray) -> None:
    st.subheader("The 2-D latent plane")
    units = f"{model.sampler.label} units" if model.sampler.ex_post else "z"
    left, right = st.columns(2)
    with left:
        z1 = st.slider(f"z₁ ({units})", -SLIDER_RANGE, SLIDER_RANGE, 0.0, 0.05, key="plane_z1")
        z2 = st.slider(f"z₂ ({units})", -SLIDER_RANGE, SLIDER_RANGE, 0.0, 0.05, key="plane_z2")
        point = torch.tensor([[z1, z2]])
        digit_image(latent.decode_noise(model, point)[0], f"decoded at ({z1:.2f}, {z2:.2f})", width=200)
    with right:
        code_point = model.latent_from_noise(point.to(device())).cpu().numpy()[0]
        scatter(codes, labels, code_point, "codes of training digits; × the decoded point")


def axes_explorer(model, codes: np.ndarray, labels: np.ndarray) -> None:
    st.subheader(f"Moving along the principal directions of the codes ({model.latent_dim}-D)")
    mean, directions, scales = latent.principal_axes(torch.from_numpy(codes), min(AXES_SHOWN, model.latent_dim))
    left, right = st.columns(2)
    with left:
        offsets = [
            st.slider(
                f"direction {i + 1} (standard deviations)", -SLIDER_RANGE, SLIDER_RANGE, 0.0, 0.1, key=f"axis_{i}"
            )
            for i in range(len(directions))
        ]
        z = latent.point_on_axes(mean, directions, scales, offsets)
        digit_image(latent.decode(model, z)[0], "decoded", width=200)
    with right:
        projected = (torch.from_numpy(codes) - mean) @ directions[:2].T
        scatter(
            projected.numpy(),
            labels,
            ((z[0] - mean) @ directions[:2].T).numpy(),
            "codes on the first two principal directions; × the decoded point",
        )


def scatter(points: np.ndarray, labels: np.ndarray, marked: np.ndarray, title: str) -> None:
    if points.shape[1] == 1:  # a 1-D latent: the codes on a line
        points, marked = np.pad(points, ((0, 0), (0, 1))), np.pad(marked, (0, 1))
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    shown = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=4, alpha=0.6, vmin=-0.5, vmax=9.5)
    ax.scatter([marked[0]], [marked[1]], marker="x", s=120, c="black", linewidths=2.5)
    fig.colorbar(shown, ax=ax, ticks=range(10), label="digit")
    ax.set_title(title, fontsize=8)
    st.pyplot(fig, clear_figure=True)
    plt.close(fig)


def generator_explorer(model) -> None:
    seed = st.number_input("seed of z ~ N(0, I)", min_value=0, value=0, step=1, key="generator_seed")
    z = model.sample_noise(1, torch.Generator().manual_seed(int(seed)))
    for i in range(min(AXES_SHOWN, model.latent_dim)):  # keyed by the seed: a new seed starts at its own z
        z[0, i] = st.slider(
            f"z{i + 1}", -SLIDER_RANGE, SLIDER_RANGE, float(z[0, i]), 0.05, key=f"generator_z{i}_{seed}"
        )
    digit_image(latent.decode_noise(model, z)[0], "generated", width=200)


def interpolation(model, arrays: dict[str, np.ndarray]) -> None:
    st.subheader("Interpolation between two test digits")
    labels = arrays["test_labels"]
    ends = []
    for side, column in zip(("from", "to"), st.columns(2)):
        with column:
            how = st.radio(
                f"{side}: choose", ["by index", "at random from a digit"], horizontal=True, key=f"how_{side}"
            )
            if how == "by index":
                index = int(
                    st.number_input(
                        f"{side}: test image index", 0, len(labels) - 1, 0 if side == "from" else 1, key=f"index_{side}"
                    )
                )
            else:
                digit = st.selectbox(f"{side}: digit", range(10), key=f"digit_{side}")
                draw = st.number_input(
                    f"{side}: draw",
                    min_value=0,
                    value=0,
                    step=1,
                    key=f"draw_{side}",
                    help="another number draws another test image of the digit",
                )
                candidates = np.flatnonzero(labels == digit)
                index = int(np.random.default_rng(int(draw)).choice(candidates))
            ends.append(index)
            digit_image(arrays["test_images"][index] / 255.0, f"test image {index} (digit {labels[index]})", width=90)
    steps = st.slider("steps", 3, 12, 8, key="steps")
    images = images_to_tensor(arrays["test_images"][ends], device())
    codes = encode_all(model, images).cpu()
    path = latent.line_between(codes[0], codes[1], steps)
    image_row(latent.decode(model, path), [f"{w:.2f}" for w in np.linspace(0, 1, steps)], width=70)


# --- 3. Train, then generate ----------------------------------------------------------------------------


def train_page() -> None:
    st.header("Train, then generate")
    st.caption(
        f"Trains with the pipeline's own `vaebench train` on {device().type.upper()}; the run is logged to "
        f"MLflow, experiment vaebench-{training.APP_STUDY}; the model joins study `{training.APP_STUDY}` "
        "in the browser and the explorer."
    )
    family = st.selectbox("family", list(FAMILIES), key="train_family")
    left, right = st.columns(2)
    with left:
        arch = st.selectbox("arch", ["linear", "conv"], key="train_arch")
        latent_dim = int(st.number_input("latent_dim", min_value=1, value=2, step=1, key="train_latent_dim"))
        one_pass = FAMILIES[family].capabilities.one_pass  # fitted in closed form: one epoch is the fit
        epochs = int(
            st.number_input(
                "epochs",
                min_value=1,
                max_value=1 if one_pass else None,
                value=1 if one_pass else 3,
                step=1,
                key="train_epochs_one_pass" if one_pass else "train_epochs",
            )
        )
    with right:
        train_size = int(
            st.number_input("training images", min_value=100, max_value=55_000, value=5_000, step=500, key="train_size")
        )
        settings = st.text_area(
            f"{family} settings (YAML, as on a cell in params.yaml)",
            training.starting_settings(family),
            key=f"train_settings_{family}",
        )
    evaluate = st.checkbox(
        "evaluate after training (every test metric, as for a study cell; about 30 s more)", key="train_evaluate"
    )
    request = training.Request(family, arch, latent_dim, epochs, train_size, settings, evaluate=evaluate)
    if st.button("Train", type="primary", key="train_button"):
        run_training(request)
    trained = st.session_state.get("trained")
    if trained:
        st.success(f"Trained {trained['cell']}: open it in the Latent explorer (study {training.APP_STUDY}).")
        draw_curve(st, trained["history"])
        st.caption("As a cell of params.yaml (paste under `cells:`):")
        st.code(trained["snippet"], language="yaml")
        model = load_model(training.APP_STUDY, trained["cell"])
        if model is not None:
            noise = model.sample_noise(8, torch.Generator().manual_seed(0))
            image_row(latent.decode_noise(model, noise), [""] * 8, width=70)


def draw_curve(where, rows: list[dict]) -> None:
    frame = pd.DataFrame(rows).set_index("epoch")
    where.line_chart(frame[[key for key in ("train_loss", "val_loss") if key in frame]])


def run_training(request: training.Request) -> None:
    note = st.info("Training. Changing a setting or the page now stops it (its MLflow run ends KILLED).")
    progress = st.progress(0.0, text="starting")
    curve = st.empty()
    rows = []

    def on_epoch(row: dict) -> None:
        rows.append(row)
        progress.progress(row["epoch"] / row["epochs"], text=f"epoch {row['epoch']}/{row['epochs']}")
        draw_curve(curve, rows)

    try:
        name = training.train(request, on_epoch)
    except VaebenchError as error:
        note.empty()
        progress.empty()
        st.error(f"vaebench: error: {error}")
        return
    note.empty()
    st.session_state["trained"] = {"cell": name, "snippet": training.snippet(request), "history": rows}


def main() -> None:
    st.set_page_config(page_title="vaebench", layout="wide")
    chosen = st.query_params.get("page", "browser")
    keys = list(PAGES)
    page = st.sidebar.radio(
        "page", keys, index=keys.index(chosen) if chosen in keys else 0, format_func=PAGES.get, key="page"
    )
    st.sidebar.caption(f"device: {device()}")
    {"browser": browser_page, "explorer": explorer_page, "train": train_page}[page]()


main()
