"""Issue 25 item 17: an immediate run shows its steps and time left in the App, not only "Executing...".

FiftyOne shows ``ctx.set_progress`` only for scheduled runs; the heavy
operators are generator operators that stream it (``streams_progress``), which
the App draws as a progress bar with its label in the operator's dialog.
Drives a real headless Chromium like tests/test_browser.py (skipped the same
way when Chromium is missing); screenshots to $FAIRBALANCE_SCREENSHOTS.
"""

import os
import re
import time

import fiftyone as fo
import pytest

from test_browser import MODAL, _wait, open_app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a real browser against a real App

NAME = "fb-browser-progress"
PROGRESS = "//*[@data-cy='operators-prompt-view-modal']"  # FiftyOne's dialog for set_progress and show_output
# counts from 1,000 on read with a thousands separator ("Training: 1,050 of 1,200"): a pattern of digits alone read
# no label at all from a 1500-epoch run, which looked as if the typed epoch count had not been taken
STEPS = re.compile(r"Training: (\d[\d,]*) of (\d[\d,]*) \(\d+%\)(, about \d+ (s|min) left)?")
EPOCHS = 1200  # typed into the form; the recorded run must say the same


@pytest.fixture(scope="module")
def progress_dataset():
    from fairbalance.datasets import colored_digits as datasets

    ds = datasets.colored_digits(NAME, num_classes=3, train_per_class=80, test_per_class=2, image_size=16,
                                 persistent=False, overwrite=True)
    yield ds
    if fo.dataset_exists(NAME):
        fo.delete_dataset(NAME)


def test_immediate_run_shows_steps_and_time_left(app_server, progress_dataset):
    from fairbalance.core import runs

    with open_app(app_server, "progress-last.png") as app:
        app.open_dataset(NAME)
        app.open_operator("train a classifier", "Train classifier")
        # with 240 images, ~10 s: several labels (120 images x 600 epochs took ~3 s and once showed one); past 1,000
        app.type("Epochs", EPOCHS)
        execute = _wait(lambda: [b for b in app.find(f"{MODAL}//button[normalize-space(.)='Execute']")
                                 if b.is_enabled()], 30)
        assert execute, app.modal_text()
        app.click(execute[0])
        seen, shot = [], None
        deadline = time.time() + 600
        while time.time() < deadline:
            text = "\n".join(e.text for e in app.find(PROGRESS))
            if "Epoch kept" in text or (seen and not app.find(MODAL)):  # the result (or the dialog without it)
                break
            assert "Error" not in text + app.modal_text(), text + app.modal_text()
            m = STEPS.search(text)
            if m and (not seen or seen[-1] != m.group(0)):
                seen.append(m.group(0))
                if shot is None and 0 < _count(m.group(1)) < _count(m.group(2)):
                    shot = os.path.join(app.shots, "23-progress-immediate-run.png")
                    app.d.save_screenshot(shot)
            time.sleep(0.2)
        app.d.save_screenshot(os.path.join(app.shots, "24-progress-immediate-run-result.png"))
        print(f"progress labels seen: {seen}; the dialog: {text!r}")
        # the step count, then more of it, with the time left once a rate is known, before the result
        assert len(seen) >= 2 and shot, f"progress labels seen while it ran: {seen}"
        done = [_count(STEPS.search(s).group(1)) for s in seen]
        assert done == sorted(done) and done[0] < _count(STEPS.search(seen[0]).group(2)) == EPOCHS, seen
        assert any("left" in s for s in seen), seen
        # then that dialog shows the result (the "Executing..." one has closed), no traceback, and closes with Done
        assert _wait(lambda: not app.find(MODAL), 30), app.modal_text()
        result = app.find(PROGRESS)[0].text
        assert "Classifier trained" in result and "Epoch kept" in result and "Traceback" not in result, result
        app.click(app.find(f"{PROGRESS}//button[normalize-space(.)='Done']")[0])
        assert _wait(lambda: not app.find(PROGRESS), 20)
        progress_dataset.reload()
        assert progress_dataset.has_run("classifier")
        assert runs.get_run_config(progress_dataset, "classifier")["train_config"]["epochs"] == EPOCHS  # as typed


def _count(text):
    return int(text.replace(",", ""))

