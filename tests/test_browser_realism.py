"""The realism operator in Chromium: its form's choices and refusal before Execute, then its result dialog.

A small Colored Digits dataset with hazy copies of training digits marked
generated (real files; the answer is known: separable, too bright) and its
test split cut into a reference and a held-out split. Drives a real headless
Chromium like tests/test_browser.py (skipped the same way when Chromium is
missing); screenshots to $FAIRBALANCE_SCREENSHOTS.
"""

import os

import fiftyone as fo
import pytest

from test_browser import open_app
from test_realism_operator import add_hazy_copies

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a real browser against a real App

NAME = "fb-browser-realism"


@pytest.fixture(scope="module")
def realism_dataset(tmp_path_factory):
    from fairbalance.datasets import colored_digits as datasets

    tmp = tmp_path_factory.mktemp("browser_realism")
    ds = datasets.colored_digits(NAME, num_classes=3, train_per_class=12, test_per_class=8, image_size=16,
                                 persistent=False, overwrite=True, output_dir=str(tmp / "digits"))
    add_hazy_copies(ds, list(zip(*ds.match_tags("train").limit(20).values(
        ["filepath", "ground_truth.label", "color.label"]))), tmp)
    yield ds
    if fo.dataset_exists(NAME):
        fo.delete_dataset(NAME)


@pytest.fixture(scope="module")
def app(app_server):
    with open_app(app_server, "realism-last.png") as page:
        yield page


def test_realism_form_refuses_then_measures(app, realism_dataset):
    ds = realism_dataset
    app.open_dataset(ds.name)
    app.open_operator("measure realism of generated samples", "Measure realism")
    # the sets are the dataset's own tags; a real side that is the generated set is refused before Execute
    app.choose("Real samples", "generated")
    app.refuses("The real and generated views share images")
    app.d.save_screenshot(os.path.join(app.shots, "realism-01-refused.png"))
    app.choose("Real samples", "train")
    app.choose("Attribute field (optional)", "color")
    app.choose("Test split for TSTR (optional)", "heldout")
    app.choose("Reference (optional)", "reference")
    app.tick("Match the reference to the generated cells")
    app.type("Folds", 2)
    assert "20 generated and 36 real images will be compared" in app.modal_text(), app.modal_text()
    text = app.execute("Realism measured", "realism-02-result")
    ds.reload()
    assert ds.has_run("realism")
    for shown in ("Real-vs-generated accuracy", "The same against the reference", "Reference cells compared",
                  "Trained on generated, tested on real (TSTR)", "Brightness, generated / real", "as bright",
                  "In plain words"):
        assert shown in text, f"{shown!r} is not in the result: {text}"
