"""The /ui routing trace page in headless Chromium: the page lists the models, and a person's
session (type, pick, run) shows coloured tokens, the legend, routing events and errors. Skips
cleanly without /usr/bin/chromium (scripts/install-browser.sh)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from tests.server.conftest import KEY, PROMPT

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,900"]
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (scripts/install-browser.sh)")


@needs_chromium
def test_ui_page_loads_models(live):
    """Plain headless Chromium (--dump-dom): the page loads and lists the models from /v1/models."""
    assert httpx.get(live.url + "/ui/static/app.js").status_code == 200
    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        out = subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                              "--dump-dom", f"{live.url}/ui?{urlencode({'key': KEY})}"],
                             capture_output=True, text=True, timeout=90)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("auto", "base", "alpha", "beta", "gamma"):
        assert f'<option value="{name}"' in out.stdout, name
    assert '<li data-adapter="gamma">' in out.stdout  # the legend knows every adapter up front
    assert re.search(r"\d+ prompts no adapter took, in \d+ clusters", out.stdout)  # the task-shift panel read its report


@needs_chromium
@pytest.mark.skipif(not CHROMEDRIVER.exists(), reason="needs /usr/bin/chromedriver (scripts/install-browser.sh)")
def test_ui_streams_and_colours_tokens(live):
    """A person's session: type a prompt, pick a model, run, watch the coloured stream finish."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="chromium-")
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    try:
        driver.get(f"{live.url}/ui")
        driver.find_element(By.ID, "api-key").send_keys(KEY + Keys.TAB)  # the models load with the key
        wait = WebDriverWait(driver, 20)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) >= 5)

        def run(model: str, prompt: str, max_tokens: int) -> str:
            box = driver.find_element(By.ID, "prompt")
            box.clear()
            box.send_keys(prompt)
            Select(driver.find_element(By.ID, "model")).select_by_value(model)
            field = driver.find_element(By.ID, "max-tokens")
            field.clear()
            field.send_keys(str(max_tokens))
            driver.find_element(By.ID, "run").click()
            wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
            return driver.find_element(By.ID, "status").text

        status = run("alpha", PROMPT, 8)
        assert "answered by alpha" in status, status
        tokens = driver.find_elements(By.CSS_SELECTOR, "#answer .tok")
        assert 1 <= len(tokens) <= 8 and {t.get_attribute("data-adapter") for t in tokens} == {"alpha"}
        assert tokens[0].value_of_css_property("background-color") != tokens[0].value_of_css_property("color")
        legend = driver.find_element(By.CSS_SELECTOR, '#legend li[data-adapter="alpha"]').text
        assert f"{len(tokens)} token" in legend

        status = run("auto", PROMPT, 6)
        assert status.startswith("done"), status
        assert driver.find_elements(By.CSS_SELECTOR, "#events li")  # routing events listed...
        assert driver.find_elements(By.CSS_SELECTOR, "#answer .tok.event")  # ...and marked on their tokens
        assert "arrow" in driver.find_element(By.ID, "routing").text

        status = run("beta", "word " * 200, 4)  # the server's 400 is shown, not swallowed
        assert driver.find_element(By.ID, "status").get_attribute("data-state") == "error"
        assert "tokens" in status
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
