"""The App in a real headless Chromium, as a person meets it: every operator's form, the Balance panel.

Every operator is found in the operator browser, its form filled by typing
and clicking, executed, and its result dialog read: no "No value provided",
no view stuck on "Loading...", floats rounded for reading. The models are the
tiny random ones of ``tiny_models`` (typed into the forms as local folders),
the datasets a few dozen 16 px Colored Digits. A screenshot of every result
goes to $FAIRBALANCE_SCREENSHOTS (default: a temp folder) for review, and the
page's network log (Chrome's performance log) shows that nothing is fetched
from outside the App's origin.

Needs Debian's chromium + chromium-driver (installed by `make`); skipped with
the reason printed when they are absent.
"""

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import fiftyone as fo
import pytest

import fairbalance as fb
import tiny_models

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
MODAL = "//*[@data-cy='operators-prompt-modal']"
PROGRESS = "//*[@data-cy='operators-prompt-view-modal']"  # FiftyOne's dialog for set_progress and show_output
CREATED, MNIST = "fb-browser-created", "fb-browser-mnist"
# FiftyOne's own index.html links these two font stylesheets (display=swap: text shows meanwhile); nothing
# else may leave the App's origin
APP_SHELL_FONTS = ("https://fonts.googleapis.com/css2?family=Palanquin&",
                   "https://fonts.googleapis.com/css2?family=Roboto%20Mono&")
SCROLL_TO_END = """
for (const el of arguments[0].querySelectorAll('*')) {
  const style = getComputedStyle(el);
  if (/(auto|scroll)/.test(style.overflowY) && el.scrollHeight > el.clientHeight + 5) {
    el.scrollTop = el.scrollHeight; return true;
  }
}
return false;"""
RAW_FLOAT = re.compile(r"(?<![\w/.-])-?\d+\.\d{4,}(?![\w/])")  # 4+ decimals: not rounded for reading

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # a real browser against a real App


def _profile_folder():
    """A fresh Chromium profile in the session's folder, removed with it after the test process ends (a profile's
    hundreds of files, removed one browser at a time at exit, had kept pytest ~4 s after its summary)."""
    import conftest

    return conftest.session_folder("fb-chrome-")


def screenshots_folder():
    """$FAIRBALANCE_SCREENSHOTS, or a new temporary folder."""
    shots = os.environ.get("FAIRBALANCE_SCREENSHOTS") or tempfile.mkdtemp(prefix="fb-screens-")
    os.makedirs(shots, exist_ok=True)
    return shots


@contextlib.contextmanager
def open_app(app_server, last_shot):
    """A Chromium page on the App (see :class:`App`); ``last_shot`` is saved when the page is closed."""
    shots = screenshots_folder()
    driver = _browser()
    page = App(driver, app_server, shots)
    try:
        yield page
    finally:
        driver.save_screenshot(os.path.join(shots, last_shot))
        driver.quit()


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
                f"--user-data-dir={_profile_folder()}", "--window-size=1400,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the page's network events
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def _wait(predicate, timeout=90, step=0.25):
    """The first truthy value of ``predicate`` (exceptions of a re-rendering page count as not yet), or None."""
    from selenium.common.exceptions import WebDriverException

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            found = predicate()
        except WebDriverException:  # e.g. a stale element while React re-renders
            found = None
        if found:
            return found
        time.sleep(step)
    return None


def _lit(text):
    return f"'{text}'" if "'" not in text else f'"{text}"'


class App:
    """The App page as a person uses it: the operator browser, forms by their labels, result dialogs."""

    def __init__(self, driver, base, shots):
        self.d, self.base, self.shots = driver, base, shots
        self.requests = []  # every URL the page requested, from Chrome's performance log
        self.timings = {}
        self.progress_shown = []  # the runs whose progress (then result) showed in FiftyOne's progress dialog

    def click(self, el):
        self.d.execute_script("arguments[0].click()", el)  # overlays (tooltips, popovers) intercept real clicks

    def find(self, xpath):
        from selenium.webdriver.common.by import By

        return self.d.find_elements(By.XPATH, xpath)

    def network(self):
        """The URLs requested since the last call (Network.requestWillBeSent events)."""
        for entry in self.d.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg["method"] == "Network.requestWillBeSent":
                self.requests.append(msg["params"]["request"]["url"])
        return self.requests

    def open_dataset(self, name):
        from selenium.webdriver.common.by import By

        self.d.get(f"{self.base}/datasets/{name}")
        assert _wait(lambda: self.d.find_elements(By.CSS_SELECTOR, "[data-cy=entry-counts]")), f"{name} did not load"
        for el in self.d.find_elements(By.CSS_SELECTOR, "[data-cy=btn-disable-cookies]"):
            self.click(el)
        for el in self.find("//button[normalize-space(.)='Dismiss']"):  # the Enterprise promotion popover
            self.click(el)

    def sample_count(self):
        from selenium.webdriver.common.by import By

        return self.d.find_element(By.CSS_SELECTOR, "[data-cy=entry-counts]").text

    def browse(self, query):
        """The operator browser's entries (labels, in its order) for ``query``; left open."""
        from selenium.webdriver.common.by import By

        self.click(self.d.find_element(By.CSS_SELECTOR, "[data-cy=action-browse-operations]"))
        search = _wait(lambda: self.d.find_elements(By.CSS_SELECTOR, "[data-cy=operators-browser-search]"), 20)
        assert search, "the operator browser did not open"
        search[0].send_keys(query)
        return search[0]

    def open_operator(self, label, title):
        """Find the operator by (part of) its label in the operator browser, as a user types it; open its form."""
        from selenium.webdriver.common.keys import Keys

        search = self.browse(f"fairbalance {label}")
        entry = _wait(lambda: self.find(f"//*[starts-with(normalize-space(text()), {_lit('fairbalance ' + label)})]"),
                      20)
        assert entry, f"no operator labelled 'fairbalance {label} · …' in the operator browser"
        search.send_keys(Keys.ENTER)
        assert _wait(lambda: self.find(f"{MODAL}//*[normalize-space(text())={_lit(title)}]"), 60), \
            f"the form '{title}' did not open; dialog: {self.modal_text()!r}"
        self.settle()

    def modal_text(self):
        found = self.find(MODAL)
        try:
            return found[0].text if found else ""
        except Exception:
            return ""

    def settle(self):
        """Wait until the form has resolved (no spinner) after the last change."""
        _wait(lambda: not self.find(f"{MODAL}//*[@role='progressbar']"), 60)
        time.sleep(0.3)
        _wait(lambda: not self.find(f"{MODAL}//*[@role='progressbar']"), 60)

    def _input(self, label):
        return _wait(lambda: self.find(f"{MODAL}//p[normalize-space(.)={_lit(label)}]/following::input[1]"), 20)

    def type(self, label, value):
        """Replace the text of the input labelled ``label``, key by key."""
        from selenium.webdriver.common.keys import Keys

        def typed():
            el = self._input(label)
            assert el, f"no input labelled {label!r}; dialog: {self.modal_text()!r}"
            el = el[0]
            self.d.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus()", el)
            el.send_keys(Keys.CONTROL, "a")
            el.send_keys(Keys.BACKSPACE)
            el.send_keys(str(value))
            return True

        assert _wait(typed, 20)
        self.settle()
        assert _wait(lambda: self._input(label)[0].get_attribute("value") == str(value), 10), \
            f"{label!r} reads {self._input(label)[0].get_attribute('value')!r}, typed {value!r}"

    def tick(self, label, on=True):
        box = _wait(lambda: self.find(f"{MODAL}//p[normalize-space(.)={_lit(label)}]/ancestor::label[1]//input"), 20)
        assert box, f"no checkbox labelled {label!r}"
        if box[0].is_selected() != on:
            self.click(box[0])
        self.settle()

    def radio(self, value):
        button = _wait(lambda: self.find(f"{MODAL}//input[@type='radio'][@value={_lit(value)}]"), 20)
        assert button, f"no radio choice {value!r}; dialog: {self.modal_text()!r}"
        self.click(button[0])
        self.settle()

    def choose(self, label, option, scope=MODAL):
        """Pick ``option`` in the dropdown labelled ``label`` (in the operator form, or ``scope``)."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        def dropdown():
            return _wait(lambda: self.find(
                f"{scope}//p[normalize-space(.)={_lit(label)}]/following::*[@role='combobox'][1]"), 20)

        box = dropdown()
        assert box, f"no dropdown labelled {label!r}"
        opts = None
        for _ in range(4):  # a click landing while the form (or panel) re-renders opens nothing: find it, open again
            try:
                self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", box[0])
                ActionChains(self.d).move_to_element(box[0]).click().perform()
            except WebDriverException:  # the element was replaced while we clicked
                pass
            opts = _wait(lambda: [o for o in self.d.find_elements(By.CSS_SELECTOR, "[role=option]")
                                  if o.text.strip() == option], 5)
            if opts:
                break
            box = dropdown() or box
        assert opts, f"{label!r} does not offer {option!r}: " + str(
            [o.text for o in self.d.find_elements(By.CSS_SELECTOR, "[role=option]")])
        self.click(opts[0])
        if scope == MODAL:
            self.settle()
            assert _wait(lambda: self._input(label)[0].get_attribute("value") == option, 10)

    def open_balance_panel(self):
        """The Balance panel from the new-panel menu; its content's CSS selector, once its chart shows."""
        from selenium.webdriver.common.by import By

        self.click(self.d.find_element(By.CSS_SELECTOR, "[data-cy=new-panel-btn]"))
        entry = _wait(lambda: self.find("//*[normalize-space(text())='Balance']"), 30)
        assert entry, "Balance is not offered in the new-panel menu"
        self.click(entry[0])
        content = "[data-cy=panel-content-balance_panel]"
        assert _wait(lambda: self.d.find_elements(By.CSS_SELECTOR, f"{content} .js-plotly-plot .bars path"), 60), \
            "no bar chart in the panel"
        return content

    def refuses(self, message):
        """The form shows ``message`` (checked as the user types) and Execute is disabled."""
        assert _wait(lambda: message in self.modal_text(), 20), f"no {message!r} in: {self.modal_text()!r}"
        disabled = _wait(lambda: [b for b in self.find(f"{MODAL}//button[normalize-space(.)='Execute']")
                                  if not b.is_enabled()], 10)  # the form may still be re-rendering
        assert disabled, "Execute is enabled on a form that cannot run"

    def cancel(self):
        self.click(self.find(f"{MODAL}//button[normalize-space(.)='Cancel']")[0])
        assert _wait(lambda: not self.find(MODAL), 20)

    def execute(self, result_title, shot, timeout=300):
        """Press Execute; wait for the result dialog; check it reads well; screenshot it; close it. Its text.

        A run that goes on for more than a second shows its progress in FiftyOne's own dialog, which then shows
        the result (closed with Done; the "Executing..." dialog closes): either way it is read the same.
        """
        def button():
            found = self.find(f"{MODAL}//button[normalize-space(.)='Execute']")
            return found if found and found[0].is_enabled() else None

        assert _wait(button, 30), f"Execute stays disabled; dialog: {self.modal_text()!r}"
        self.settle()
        start = time.time()
        self.click(button()[0])
        title = f"//*[normalize-space(text())={_lit(result_title)}]"
        failed = f"{MODAL}//*[starts-with(normalize-space(text()), 'Error occurred during operator execution')]"
        closable = f"{MODAL}//button[normalize-space(.)='Close']"  # a result dialog (the form has Cancel)
        streamed = f"{PROGRESS}{title}"  # the progress dialog showing the result
        done = _wait(lambda: (self.find(closable) and self.find(MODAL + title)) or self.find(failed) or
                     (self.find(streamed) and not self.find(MODAL)), timeout, 0.5)
        if done and self.find(failed):
            self.click(self.find(failed)[0])  # unfold the error's details
            time.sleep(0.5)
        assert done and not self.find(failed), f"no '{result_title}' result within {timeout} s: {self.modal_text()!r}"
        self.timings[shot] = round(time.time() - start, 1)
        time.sleep(1)  # a view that loads from the network would still read "Loading..." now
        dialog = MODAL if self.find(MODAL) else PROGRESS
        if dialog == PROGRESS:
            self.progress_shown.append(shot)
        text = self.find(dialog)[0].text
        self.d.save_screenshot(os.path.join(self.shots, f"{shot}.png"))
        if self.d.execute_script(SCROLL_TO_END, self.find(dialog)[0]):  # a long result: its end too
            time.sleep(0.3)
            self.d.save_screenshot(os.path.join(self.shots, f"{shot}-end.png"))
        assert "No value provided" not in text, text
        assert "Loading..." not in text, text
        assert "Traceback" not in text, text
        assert not RAW_FLOAT.findall(text), f"unrounded numbers {RAW_FLOAT.findall(text)} in: {text}"
        close = self.find(f"{dialog}//button[normalize-space(.)={_lit('Close' if dialog == MODAL else 'Done')}]")
        assert close, text
        self.click(close[0])
        assert _wait(lambda: not self.find(dialog), 20)
        return text


@pytest.fixture(scope="module")
def browser_dataset():
    from fairbalance.datasets import colored_digits as datasets

    ds = datasets.colored_digits("fb-browser-test", num_classes=3, train_per_class=8, test_per_class=2,
                                 image_size=16, persistent=False, overwrite=True)
    yield ds
    for name in (ds.name, CREATED, MNIST):
        if fo.dataset_exists(name):
            fo.delete_dataset(name)


@pytest.fixture(scope="module")
def app(app_server, browser_dataset):
    with open_app(app_server, "last.png") as page:
        try:
            yield page
        finally:
            print(f"\nscreenshots: {page.shots}\nseconds per operator, Execute to result: {page.timings}\n"
                  f"progress shown for: {page.progress_shown}")


def _assert_offline(app):
    """Every page request went to the App's own origin (data:/blob: URLs stay in the page)."""
    outside = [u for u in app.network() if u.split(":")[0] in ("http", "https", "ws", "wss")
               and not u.startswith(app.base.replace("http", "ws", 1)) and not u.startswith(app.base)
               and not u.startswith(APP_SHELL_FONTS)]
    assert outside == [], f"requests outside the App's origin {app.base}: {outside}"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_operator_from_the_browser(app, browser_dataset, tiny_clip, model_dir, tmp_path):
    """The road a user walks, every operator's form in the App, on tiny models and datasets; issue 25's items
    are asserted where the road meets them (the user's place: test_browser_place.py; Schedule with a worker:
    test_browser_schedule.py)."""
    from selenium.webdriver.common.by import By

    blip = tiny_models.build_blip(str(model_dir / "browser-blip"))
    sd = tiny_models.build_stable_diffusion(str(model_dir / "browser-sd"))
    app.open_dataset(browser_dataset.name)

    # the operator browser lists fairbalance's operators in the order of the road, data first
    app.browse("fairbalance ")
    road = [c for c in fb.capabilities() if c.operator]  # every operator of the capability table, with its step

    def listed():
        return [int(m.group(1)) for e in app.find("//*[starts-with(normalize-space(text()), 'fairbalance ')]")
                for m in [re.match(r"fairbalance .+ · (\d) ", e.text)] if m]

    # the list fills in as the App filters (the first look saw 20 of 21 entries): wait for all of them
    steps = _wait(lambda: len(listed()) == len(road) and listed(), 20) or listed()
    assert len(steps) == len(road) and steps == sorted(steps), steps
    app.d.save_screenshot(os.path.join(app.shots, "00-operator-browser.png"))
    from selenium.webdriver.common.keys import Keys

    app.d.switch_to.active_element.send_keys(Keys.ESCAPE)
    assert _wait(lambda: not app.find("//*[@data-cy='operators-browser-search']"), 10)

    # 0 data: both dataset builders
    app.open_operator("create Colored Digits dataset", "Create Colored Digits")
    app.type("Dataset name", CREATED)
    for label, value in (("Train images per class", 8), ("Test images per class", 2), ("Classes", 3),
                         ("Image size (px)", 16)):
        app.type(label, value)
    text = app.execute("Colored Digits created", "01-create_colored_digits")
    assert fo.dataset_exists(CREATED) and len(fo.load_dataset(CREATED)) == 30
    assert "Asked for 1.0% bias-conflicting" in text  # 24 training images cannot give 1%: the user is told
    # item 10: the name is taken now: said in the form, before Execute, in the App's words
    app.open_operator("create Colored Digits dataset", "Create Colored Digits")
    app.type("Dataset name", CREATED + "-2")  # a change the form resolves on, then the taken name
    app.type("Dataset name", CREATED)
    app.refuses(f"A dataset named '{CREATED}' exists already")
    assert "overwrite=True" not in app.modal_text()
    app.cancel()

    app.open_operator("create Colored MNIST dataset", "Create Colored MNIST")
    app.type("Dataset name", MNIST)
    app.type("Validation images (unbiased)", 0)
    app.type("Test images (unbiased)", 1)
    app.execute("Colored MNIST created", "02-create_colored_mnist", timeout=600)
    assert len(fo.load_dataset(MNIST).match_tags("train")) == 4999
    fo.delete_dataset(MNIST)

    # 1 find: the one-click audit, on the first dataset
    app.open_operator("audit hidden imbalance", "Audit hidden imbalance")
    app.radio("texts")  # WordNet's search would encode its whole vocabulary with the tiny CLIP: minutes on CPU
    app.type("Related texts (comma-separated)", "red, green, yellow")
    app.type("CLIP model", tiny_clip)
    app.choose("Known attribute (optional)", "color")
    text = app.execute("Audit", "03-audit_balance")
    browser_dataset.reload()
    assert browser_dataset.count("sa_cluster") == len(browser_dataset) and "Samples per cluster" in text
    assert "max ln" not in text and "Report" not in text and "In plain words" in text  # item 15: no monospace block

    # the rest of the road on the dataset built from the browser
    app.open_dataset(CREATED)
    ds = fo.load_dataset(CREATED)

    app.open_operator("compute sensitive-attribute features", "Compute SA features")
    app.radio("texts")  # related texts alone: no attribute needed
    app.type("Related texts (comma-separated)", "red, green, yellow")
    app.type("CLIP model", tiny_clip)
    text = app.execute("SA features computed", "04-compute_sa_features")
    assert "Similarity to the query" not in text and "Query text" not in text  # the user's own texts: no query
    ds.reload()
    assert ds.count("sa_features") == 30

    app.open_operator("compute pseudo-labels", "Compute pseudo-labels")
    app.radio("kmeans")  # the tiny random CLIP's features have no clusters X-means would keep (it finds one)
    app.type("Number of clusters", 3)
    app.execute("Pseudo-labels computed", "05-compute_pseudo_labels")
    ds.reload()
    assert ds.count("sa_cluster") == 30

    # the default run key is taken now: the form says so in the App's words, before Execute
    app.open_operator("compute pseudo-labels", "Compute pseudo-labels")
    app.refuses("already exists on this dataset: tick Overwrite or choose another key")
    app.tick("Overwrite")
    assert _wait(lambda: "tick Overwrite" not in app.modal_text(), 20)
    app.cancel()

    app.open_operator("balance report", "Balance report")
    app.choose("Label field", "sa_cluster")
    app.choose("Attribute field (optional)", "color")
    text = app.execute("Balance report", "06-balance_report")
    assert "purity" in text.lower()  # the clusters x attribute table shows (no editor fetched from the web)

    # 2 tag
    app.open_operator("tag likely bias-conflicting samples", "Hardness tags")
    app.type("How many to tag (optional)", 31)
    app.refuses("Between 0 and the 30 samples of the view")
    app.type("How many to tag (optional)", 3)
    app.type("Epochs", 1)
    text = app.execute("Hardness tags computed", "07-compute_hardness_tags")
    assert len(ds.match_tags("bias_conflicting")) == 3
    assert "3 of 30 samples of the view" in text  # item 13: "N of M"
    assert "FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true" in text and "fiftyone delegated launch" in text  # item 6

    # 3 generate: the conditional diffusion model, balanced generation, adapters, captions, filtering
    app.open_operator("train conditional diffusion on clusters", "Train conditional diffusion")
    app.type("Epochs", 1)
    app.type("Batch size", 32)
    text = app.execute("Diffusion model trained", "08-train_conditional_diffusion")
    assert "Weak: " in text and "training steps, below the ~500" in text  # item 13: a 1-epoch model is flagged

    app.open_operator("generate balanced samples", "Generate balanced samples")
    app.type("Total images (equal mode)", 1)
    app.refuses("At least one image per cluster")
    app.type("Total images (equal mode)", 8)
    app.type("Sampling steps", 2)
    text = app.execute("Generated", "09-generate_balanced")
    assert len(ds.match_tags("generated")) > 0
    assert "Quality" in text and "Weak: " in text  # item 13: the model's warning, after generation too
    # item 12: provenance is an embedded document with declared subfields, which the App's sidebar lists
    # (seeing them there needs the sidebar scrolled; not asserted in Chromium yet)
    ds.reload()
    assert {"run_key", "cell", "seed"} <= set(ds.get_field("generation").get_field_schema())

    app.open_operator("fine-tune an adapter per group", "Fine-tune per group")
    app.choose("Group field", "sa_cluster")
    app.choose("Base model: a trained conditional diffusion model", "conditional_diffusion")
    for label, value in (("LoRA rank", 2), ("Steps per adapter", 2), ("Warn below this many images per group", 1)):
        app.type(label, value)
    app.execute("Adapters trained", "10-finetune_per_group")

    generated = len(ds.match_tags("generated"))
    app.open_operator("generate per group with its adapter", "Generate per group")
    app.type("Images per group", 1)
    app.type("Sampling steps", 2)
    app.execute("Generated", "11-generate_per_group")
    assert len(ds.match_tags("generated")) > generated

    generated = len(ds.match_tags("generated"))
    app.open_operator("inject bias-conflicting content", "DiffInject")  # contents: the 3 hardness-tagged samples
    app.type("DDIM steps", 4)
    text = app.execute("Injected", "11b-inject_bias_conflicting")
    assert len(ds.match_tags("generated")) > generated and "Samples added" in text

    app.open_operator("filter generated samples", "Filter generated samples")
    app.radio("pixels")
    text = app.execute("Filtered", "12-filter_generated")
    assert re.search(r"\d+ of the \d+ generated samples scored", text)  # item 13

    app.open_operator("measure realism of generated samples", "Measure realism")  # the view's own split
    assert _wait(lambda: "real images will be compared" in app.modal_text(), 30), app.modal_text()
    app.type("Folds", 2)
    text = app.execute("Realism measured", "12b-measure_realism")
    assert "Real-vs-generated accuracy" in text and "In plain words" in text

    app.open_operator("caption samples", "Caption samples")
    app.type("Captioning model", blip)
    app.type("Captions per image", 1)
    app.execute("Captions written", "13-compute_captions")
    # a random tiny BLIP writes random words: a few samples get known words, so filtering keeps some to generate from
    ds.set_values("captions", [[f"a {c} digit"] if i < 4 else [] for i, c in enumerate(ds.values("color.label"))])

    app.open_operator("filter captions", "Filter captions")
    app.type("Top-F words (overrides the label field)", 1)
    app.execute("Captions filtered", "14-filter_captions")

    generated = len(ds.match_tags("generated"))
    app.open_operator("generate images from captions", "Generate from captions")
    app.type("Diffusion pipeline", sd)
    app.type("Sampling steps", 1)
    app.tick("Keep the pipeline's safety checker", False)
    app.execute("Generated", "15-generate_from_captions")
    assert len(ds.match_tags("generated")) > generated

    # 4 train, 5 verify
    app.open_operator("train a classifier", "Train classifier")
    app.type("Epochs", 1)
    app.execute("Classifier trained", "16-train_classifier")

    app.open_operator("apply a classifier", "Apply classifier")
    app.choose("Attribute for worst-group accuracy (optional)", "color")
    text = app.execute("Predictions written", "17-apply_classifier")
    assert "Worst group" in text and "Accuracy per group" in text and "|None" not in text
    assert "Samples" in text and "%" in text and "ground_truth " in text  # item 15: words, counts, percents

    # 6 all steps: a pipeline file
    from fairbalance.core import folders

    os.makedirs(folders.default_folder("pipelines"), exist_ok=True)  # the operator reads pipeline files there only
    pipeline = Path(folders.default_folder("pipelines")) / "report.yml"
    pipeline.write_text(f"dataset: {CREATED}\nsteps:\n  - balance-report: {{label_field: color, run_key: piped}}\n")
    app.open_operator("run a pipeline file", "Run pipeline")
    app.type("Pipeline file", str(pipeline))
    assert _wait(lambda: "1 step on dataset" in app.modal_text(), 30), app.modal_text()
    app.execute("Pipeline", "18-run_pipeline")
    ds.reload()
    assert ds.has_run("piped")

    # the Balance panel after the road: real vs real + generated, the heat map, the last evaluation's worst groups
    from selenium.webdriver.common.by import By

    content = app.open_balance_panel()
    app.choose("Attribute (optional)", "color", scope="//*[@data-cy='panel-content-balance_panel']")
    assert _wait(lambda: len(app.d.find_elements(By.CSS_SELECTOR, f"{content} .js-plotly-plot")) == 3, 30), \
        "no heat maps (real, real + generated) for the attribute"
    panel = app.d.find_element(By.CSS_SELECTOR, content).text
    for shown in ("real + generated", "real only", "Worst groups of the last evaluation", "share of the group"):
        assert shown in panel, f"{shown!r} is not in the panel: {panel}"
    assert "None" not in panel  # generated samples have no colour: their groups say "(no value)"
    app.d.save_screenshot(os.path.join(app.shots, "19-balance-panel-after-the-road.png"))
    app.d.execute_script(SCROLL_TO_END, app.d.find_element(By.CSS_SELECTOR, content))
    app.d.save_screenshot(os.path.join(app.shots, "19-balance-panel-after-the-road-end.png"))
    _assert_offline(app)


def test_balance_panel_clear_restores_the_view(app, browser_dataset):
    """Open the Balance panel, click a bar (the grid shows that class), 'Clear selection' (the whole view again)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    d = app.d
    app.open_dataset(browser_dataset.name)
    everything = app.sample_count()
    assert everything == f"{len(browser_dataset)} samples"
    content = app.open_balance_panel()
    # the class field: after the walkthrough's audit the panel defaults to its pseudo-labels, which on the tiny
    # random CLIP's features are one cluster (a click on its only bar would filter nothing)
    app.choose("Label field", "ground_truth", scope="//*[@data-cy='panel-content-balance_panel']")
    assert _wait(lambda: len(d.find_elements(By.CSS_SELECTOR, f"{content} .js-plotly-plot .bars path")) > 1, 30)
    bars = d.find_elements(By.CSS_SELECTOR, f"{content} .js-plotly-plot .bars path")
    panel = d.find_element(By.CSS_SELECTOR, content).text
    assert "normalized" in panel and "Clear selection" not in panel
    d.save_screenshot(os.path.join(app.shots, "20-balance-panel.png"))

    ActionChains(d).move_to_element(bars[0]).click().perform()  # a real click: Plotly listens to the mouse
    clear = _wait(lambda: d.find_elements(By.XPATH, "//button[normalize-space(.)='Clear selection']"), 60)
    assert clear, "a bar click offers no 'Clear selection'"
    assert _wait(lambda: app.sample_count() != everything, 30), "the grid was not filtered"
    assert "-0.000" not in d.find_element(By.CSS_SELECTOR, content).text
    d.save_screenshot(os.path.join(app.shots, "21-balance-panel-bar-clicked.png"))

    app.click(clear[0])
    assert _wait(lambda: app.sample_count() == everything, 30), f"the view was not restored: {app.sample_count()}"
    assert _wait(lambda: not d.find_elements(By.XPATH, "//button[normalize-space(.)='Clear selection']"), 30)
    assert not d.find_elements(By.XPATH, "//*[normalize-space(text())='Match']")  # no filter stage left
    d.save_screenshot(os.path.join(app.shots, "22-balance-panel-cleared.png"))
    _assert_offline(app)
