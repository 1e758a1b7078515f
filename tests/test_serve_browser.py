"""The demo page in headless Chromium against the real server (uvicorn on a loopback port): pick an image,
type a sentence, submit, and see the boxes drawn on the canvas and listed.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them); skipped when either binary
is absent.
"""

import shutil

import numpy as np
import pytest
from PIL import Image

from mdetr.inference.predictor import Predictor
from mdetr.serve import ServeLimits, ThreadedServer, create_app

CAPTION = "a red circle and a blue square"
TOLERANCE = 6  # per channel, for the box colour read back from the canvas


def _binaries():
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    return browser, driver


@pytest.fixture(scope="module")
def driver():
    browser, chromedriver = _binaries()
    if browser is None or chromedriver is None:
        pytest.skip("no chromium and chromedriver binaries found (Debian: apt-get install chromium "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,1000", "--disable-extensions"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    chrome.set_page_load_timeout(60)
    yield chrome
    chrome.quit()


def _hex_to_rgb(colour):
    return tuple(int(colour[i: i + 2], 16) for i in (1, 3, 5))


def _count_colour(pixels, rgb):
    """How many (H, W, 3) pixels are within TOLERANCE of ``rgb`` on every channel."""
    return int((np.abs(pixels[..., :3].astype(int) - np.array(rgb)) <= TOLERANCE).all(-1).sum())


_CANVAS_PIXELS = """
const canvas = document.getElementById("canvas");
const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
return [canvas.width, canvas.height, Number(canvas.dataset.scale), Array.from(data)];
"""


def test_page_uploads_types_and_draws_boxes(driver, tiny_checkpoint, shapes_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    predictor = Predictor.from_checkpoint(tiny_checkpoint)
    path = sorted((shapes_dir / "images" / "val").glob("*.png"))[0]
    image = Image.open(path).convert("RGB")
    expected = predictor.predict(image, CAPTION, threshold=0.0)
    with ThreadedServer(create_app(predictor, ServeLimits(threshold=0.5))) as server:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("model mdetr_lite"))
        driver.find_element(By.ID, "image").send_keys(str(path))
        driver.find_element(By.ID, "text").send_keys(CAPTION)
        threshold = driver.find_element(By.ID, "threshold")
        threshold.clear()
        threshold.send_keys("0")
        driver.find_element(By.ID, "submit").click()
        state = lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")  # noqa: E731
        wait.until(lambda d: state(d) in ("done", "error"))
        assert state(driver) == "done", driver.find_element(By.ID, "error").text
        items = driver.find_elements(By.CSS_SELECTOR, "#detections li")
        width, height, scale, data = driver.execute_script(_CANVAS_PIXELS)
    assert len(items) == len(expected.scores) > 0
    for item, phrase, score in zip(items, expected.phrases, expected.scores.tolist(), strict=True):
        # The API rounds scores to 4 places; a box on special tokens only has an empty phrase.
        assert f"{phrase or '(no words)'} · {round(score, 4):.3f}" in item.text
    assert scale > 1 and (width, height) == (round(image.width * scale), round(image.height * scale))
    canvas = np.array(data, dtype=np.uint8).reshape(height, width, 4)
    photo = np.asarray(image.resize((width, height), Image.NEAREST))  # the picture under the boxes
    for colour in {item.get_attribute("data-colour") for item in items}:
        rgb = _hex_to_rgb(colour)
        # The box colour is on the canvas far more often than in the picture underneath.
        assert _count_colour(canvas, rgb) >= _count_colour(photo, rgb) + 50, colour
