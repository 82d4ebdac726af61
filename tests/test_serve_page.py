"""The page in headless Chromium with training images whose file names are markup: the
names are shown as text, never run (they are recorded by build and add, so anyone who can
put a file into the training folder chooses them)."""

from __future__ import annotations

import base64
import shutil
import subprocess
import urllib.parse

import pytest

from conftest import make_mvtec
from serve_support import served

MARKUP = "<img src=x onerror=document.body.dataset.pwned=1>"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_training_image_names_are_shown_as_text(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): the page was not tested in a browser")
    from patchsearch.data import train_images
    from patchsearch.pipeline import build

    root = make_mvtec(tmp_path / "mvtec", "widget", n_train=6, n_good=1, n_bad=1)
    for p in sorted((root / "widget/train/good").glob("*.png")):
        p.rename(p.with_name(f"{MARKUP}{p.name}"))
    build(train_images(root, "widget"), tmp_path / "idx" / "widget", category="widget", data_root=root / "widget",
          resize=64, coreset_ratio=0.25, batch_size=4)
    frame = base64.b64encode((root / "widget/test/blob/000.png").read_bytes()).decode()
    with served(tmp_path / "idx", root, "--log-level", "warning", log=tmp_path / "server.log") as (base, *_):
        url = f"{base}/?category=widget&frame=" + urllib.parse.quote(f"data:image/png;base64,{frame}", safe="")
        flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000", "--dump-dom", url]
        dom = subprocess.run(flags, capture_output=True, text=True, timeout=180).stdout
    assert 'data-state="done"' in dom and 'data-decision="NG"' in dom, dom[dom.find("<body"):][:2000]
    assert "data-pwned" not in dom
    assert dom.count("&lt;img src=x onerror=document.body.dataset.pwned=1&gt;") == 9  # the 9 neighbours, as text
