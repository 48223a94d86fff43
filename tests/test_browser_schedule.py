"""Scheduling from the App (issue 25 item 6): the Schedule button, a real `fiftyone delegated launch` worker.

Open-source FiftyOne offers Schedule when the App server runs with
``FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true`` (fiftyone/core/config.py; the App
then shows "Schedule" instead of "NOT AVAILABLE"). The operation waits QUEUED
until a worker started with ``fiftyone delegated launch`` runs it. Drives a
real headless Chromium like tests/test_browser.py (skipped the same way when
Chromium is missing); screenshots to $FAIRBALANCE_SCREENSHOTS.
"""

import os
import subprocess
import sys
import time

import fiftyone as fo
import pytest

import fairbalance
from test_app_server import serve_app
from test_browser import _wait, open_app

NAME = "fb-browser-schedule"
FIFTYONE_CLI = os.path.join(os.path.dirname(sys.executable), "fiftyone")


@pytest.fixture(scope="module")
def legacy_app_server(tmp_path_factory):
    yield from serve_app(tmp_path_factory, FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS="true")


@pytest.fixture(scope="module")
def schedule_dataset():
    from fairbalance.datasets import colored_digits as datasets

    ds = datasets.colored_digits(NAME, num_classes=3, train_per_class=6, test_per_class=2, image_size=16,
                                 persistent=False, overwrite=True)
    yield ds
    if fo.dataset_exists(NAME):
        fo.delete_dataset(NAME)


def _operations(name):
    from fiftyone.operators.delegated import DelegatedOperationService

    return DelegatedOperationService().list_operations(dataset_name=name)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_schedule_button_queues_and_a_worker_runs_it(legacy_app_server, schedule_dataset, tmp_path):
    ds = schedule_dataset
    with open_app(legacy_app_server, "schedule-last.png") as app:
        worker = None
        try:
            app.open_dataset(NAME)
            app.open_operator("train a classifier", "Train classifier")  # delegated by default: Schedule leads
            app.type("Epochs", 1)
            app.type("Run key", "scheduled_clf")
            schedule = _wait(lambda: [b for b in app.find("//*[@data-cy='operators-prompt-modal']//button")
                                      if b.text.strip() == "Schedule" and b.is_enabled()], 30)
            assert schedule, f"no enabled Schedule button; dialog: {app.modal_text()!r}"
            assert "NOT AVAILABLE" not in app.modal_text()
            app.d.save_screenshot(os.path.join(app.shots, "schedule-01-form.png"))
            app.click(schedule[0])
            queued = _wait(lambda: _operations(NAME), 60)
            assert queued and len(queued) == 1, "Schedule queued no delegated operation"
            op = queued[0]
            assert op.operator.endswith("/train_classifier") and op.run_state == "queued", (op.operator, op.run_state)
            time.sleep(1)
            app.d.save_screenshot(os.path.join(app.shots, "schedule-02-scheduled.png"))
            assert not ds.has_run("scheduled_clf")  # nothing ran in the App

            # a real worker, as the README says: same database, plugins folder and library
            env = dict(os.environ)
            lib = os.path.dirname(os.path.dirname(fairbalance.__file__))
            env["PYTHONPATH"] = os.pathsep.join([lib] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
            log = tmp_path / "worker.log"
            worker = subprocess.Popen([FIFTYONE_CLI, "delegated", "launch"], env=env, stdout=open(log, "w"),
                                      stderr=subprocess.STDOUT)
            done = _wait(lambda: [o for o in _operations(NAME) if o.run_state in ("completed", "failed")], 300, 1)
            assert done, f"the worker did not finish the operation; its log:\n{log.read_text()[-3000:]}"
            assert done[0].run_state == "completed", (done[0].run_state, done[0].run_result, log.read_text()[-3000:])
            ds.reload()
            assert ds.has_run("scheduled_clf")
        finally:
            if worker is not None and worker.poll() is None:
                worker.terminate()
                try:
                    worker.wait(30)
                except subprocess.TimeoutExpired:
                    worker.kill()
