"""The App in a real headless Chromium: open the Balance panel, see the chart, run an operator.

Needs Debian's chromium + chromium-driver (installed by `make`); skipped with
the reason printed when they are absent. Screenshots go to
$FAIRBALANCE_SCREENSHOTS (default: a temp folder) for inspection.
"""

import os
import shutil
import tempfile
import time

import pytest

from test_app_server import app_server  # noqa: F401  (fixture: App server on loopback)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed")
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        print("SKIP REASON: Debian's chromium/chromium-driver are not installed")
        pytest.skip("chromium/chromium-driver not installed (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tempfile.mkdtemp(prefix='fb-chrome-')}", "--window-size=1400,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def _wait(predicate, timeout=90, step=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(step)
    return None


@pytest.fixture
def browser_dataset(tiny_clip):
    import fiftyone as fo

    from fairbalance import datasets
    from fairbalance.sa_features import compute_sa_features

    ds = datasets.colored_digits("fb-browser-test", train_per_class=6, test_per_class=1, persistent=False,
                                 overwrite=True)
    compute_sa_features(ds, "colors", model=tiny_clip, pretrained=None, num_related_texts=4, num_workers=0)
    yield ds
    if fo.dataset_exists(ds.name):
        fo.delete_dataset(ds.name)


def test_balance_panel_and_operator_in_chromium(app_server, browser_dataset):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    shots = os.environ.get("FAIRBALANCE_SCREENSHOTS") or tempfile.mkdtemp(prefix="fb-screens-")
    os.makedirs(shots, exist_ok=True)
    d = _browser()
    click = lambda el: d.execute_script("arguments[0].click()", el)  # noqa: E731  (overlays intercept real clicks)
    try:
        d.get(f"{app_server}/datasets/{browser_dataset.name}")
        assert _wait(lambda: d.find_elements(By.CSS_SELECTOR, "[data-cy=new-panel-btn]")), "App did not load"
        for el in d.find_elements(By.CSS_SELECTOR, "[data-cy=btn-disable-cookies]"):
            click(el)
        d.save_screenshot(os.path.join(shots, "1-dataset.png"))

        # the Balance panel, with its bar chart
        click(d.find_element(By.CSS_SELECTOR, "[data-cy=new-panel-btn]"))
        entry = _wait(lambda: d.find_elements(By.XPATH, "//*[normalize-space(text())='Balance']"), 30)
        assert entry, "Balance is not offered in the new-panel menu"
        click(entry[0])
        assert _wait(lambda: d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot"), 60), "no chart in the panel"
        assert d.find_elements(By.CSS_SELECTOR, "[data-cy=panel-tab-balance_panel]")
        assert "normalized" in d.find_element(By.CSS_SELECTOR, "[data-cy=panel-content-balance_panel]").text
        d.save_screenshot(os.path.join(shots, "2-balance-panel.png"))

        # an operator from the operator browser: compute pseudo-labels with its defaults
        click(d.find_element(By.CSS_SELECTOR, "[data-cy=action-browse-operations]"))
        time.sleep(1)
        search = d.switch_to.active_element
        search.send_keys("compute pseudo-labels")
        time.sleep(1)
        search.send_keys(Keys.ENTER)
        execute = _wait(lambda: d.find_elements(By.XPATH, "//button[normalize-space(.)='Execute']"), 30)
        assert execute, "operator form did not open"
        assert d.find_elements(By.XPATH, "//*[normalize-space(text())='Compute pseudo-labels']")
        d.save_screenshot(os.path.join(shots, "3-operator-form.png"))

        def written():
            browser_dataset.reload()
            return browser_dataset.has_field("sa_cluster") and browser_dataset.count("sa_cluster") > 0

        time.sleep(2)  # let the form finish resolving before pressing Execute
        for _ in range(4):  # a click that lands while the form re-renders is lost: press again
            buttons = d.find_elements(By.XPATH, "//button[normalize-space(.)='Execute']")
            if not buttons or written():
                break
            click(buttons[0])
            if _wait(lambda: written() or not d.find_elements(By.XPATH, "//button[normalize-space(.)='Execute']"), 20):
                break
        assert _wait(written, 300, 2), "the operator started from the browser wrote nothing"
        assert browser_dataset.count("sa_cluster") == len(browser_dataset)
        field = "[data-cy='sa_cluster-field']"
        if not _wait(lambda: d.find_elements(By.CSS_SELECTOR, field), 60):
            d.refresh()  # the App reloads the dataset on completion; a slow machine may miss the push
        assert _wait(lambda: d.find_elements(By.CSS_SELECTOR, field), 120), "the new field is not in the sidebar"
        d.save_screenshot(os.path.join(shots, "4-new-field.png"))
    finally:
        d.save_screenshot(os.path.join(shots, "last.png"))
        d.quit()
