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
# the page at one instant: the notification's text shown, the new dataset's address, its page up (sample counts)
SNAPSHOT = ("return [document.body.innerText.includes(arguments[0]), location.pathname.endsWith(arguments[1]), "
            "!!document.querySelector('[data-cy=entry-counts]')]")


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """A server of this module's own, not the session's (tests/conftest.py): it has opened no dataset yet."""
    yield from serve_app(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_dataset_created_from_the_home_page_shows_without_a_reload(app):
    """Created from the home page, the dataset stayed invisible ("No datasets yet") until a reload (#25 item 5)."""
    from selenium.common.exceptions import WebDriverException
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
        # no reload: the new dataset is opened and on screen; what was made is notified there. Watched from the click
        # in one loop (one snapshot of the page a step): a notification sent with the open showed for under a second
        # on the page being left and was gone once the dataset showed, and a wait for the address first missed it
        said = f"Colored Digits '{HOME_MADE}' created: 12 train and 3 test samples"
        seen, deadline = [], time.time() + 150
        while time.time() < deadline and not any(s[0] and s[1] and s[2] for s in seen):
            try:
                seen.append(app.d.execute_script(SNAPSHOT, said, f"/datasets/{HOME_MADE}"))
            except WebDriverException:  # the page is being replaced
                pass
            time.sleep(0.1)
        assert any(s[1] for s in seen), f"the new dataset was not opened: {app.d.current_url}"
        assert any(s[0] and s[1] and s[2] for s in seen), \
            ("no notification of what was made once the dataset showed" + (
                ": one showed only before it" if any(s[0] for s in seen) else ""))
        app.d.save_screenshot(os.path.join(app.shots, "place-08-created-from-home.png"))
        time.sleep(2)
        assert not app.find("//*[@data-cy='operators-prompt-modal']"), f"a dialog stays: {app.modal_text()!r}"
        assert _wait(lambda: app.d.find_elements(By.CSS_SELECTOR, "[data-cy=entry-counts]") and
                     app.sample_count() == "15 samples", 60), "the new dataset's samples are not shown"
        app.d.save_screenshot(os.path.join(app.shots, "place-09-new-dataset-shown.png"))
    finally:
        if fo.dataset_exists(HOME_MADE):
            fo.delete_dataset(HOME_MADE)
