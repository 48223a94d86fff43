"""The App's home page: a dataset created there shows without a reload (#25 item 5).

In a module of its own, so its App server has no dataset open yet: the App reopens the server session's
dataset on its home address, so after another test had opened one, the home page never showed.
"""

import os
import time

import fiftyone as fo
import pytest

from test_app_server import serve_app
from test_browser import _wait  # noqa: F401
from test_browser_place import app  # noqa: F401  (fixture: a browser on this module's App server)

HOME_MADE = "fb-browser-home-made"


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """A server of this module's own, not the session's (tests/conftest.py): it has opened no dataset yet."""
    yield from serve_app(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_dataset_created_from_the_home_page_shows_without_a_reload(app):
    """Created from the home page, the dataset stayed invisible ("No datasets yet") until a reload (#25 item 5)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    if fo.dataset_exists(HOME_MADE):
        fo.delete_dataset(HOME_MADE)
    try:
        app.d.get(app.base)
        assert _wait(lambda: app.d.find_elements(By.TAG_NAME, "body") and "FiftyOne" in app.d.title, 60)
        time.sleep(2)
        for el in app.d.find_elements(By.CSS_SELECTOR, "[data-cy=btn-disable-cookies]"):
            app.click(el)
        for el in app.find("//button[normalize-space(.)='Dismiss']"):  # the Enterprise promotion popover
            app.click(el)
        browse = _wait(lambda: app.find("//*[normalize-space(text())='browse operations']"), 90)  # slow when loaded
        assert browse, "the home page offers no 'browse operations'"
        app.click(browse[0])  # the home page's own link to the operator browser
        search = _wait(lambda: app.d.find_elements(By.CSS_SELECTOR, "[data-cy=operators-browser-search]"), 20)
        assert search, "the operator browser did not open on the home page"
        search[0].send_keys("fairbalance create Colored Digits")
        assert _wait(lambda: app.find("//*[starts-with(normalize-space(text()), "
                                      "'fairbalance create Colored Digits')]"), 20)
        search[0].send_keys(Keys.ENTER)
        assert _wait(lambda: app.find("//*[@data-cy='operators-prompt-modal']"
                                      "//*[normalize-space(text())='Create Colored Digits']"), 60)
        app.settle()
        app.type("Dataset name", HOME_MADE)
        for label, value in (("Train images per class", 4), ("Test images per class", 1), ("Classes", 3),
                             ("Image size (px)", 16)):
            app.type(label, value)
        execute = _wait(lambda: [b for b in app.find("//*[@data-cy='operators-prompt-modal']//button")
                                 if b.text.strip() == "Execute" and b.is_enabled()], 30)
        assert execute, app.modal_text()
        app.click(execute[0])
        # no reload: the new dataset is opened and on screen, its samples counted; what was made is notified
        assert _wait(lambda: f"/datasets/{HOME_MADE}" in app.d.current_url, 120), app.d.current_url
        assert _wait(lambda: f"Colored Digits '{HOME_MADE}' created: 12 train and 3 test samples" in
                     app.d.find_element(By.TAG_NAME, "body").text, 30), "no notification of what was made"
        app.d.save_screenshot(os.path.join(app.shots, "place-08-created-from-home.png"))
        time.sleep(2)
        assert not app.find("//*[@data-cy='operators-prompt-modal']"), f"a dialog stays: {app.modal_text()!r}"
        assert _wait(lambda: app.d.find_elements(By.CSS_SELECTOR, "[data-cy=entry-counts]") and
                     app.sample_count() == "15 samples", 60), "the new dataset's samples are not shown"
        app.d.save_screenshot(os.path.join(app.shots, "place-09-new-dataset-shown.png"))
    finally:
        if fo.dataset_exists(HOME_MADE):
            fo.delete_dataset(HOME_MADE)
