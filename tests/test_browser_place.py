"""The App keeps the user's place (issue 25): a sidebar filter survives the Balance panel and every writer.

Drives a real headless Chromium like tests/test_browser.py (skipped the same way when Chromium is missing);
screenshots to $FAIRBALANCE_SCREENSHOTS.
"""

import os
import time

import fiftyone as fo
import pytest

from test_browser import _wait, open_app  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a real browser against a real App

PLACE = "fb-browser-place"


@pytest.fixture(scope="module")
def place_dataset():
    from fairbalance.datasets import colored_digits as datasets

    ds = datasets.colored_digits(PLACE, num_classes=3, train_per_class=8, test_per_class=2, image_size=16,
                                 persistent=False, overwrite=True)
    yield ds
    if fo.dataset_exists(PLACE):
        fo.delete_dataset(PLACE)


@pytest.fixture(scope="module")
def app(app_server):
    with open_app(app_server, "place-last.png") as page:
        yield page


def _filter_tag(app, tag):
    """Filter the grid by a sample tag in the sidebar, as a user does: open "sample tags", type, Enter."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = app.d
    search = "//*[@data-cy='selector-sidebar-search-tags']/descendant-or-self::input"
    if not d.find_elements(By.XPATH, search):
        arrow = d.find_element(By.CSS_SELECTOR, "[data-cy='sidebar-field-arrow-enabled-tags']")
        ActionChains(d).move_to_element(arrow).click().perform()
    box = _wait(lambda: d.find_elements(By.XPATH, search), 20)
    assert box, "the sample tags filter did not open"
    box[0].click()
    box[0].send_keys(tag)
    assert _wait(lambda: app.find("//*[@data-cy='selector-results-container-sidebar-search-tags']"
                                  f"//*[normalize-space(text())='{tag}']"), 20), f"no tag {tag!r} offered"
    box[0].send_keys(Keys.ENTER)
    assert _wait(lambda: d.find_elements(By.CSS_SELECTOR, f"[data-cy='checkbox-{tag}']"), 20)


def _still_filtered(app, expected, seconds=4.0):
    """The grid shows ``expected`` throughout ``seconds`` (a revert came about 1 s after the change)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert app.sample_count() == expected, f"the filter was dropped: {app.sample_count()}, not {expected}"
        time.sleep(0.25)


def _train_count(app, ds):
    ds.reload()
    return f"{len(ds.match_tags('train'))} samples"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sidebar_filter_kept_with_the_panel_open_and_after_writers(app, place_dataset, tmp_path):
    from selenium.webdriver.common.by import By

    ds = place_dataset
    train = f"{len(ds.match_tags('train'))} samples"
    app.open_dataset(PLACE)
    content = app.open_balance_panel()
    _filter_tag(app, "train")
    assert _wait(lambda: app.sample_count() == train, 30), app.sample_count()
    _still_filtered(app, train)
    # the panel shows the filtered view's numbers
    assert _wait(lambda: f"| {len(ds.match_tags('train'))} |" in d_text(app, content) or
                 f"{len(ds.match_tags('train'))}" in d_text(app, content), 20)
    app.d.save_screenshot(os.path.join(app.shots, "place-01-filter-with-panel.png"))

    # a writer: its result shows, the App refreshes, the filter stays and the new field is in the sidebar
    app.open_operator("tag likely bias-conflicting samples", "Hardness tags")
    app.type("How many to tag (optional)", 3)
    app.type("Epochs", 1)
    app.execute("Hardness tags computed", "place-02-hardness")
    _still_filtered(app, train)
    ds.reload()
    assert ds.count("bias_loss") == len(ds.match_tags("train"))  # it ran on the filtered view
    app.d.save_screenshot(os.path.join(app.shots, "place-03-after-hardness.png"))

    # the models of the next writers, trained with the SDK (the road test trains them from the App)
    import fairbalance as fb

    fb.train_classifier(ds.match_tags("train"), "ground_truth", backbone="mlp", image_size=16, epochs=1,
                        run_key="clf", output_dir=str(tmp_path / "clf"))
    fb.train_conditional_diffusion(ds.match_tags("train"), "ground_truth", output_dir=str(tmp_path / "diff"),
                                   epochs=1, run_key="diff", image_size=16, block_out_channels=(16, 32),
                                   batch_size=32)

    app.open_operator("apply a classifier", "Apply classifier")
    app.execute("Predictions written", "place-04-apply_classifier")
    _still_filtered(app, _train_count(app, ds))
    assert ds.count("predictions") == len(ds.match_tags("train"))

    app.open_operator("generate balanced samples", "Generate balanced samples")
    app.choose("Cluster field", "ground_truth")
    app.type("Total images (equal mode)", 3)
    app.type("Sampling steps", 1)
    app.execute("Generated", "place-05-generate_balanced")
    assert len(ds.match_tags("generated")) == 3
    _still_filtered(app, _train_count(app, ds))

    # the filter was kept, so the train view has no generated samples: the form says so before Execute
    app.open_operator("filter generated samples", "Filter generated samples")
    app.radio("pixels")
    app.refuses("The view has no generated samples")
    assert "Traceback" not in app.modal_text()
    app.d.save_screenshot(os.path.join(app.shots, "place-06-filter_generated-refused.png"))
    app.cancel()
    _still_filtered(app, _train_count(app, ds))
    assert app.d.find_elements(By.CSS_SELECTOR, "[data-cy='checkbox-train']")  # the filter is still set
    app.d.save_screenshot(os.path.join(app.shots, "place-07-after-the-writers.png"))


def d_text(app, css):
    from selenium.webdriver.common.by import By

    found = app.d.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""
