"""The README's screenshots of the app: each page of `streamlit run pipeline/app/main.py` over this
repository's study (after `make study`), opened in headless Chromium with the browser test's helpers.

    python tests/app_screenshots.py reports/app
"""

import sys
from pathlib import Path

from browser import STREAMLIT_BUSY, browser_page, screenshot_when_rendered, streamlit_app

REPO = Path(__file__).resolve().parents[1]
PAGES = {
    "browser": ["Study browser", "Test metrics", "Two cells decoding the same z"],
    "explorer": ["Latent explorer", "Interpolation between two test digits"],
    "train": ["Train, then generate", "Train"],
}


def main(folder: Path) -> None:
    with streamlit_app(REPO, REPO / "pipeline" / "app" / "main.py") as url, browser_page() as page:
        for name, texts in PAGES.items():
            page.goto(f"{url}/?page={name}")
            screenshot_when_rendered(page, texts, folder / f"app-{name}.png", gone=STREAMLIT_BUSY)
            print(folder / f"app-{name}.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
