"""The Dagster UI, for real: `dagster dev` on a free loopback port with a temporary DAGSTER_HOME, the asset graph
in headless Chromium, and a materialisation of the tiny world launched through the UI's GraphQL endpoint.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them); skips with the reason otherwise."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = REPO / "reports" / "ui"

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="Debian's chromium and chromium-driver are not installed "
                                       "(apt-get install chromium chromium-driver; .ci/run does)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    home = tmp_path_factory.mktemp("dagster_home")
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "MISP_DATA_ROOT": str(home / "data"),
           "MISP_WORLD_PRESET": "tiny", "MISP_SHARDS": "2", "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    log = open(home / "dagster_dev.log", "w")
    # Its own process group: `dagster dev` and the code server / daemon it starts are stopped together.
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/server_info", 240)
        yield f"http://127.0.0.1:{port}", home
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1600,1000"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _dismiss_dialog(browser) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    skip = (By.XPATH, "//button[.//text()[normalize-space()='Skip']]")
    try:
        WebDriverWait(browser, 15).until(ec.element_to_be_clickable(skip)).click()
        WebDriverWait(browser, 15).until(ec.invisibility_of_element_located(skip))
    except TimeoutException:
        pass  # no dialog this time


def test_asset_graph_shows_the_assets_and_a_run_launched_through_graphql_succeeds(ui):
    from dagster import DagsterRunStatus
    from dagster_graphql import DagsterGraphQLClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, home = ui
    port = int(url.rsplit(":", 1)[1])
    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    run_id = client.submit_job_execution("__ASSET_JOB", asset_selection=["source_data"])
    deadline = time.time() + 300
    status = client.get_run_status(run_id)
    while status not in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
        assert time.time() < deadline, f"run {run_id} still {status} after 300 s"
        time.sleep(2)
        status = client.get_run_status(run_id)
    assert status == DagsterRunStatus.SUCCESS, (home / "dagster_dev.log").read_text()[-3000:]
    assert (home / "data" / "world" / "tiny-seed0" / "preferences.parquet").exists()

    browser = _browser()
    try:
        # The catalog lists every asset of the code location.
        browser.get(f"{url}/assets")
        WebDriverWait(browser, 120).until(lambda b: "preference_shards" in b.page_source)
        for name in ("source_data", "clip_model", "pool_images", "pool_embeddings", "sae", "preference_shards",
                     "shards_manifest"):
            assert name in browser.page_source, name
        browser.get(f"{url}/runs/{run_id}")
        WebDriverWait(browser, 120).until(lambda b: "source_data" in b.page_source and "Success" in b.page_source)
        # The lineage of the mining group: the graph a user looks at first.
        browser.get(f"{url}/locations/misp_dpo/asset-groups/mining")
        WebDriverWait(browser, 120).until(lambda b: "shards_manifest" in b.page_source)
        _dismiss_dialog(browser)  # the first-visit newsletter dialog would cover the graph
        time.sleep(3)  # let the graph finish laying out before the picture
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "asset_graph.png"))
    finally:
        browser.quit()
    assert (ARTIFACTS / "asset_graph.png").stat().st_size > 10_000
