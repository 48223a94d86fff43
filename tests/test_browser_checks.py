"""Issue 25's form checks, provenance, sharded runs and the heat map, seen in Chromium (items 3, 4, 7, 9-12, 14, 16).

Every form says before Execute what the library would refuse, in one line
and without a traceback; provenance subfields are listed in the App's
sidebar. The dataset's runs are made with the SDK (the road test,
tests/test_browser.py, makes them from the App). Drives a real headless
Chromium like tests/test_browser.py (skipped the same way when Chromium is
missing); screenshots to $FAIRBALANCE_SCREENSHOTS.
"""

import os
import re
import time

import fiftyone as fo
import pytest

from test_browser import MODAL, _wait, open_app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a real browser against a real App

NAME = "fb-browser-checks"


@pytest.fixture(scope="module")
def checks_dataset(tiny_clip, tmp_path_factory):
    """SA features written by another run (the default field taken), a diffusion model trained on ``color``,
    3 generated samples with provenance."""
    import fairbalance as fb
    from fairbalance.datasets import colored_digits as datasets

    ds = datasets.colored_digits(NAME, num_classes=3, train_per_class=8, test_per_class=2, image_size=16,
                                 persistent=False, overwrite=True)
    train = ds.match_tags("train")
    fb.compute_sa_features(train, related_texts_override=["red", "green", "yellow"], model=tiny_clip,
                           pretrained=None, run_key="audit_sa_features")
    out = tmp_path_factory.mktemp("checks")
    model = fb.train_conditional_diffusion(train, "color", output_dir=str(out / "diff"), epochs=1, image_size=16,
                                           block_out_channels=(16, 32), batch_size=32, run_key="diff")
    fb.generate_balanced(train, "color", model=model, total=3, num_inference_steps=1, run_key="gen")
    # two evaluations, the newest alphabetically first (item 7: the panel took the alphabetically last)
    labels = ds.values("ground_truth.label")
    ds.set_values("pred", [fo.Classification(label=v) for v in labels])
    fb.evaluate_classifier(ds, "pred", "ground_truth", attribute_field="color", run_key="pred_vanilla_eval")
    ds.set_values("pred", [fo.Classification(label=labels[0]) for _ in labels])
    fb.evaluate_classifier(ds, "pred", "ground_truth", attribute_field="color", run_key="pred_jtt_eval")
    yield ds
    if fo.dataset_exists(NAME):
        fo.delete_dataset(NAME)


@pytest.fixture(scope="module")
def app(app_server):
    with open_app(app_server, "checks-last.png") as page:
        yield page


def test_forms_say_before_execute_what_the_library_would_refuse(app, checks_dataset, tiny_clip):
    app.open_dataset(NAME)

    # item 4: the default CLIP weights are not on this machine (offline): said in one line, at once
    start = time.time()
    app.open_operator("compute sensitive-attribute features", "Compute SA features")
    app.radio("texts")
    app.type("Related texts (comma-separated)", "red, green")
    app.refuses("is not available on this machine")
    assert time.time() - start < 25 and "Traceback" not in app.modal_text()
    app.d.save_screenshot(os.path.join(app.shots, "checks-01-clip-offline.png"))
    # item 3: the default field holds another run's output (the audit's): the form offers a free name instead
    app.type("CLIP model", tiny_clip)
    features = app._input("Features field")[0].get_attribute("value")
    assert features == "sa_features_2", features
    assert _wait(lambda: [b for b in app.find(f"{MODAL}//button[normalize-space(.)='Execute']") if b.is_enabled()],
                 20), app.modal_text()
    app.type("Features field", "sa_features")
    app.refuses("Field 'sa_features' holds the output of run 'audit_sa_features'")
    assert "delete a run" in app.modal_text()
    app.cancel()

    # item 3: the run can be deleted from the App, with what it removes listed before confirming
    app.open_operator("delete a run", "Delete a run")
    app.choose("Run", "audit_sa_features")
    assert _wait(lambda: "Deleting run audit_sa_features" in app.modal_text() and
                 "the field sa_features of every sample" in app.modal_text(), 20), app.modal_text()
    app.choose("Run", "gen")
    assert _wait(lambda: "the 3 generated samples it added" in app.modal_text(), 20), app.modal_text()
    app.d.save_screenshot(os.path.join(app.shots, "checks-02-delete-run-plan.png"))
    app.cancel()

    # item 9: the generate form defaults to the model's own field and offers no cells for a one-factor model
    app.open_operator("generate balanced samples", "Generate balanced samples")
    assert app._input("Cluster field")[0].get_attribute("value") == "color"
    assert "Fill every class x attribute cell" not in app.modal_text()
    app.choose("Cluster field", "ground_truth")
    app.refuses("The model 'diff' was trained on 'color', not 'ground_truth'")
    app.cancel()

    # item 10: a missing embeddings field, before Execute, without listing every field
    app.open_operator("filter generated samples", "Filter generated samples")
    app.radio("clip")
    app.type("Embeddings field", "no_such_field")
    app.refuses("No field 'no_such_field' on this dataset")
    assert "Traceback" not in app.modal_text() and "bias_aligned" not in app.modal_text()
    app.d.save_screenshot(os.path.join(app.shots, "checks-03-missing-embeddings.png"))
    app.cancel()


def test_provenance_fields_in_the_sidebar(app, checks_dataset):
    """Item 12: the ``generation`` document's subfields (run, cell, seed, model...) are listed in the sidebar, in a
    GENERATION group that starts folded; unfolded, each has a filter of its own."""
    app.open_dataset(NAME)
    from selenium.webdriver.common.action_chains import ActionChains

    entry = "//*[@data-cy='sidebar-group-entry-GENERATION']"
    assert _wait(lambda: app.find(entry), 30), ("no GENERATION group in the sidebar", [
        e.get_attribute("data-cy") for e in app.find("//*[contains(@data-cy, 'group')]")])
    # the group starts folded ("+"): unfold it as a user does
    plus = app.find(f"{entry}//*[@data-cy='sidebar-group-GENERATION']//*[@data-testid='AddIcon']/..")
    assert plus, app.find(entry)[0].get_attribute("outerHTML")[:2000]
    app.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", plus[0])
    ActionChains(app.d).move_to_element(plus[0]).click().perform()
    container = "//*[starts-with(@data-cy, 'sidebar-field-container-generation.')]"
    assert _wait(lambda: [e for e in app.find(container) if e.is_displayed()], 20), "the group did not unfold"
    seen = {e.get_attribute("data-cy")[len("sidebar-field-container-"):] for e in app.find(container)}
    names = {s.split(".")[-1] for s in seen}
    assert {"run_key", "seed"} <= names, sorted(seen)
    # on screen, with a value filter of its own (the arrow opens it)
    field = app.find("//*[@data-cy='sidebar-field-container-generation.run_key']")
    assert field, sorted(seen)
    app.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", field[0])
    time.sleep(0.5)
    field = app.find("//*[@data-cy='sidebar-field-container-generation.run_key']")
    assert field[0].is_displayed() and "run_key" in field[0].text, field[0].text
    assert app.find("//*[@data-cy='sidebar-field-arrow-enabled-generation.run_key']")
    app.d.save_screenshot(os.path.join(app.shots, "checks-04-provenance-sidebar.png"))
    print(f"provenance subfields in the sidebar: {sorted(s for s in seen if s.startswith('generation.'))}")


def test_sharded_run_queued_and_the_panel_heat_map_click(app, checks_dataset, tiny_clip):
    """Item 11: a sharded run says it is queued and how to start a worker, and the panel's table of sharded runs
    renders; item 7: the panel's last evaluation is the newest; item 16: a heat-map cell click filters the grid to that cell (item 14: the panel says how)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    app.open_dataset(NAME)
    everything = app.sample_count()
    app.open_operator("compute sensitive-attribute features", "Compute SA features")
    app.radio("texts")
    app.type("Related texts (comma-separated)", "red, green")
    app.type("CLIP model", tiny_clip)
    app.type("Shards", 2)
    app.type("Run key", "sharded_sa")
    text = app.execute("Queued for delegated workers (nothing computed yet)", "checks-05-sharded-queued")
    assert "fiftyone delegated launch" in text and "SA features computed" not in text
    assert "fairbalance.sharded_status" not in text

    d = app.d
    content = app.open_balance_panel()
    scope = "//*[@data-cy='panel-content-balance_panel']"
    assert _wait(lambda: "Sharded runs in progress" in d.find_element(By.CSS_SELECTOR, content).text, 30), \
        d.find_element(By.CSS_SELECTOR, content).text
    assert "sharded_sa" in d.find_element(By.CSS_SELECTOR, content).text
    app.choose("Label field", "ground_truth", scope=scope)
    app.choose("Attribute (optional)", "color", scope=scope)
    assert _wait(lambda: len(d.find_elements(By.CSS_SELECTOR, f"{content} .js-plotly-plot")) >= 2, 30)
    panel = d.find_element(By.CSS_SELECTOR, content).text  # item 7: the newest evaluation, not the alphabetical last
    assert "Worst groups of the last evaluation (pred_jtt_eval" in panel and "pred_vanilla_eval" not in panel, panel
    d.save_screenshot(os.path.join(app.shots, "checks-06-panel-sharded-and-heat-maps.png"))
    def drawn_for_the_choice():  # the panel first draws the default fields' maps; hovering those read another cell
        plots = d.find_elements(By.CSS_SELECTOR, f"{content} .js-plotly-plot")
        return len(plots) >= 2 and "ground_truth" in plots[1].text and "color" in plots[1].text and plots[1]

    heat = _wait(drawn_for_the_choice, 30)
    assert heat, [p.text for p in d.find_elements(By.CSS_SELECTOR, f"{content} .js-plotly-plot")]
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", heat)
    drag = heat.find_elements(By.CSS_SELECTOR, ".nsewdrag")
    assert drag, "no heat map to click"
    ActionChains(d).move_to_element(drag[0]).perform()  # item 16: the tooltip gives the cell's count and share
    tip = _wait(lambda: re.search(r"ground_truth \S+, color \S+: \d+ samples? \(\d+% of the group\)",
                                  " ".join(e.text for e in heat.find_elements(By.CSS_SELECTOR, ".hoverlayer"))), 20)
    assert tip, [e.text for e in heat.find_elements(By.CSS_SELECTOR, ".hoverlayer")]
    ActionChains(d).move_to_element(drag[0]).click().perform()  # the middle cell: a real click, Plotly listens
    clear = _wait(lambda: d.find_elements(By.XPATH, "//button[normalize-space(.)='Clear selection']"), 60)
    assert clear, "a cell click offers no 'Clear selection'"
    assert _wait(lambda: app.sample_count() != everything, 30), "the grid was not filtered to the cell"
    panel = d.find_element(By.CSS_SELECTOR, content).text
    assert " x " in panel and "(your click)" in panel and "Showing only" not in panel, panel
    d.save_screenshot(os.path.join(app.shots, "checks-07-heat-map-cell-clicked.png"))
    app.click(clear[0])
    assert _wait(lambda: app.sample_count() == everything, 30), app.sample_count()
