"""The web pages in a real browser: headless Chromium (Debian's) driven by Playwright.

The session's gunicorn, MariaDB, Redis, git server and two worker nodes (shell
executor) run the builds; the browser opens the pages and watches them change:
a pushed build appearing in the list, a log growing line by line, Cancel and
Approve taking effect. With ``OPSCD_SCREENSHOTS=1`` the first test also saves
screenshots of every page to ``docs/screenshots/`` (else to a temporary folder).
"""

from __future__ import annotations

import os
import re
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from conftest import ROOT, GitRepo, change, gitlab_payload, post_gitlab, wait_for_task, wait_until

playwright_api = pytest.importorskip("playwright.sync_api")
Browser, Page, expect = playwright_api.Browser, playwright_api.Page, playwright_api.expect

pytestmark = pytest.mark.usefixtures("workers")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
VIEWPORT = {"width": 1280, "height": 800}
SCREENSHOTS = ROOT / "docs" / "screenshots"

#: A build that prints one numbered line a second for a few seconds.
SLOW_LINES = "build:\n  script:\n    - for i in 1 2 3 4 5 6; do echo line $i; sleep 1; done\n"


# --- the browser ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless, with a fresh profile (Playwright makes a temporary one)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: apt-get install -y chromium")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


class Pages:
    """Browser contexts for one test; every page's script errors fail the test."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.contexts: list = []
        self.errors: list[str] = []

    def open(self, url: str, **context_options) -> Page:
        context = self.browser.new_context(viewport=VIEWPORT, **context_options)
        self.contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.on("pageerror", lambda error: self.errors.append(f"{page.url}: {error}"))
        page.on(
            "console",
            lambda message: (
                message.type == "error"
                and self.errors.append(f"{page.url}: console: {message.text}")
            ),
        )
        page.on("dialog", lambda dialog: dialog.accept())  # "Cancel this build?" → yes
        page.goto(url)
        return page

    def close(self) -> None:
        for context in self.contexts:
            context.close()  # also closes the pages' log streams on the server


@pytest.fixture
def pages(browser: Browser) -> Iterator[Pages]:
    opened = Pages(browser)
    yield opened
    opened.close()
    assert opened.errors == [], "errors in the pages' scripts"


# --- builds ---------------------------------------------------------------------------------


def new_repo(git_server, name: str) -> GitRepo:
    created = GitRepo.create(git_server.root, name)
    created.clone_url = git_server.repo_url(created.project_path)
    return created


def push(
    web: str,
    repo: GitRepo,
    files: dict[str, str],
    branch: str = "main",
    message: str | None = None,
    executable: frozenset[str] = frozenset(),
) -> int:
    """Commit ``files`` on ``branch``, send GitLab's push webhook; return the task id."""
    message = message or f"build {uuid.uuid4().hex[:6]}"
    sha = repo.commit(files, message=message, branch=branch, executable=executable)
    payload = gitlab_payload("push-event.json", repo, f"refs/heads/{branch}", sha)
    payload["commits"][-1]["message"] = message
    response = post_gitlab(web, payload)
    assert response.status_code == 202, response.text
    return response.json()["task_id"]


def api_task(web: str, task_id: int) -> dict:
    return requests.get(f"{web}/api/tasks/{task_id}", timeout=5).json()


def wait_state(web: str, task_id: int, state: str, timeout: float = 60) -> dict:
    return wait_until(
        lambda: (task := api_task(web, task_id))["state"] == state and task,
        timeout,
        f"task {task_id} to be {state}",
        interval=0.2,
    )


def cancel(web: str, task_id: int) -> None:
    change("post", f"{web}/api/tasks/{task_id}/cancel", timeout=5)


def log_lines(page: Page) -> list[str]:
    return page.locator("#log .line").all_inner_texts()


# --- screenshots ----------------------------------------------------------------------------

ANSI_BUILD = r"""set -e
printf '\033[1m==> Installing dependencies\033[0m\n'
printf 'resolved \033[32m148\033[0m packages in 1.2s\n'
printf '\033[1m==> Running tests\033[0m\n'
for name in cart checkout invoices payments refunds shipping taxes users; do
  printf '\033[32m  PASS\033[0m  tests/test_%s.py \033[90m(%s tests)\033[0m\n' "$name" "${#name}"
  sleep 0.4
done
printf '\033[33mwarning:\033[0m deprecated setting \033[1mLEGACY_TAX\033[0m in settings.py\n'
printf '\033[32m\033[1m8 passed\033[0m in 3.41s\n'
"""

FAILING_BUILD = r"""printf '\033[1m==> Running tests\033[0m\n'
printf '\033[32m  PASS\033[0m  tests/test_cart.py\n'
printf '\033[31m  FAIL\033[0m  tests/test_checkout.py::test_saved_card\n'
printf '    AssertionError: expected 2 charges, got \033[1m3\033[0m\n'
printf '\033[31m\033[1m1 failed\033[0m, 1 passed in 0.82s\n'
exit 1
"""

RUNNING_BUILD = r"""printf '\033[1m==> Building payments-api\033[0m\n'
printf 'go: downloading \033[36mgithub.com/shopspring/decimal\033[0m v1.4.0\n'
i=1
while [ $i -le 300 ]; do
  printf '\033[32mok\033[0m   payments/ledger/case_%03d \033[90m0.%02ds\033[0m\n' $i $((i * 7 % 97))
  [ $((i % 7)) -eq 0 ] &&
    printf '\033[33m--- SLOW\033[0m case_%03d took \033[1m1.%ds\033[0m\n' $i $((i % 9))
  i=$((i + 1)); sleep 0.1
done
sleep 120
"""

APPROVAL_CI = "build:\n  script: sh build.sh\npublish:\n  approval: true\n"
DOCKERFILE = "FROM scratch\nCOPY build.sh /\n"


def screenshots(tmp_path: Path) -> Callable[[Page, str], None]:
    """Save a page as ``<name>.png``: in docs/screenshots/ with OPSCD_SCREENSHOTS=1."""
    folder = SCREENSHOTS if os.environ.get("OPSCD_SCREENSHOTS") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return lambda page, name: page.screenshot(
        path=str(folder / f"{name}.png"), animations="disabled"
    )


def test_every_page_with_builds_of_every_kind(web, git_server, pages, tmp_path):
    """Builds in every state from three projects; each page renders them (and is saved)."""
    shop = new_repo(git_server, f"acme/web-shop-{uuid.uuid4().hex[:4]}")
    payments = new_repo(git_server, f"acme/payments-api-{uuid.uuid4().hex[:4]}")
    tools = new_repo(git_server, f"platform/ops-tools-{uuid.uuid4().hex[:4]}")
    script_ci = "build:\n  script: sh build.sh\n"
    approval = {"ci.yaml": APPROVAL_CI, "build.sh": "echo built\n", "Dockerfile": DOCKERFILE}
    ok = push(web, shop, {"ci.yaml": script_ci, "build.sh": ANSI_BUILD},
              message="Add checkout flow with saved cards")  # fmt: skip
    bad = push(web, shop, {"ci.yaml": script_ci, "build.sh": FAILING_BUILD},
               branch="feature/saved-cards", message="Charge saved cards once")  # fmt: skip
    stop = push(web, tools, {"ci.yaml": "build:\n  script: sleep 60\n"},
                message="Rotate staging certificates")  # fmt: skip
    waiting = push(web, payments, approval, branch="release/2.4", message="Release 2.4.0")
    wait_state(web, stop, "running")
    cancel(web, stop)
    for task_id in (ok, bad):
        wait_for_task(web, task_id)
    wait_state(web, waiting, "waiting")
    running = push(web, payments, {"ci.yaml": script_ci, "build.sh": RUNNING_BUILD},
                   message="Round ledger entries to the cent")  # fmt: skip
    wait_state(web, running, "running")
    try:
        save = screenshots(tmp_path)
        page = pages.open(web + "/")
        expect(page.locator(f'tr[data-task-id="{running}"] .state')).to_have_text("running")
        for task_id, state in [(ok, "success"), (bad, "failed"), (stop, "canceled")]:
            expect(page.locator(f'tr[data-task-id="{task_id}"] .state')).to_have_text(state)
        expect(page.locator(f'tr[data-task-id="{waiting}"] .state')).to_have_text("waiting")
        save(page, "builds")

        page.goto(f"{web}/tasks/{running}")
        expect(page.locator("#log .line").nth(40)).to_be_attached(timeout=20_000)
        expect(page.locator('[data-stage="build"] [data-stage-field="state"]')).to_have_text(
            "running"
        )
        save(page, "build-running")

        page.goto(f"{web}/tasks/{waiting}")
        expect(page.locator('[data-field="approval-request"]')).to_be_visible()
        expect(page.locator('[data-stage="publish"]')).to_contain_text("awaiting approval")
        save(page, "build-waiting")

        page.goto(f"{web}/tasks/{bad}")
        expect(page.locator("#log-status")).to_have_text("ended: failed")
        expect(page.locator('[data-field="error"]')).to_be_visible()
        save(page, "build-failed")

        page.goto(f"{web}/agents")
        expect(page.locator("tr[data-agent]")).not_to_have_count(0)
        save(page, "agents")

        page.goto(f"{web}/projects")
        expect(page.locator(f'[data-project="{shop.project_path}"] tr')).to_have_count(3)
        badges = page.locator("img.badge")
        wait_until(
            lambda: all(badges.evaluate_all("imgs => imgs.map(i => i.complete && i.naturalWidth)")),
            10,
            "the badges to load",
        )
        page.locator(f'[data-project="{payments.project_path}"] summary').first.click()
        save(page, "projects")
    finally:
        cancel(web, running)
        change("post", f"{web}/api/tasks/{waiting}/reject", timeout=5)


# --- the builds page ------------------------------------------------------------------------


def test_pushed_build_appears_without_reloading(web, repo, pages):
    page = pages.open(f"{web}/?project={repo.project_path}")
    expect(page.locator("#builds tbody")).to_contain_text("No builds match these filters")
    page.evaluate("window.notReloaded = true")
    task_id = push(web, repo, {"ci.yaml": "build:\n  script: sleep 2\n"}, message="Say <b>hi</b>")
    row = page.locator(f'tr[data-task-id="{task_id}"]')
    expect(row).to_be_visible(timeout=10_000)
    expect(row.locator(".state")).to_have_text("success", timeout=30_000)
    assert page.evaluate("window.notReloaded") is True
    cells = row.locator("td").all_inner_texts()
    assert cells[0] == f"#{task_id}"
    assert cells[1] == repo.project_path
    assert cells[2] == "main"
    assert cells[3].split()[0] == api_task(web, task_id)["commit_sha"][:8]
    assert "Say <b>hi</b>" in cells[3]  # the message is text, not markup
    assert cells[7].startswith("node")  # the agent
    assert cells[8].endswith("s")
    row.locator("td.project").click()  # the whole row opens the build
    expect(page).to_have_url(f"{web}/tasks/{task_id}")


def test_filters_and_pages(web, git_server, pages):
    repo = new_repo(git_server, f"filters/app-{uuid.uuid4().hex[:6]}")
    good = push(web, repo, {"ci.yaml": "build:\n  script: 'true'\n"})
    bad = push(web, repo, {"ci.yaml": "build:\n  script: exit 3\n"}, branch="feature/x")
    third = push(web, repo, {"ci.yaml": "build:\n  script: 'true'\n"}, branch="feature/x")
    for task_id in (good, bad, third):
        wait_for_task(web, task_id)

    page = pages.open(f"{web}/?project={repo.project_path}")
    ids = page.locator("tr[data-task-id]")
    expect(ids).to_have_count(3)
    page.select_option("select[name=state]", "failed")
    page.click(".filters button[type=submit]")
    expect(page).to_have_url(f"{web}/?project={repo.project_path.replace('/', '%2F')}"
                             "&branch=&state=failed")  # fmt: skip
    expect(ids).to_have_count(1)
    expect(ids.first).to_have_attribute("data-task-id", str(bad))

    page.goto(f"{web}/")
    page.fill("input[name=project]", repo.project_path)
    page.fill("input[name=branch]", "feature/x")
    page.click(".filters button[type=submit]")
    expect(ids).to_have_count(2)
    assert ids.evaluate_all("rows => rows.map(r => r.dataset.taskId)") == [str(third), str(bad)]

    page.goto(f"{web}/?project={repo.project_path}&limit=1")
    expect(ids).to_have_count(1)
    expect(ids.first).to_have_attribute("data-task-id", str(third))
    page.click("text=Older →")
    expect(ids.first).to_have_attribute("data-task-id", str(bad))
    page.click("text=Older →")
    expect(ids.first).to_have_attribute("data-task-id", str(good))
    expect(page.locator("text=Older →")).to_have_count(0)
    page.click("text=← Newest")
    expect(ids.first).to_have_attribute("data-task-id", str(third))

    page.goto(f"{web}/?state=bogus")
    expect(page.locator(".notice")).to_contain_text("unknown state 'bogus'")


# --- the build page -------------------------------------------------------------------------


def test_live_log_grows_while_the_build_runs(web, repo, pages):
    task_id = push(web, repo, {"ci.yaml": SLOW_LINES})
    page = pages.open(f"{web}/tasks/{task_id}")
    expect(page.locator("#log")).to_contain_text("line 1", timeout=30_000)
    seen = []  # (numbered lines shown, the page's state) as time goes by
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = [line for line in log_lines(page) if line.startswith("line ")]
        state = page.locator("#task").get_attribute("data-state")
        seen.append((len(lines), state))
        if state == "success":
            break
        time.sleep(0.3)
    growing = [count for count, state in seen if state == "running"]
    assert len(set(growing)) >= 3, seen  # the log gained lines while the build ran
    assert growing[0] < 6, seen
    expect(page.locator('[data-field="state"]')).to_have_text("success")
    expect(page.locator("#log-status")).to_have_text("ended: success")
    assert [line for line in log_lines(page) if line.startswith("line ")] == [
        f"line {i}" for i in range(1, 7)
    ]
    stages = page.locator(".timeline [data-stage-field=state]").all_inner_texts()
    assert stages == ["success", "success", "skipped"]
    expect(page.locator('[data-action="retry"]')).to_be_visible()
    expect(page.locator('[data-action="cancel"]')).to_be_hidden()


def test_log_colours_are_spans_and_markup_is_text(web, repo, pages):
    script = (
        r"printf '\033[31mred\033[0m plain \033[1;32mbold green\033[0m \033[94mbright\033[0m\n'"
        "\n"
        r"printf '\033[33mcarried\nover\033[0m\n'"
        "\n"
        "echo '<script>window.pwned = 1</script><b>not bold</b> & <i>'\n"
    )
    task_id = push(web, repo, {"ci.yaml": "build:\n  script: sh build.sh\n", "build.sh": script})
    wait_for_task(web, task_id)
    page = pages.open(f"{web}/tasks/{task_id}")
    log = page.locator("#log")
    expect(page.locator("#log-status")).to_have_text("ended: success")
    expect(log.locator("span.ansi-31")).to_have_text("red")
    expect(log.locator("span.ansi-32.ansi-bold")).to_have_text("bold green")
    expect(log.locator("span.ansi-94")).to_have_text("bright")
    assert log.locator("span.ansi-33").all_inner_texts() == ["carried", "over"]  # across lines
    expect(log).to_contain_text("<script>window.pwned = 1</script><b>not bold</b> & <i>")
    assert log.locator("script, b, i").count() == 0
    assert page.evaluate("window.pwned") is None
    assert "\x1b" not in log.inner_text()


def test_long_log_keeps_the_last_lines(web, repo, pages):
    task_id = push(web, repo, {"ci.yaml": "build:\n  script: seq 1 12000\n"})
    wait_for_task(web, task_id)
    page = pages.open(f"{web}/tasks/{task_id}")
    expect(page.locator("#log-status")).to_have_text("ended: success", timeout=30_000)
    lines = page.locator("#log .line")
    expect(lines.last).to_contain_text("Publish skipped")
    count = lines.count()
    assert 4900 < count <= 5000, count  # the last 5000 lines of ~12030
    numbers = [line for line in lines.all_inner_texts() if line.isdigit()]
    assert numbers[-3:] == ["11998", "11999", "12000"]
    assert int(numbers[0]) > 7000
    expect(page.locator("#log-truncated")).to_be_visible()
    full = page.locator("#log-truncated a")
    assert full.get_attribute("href") == f"/api/tasks/{task_id}/log"


def test_cancel_stops_a_running_build_and_retry_opens_the_new_one(web, repo, pages):
    ci = "build:\n  script:\n    - echo started\n    - sleep 300\n"
    task_id = push(web, repo, {"ci.yaml": ci})
    page = pages.open(f"{web}/tasks/{task_id}")
    expect(page.locator("#log")).to_contain_text("started", timeout=30_000)
    expect(page.locator('[data-action="retry"]')).to_be_hidden()
    page.click('[data-action="cancel"]')
    expect(page.locator('[data-field="state"]')).to_have_text("canceled")
    expect(page.locator('[data-stage="build"] [data-stage-field="state"]')).to_have_text(
        "canceled", timeout=10_000
    )
    expect(page.locator('[data-stage="publish"] [data-stage-field="state"]')).to_have_text(
        "not run"
    )
    expect(page.locator("#log-status")).to_have_text("ended: canceled")
    assert api_task(web, task_id)["state"] == "canceled"

    page.click('[data-action="retry"]')
    page.wait_for_url(lambda url: not url.endswith(f"/tasks/{task_id}"))
    new_id = int(page.url.rsplit("/", 1)[1])
    try:
        assert api_task(web, new_id)["retry_of"] == task_id
        expect(page.locator("#task")).to_contain_text(f"#{task_id}")  # "Retry of"
        expect(page.locator("#log")).to_contain_text("started", timeout=30_000)
    finally:
        cancel(web, new_id)


def test_approve_resumes_a_waiting_build_and_reject_ends_one(web, repo, pages):
    files = {"ci.yaml": APPROVAL_CI, "build.sh": "echo built it\n", "Dockerfile": DOCKERFILE}
    approved = push(web, repo, files)
    rejected = push(web, repo, {**files, "build.sh": "echo built again\n"})
    for task_id in (approved, rejected):
        wait_state(web, task_id, "waiting")

    page = pages.open(f"{web}/tasks/{approved}")
    expect(page.locator('[data-field="state"]')).to_have_text("waiting")
    expect(page.locator('[data-field="approval-request"]')).to_be_visible()
    expect(page.locator('[data-stage="publish"] [data-stage-field="state"]')).to_have_text(
        "awaiting approval"
    )
    expect(page.locator("#log")).to_contain_text("built it")
    page.click('[data-action="approve"]')
    expect(page.locator('[data-field="approval-request"]')).to_be_hidden()
    # Publishing resumes on the node that built: this stack has no container engine, so
    # the publish stage runs and fails; what matters is that it ran.
    expect(page.locator('[data-field="state"]')).to_have_text("failed", timeout=60_000)
    expect(page.locator('[data-stage="publish"] [data-stage-field="state"]')).to_have_text("failed")
    expect(page.locator('[data-field="approval"]')).to_contain_text("approved by")
    task = api_task(web, approved)
    assert task["approval"]["decision"] == "approved"
    assert task["stages"][2]["state"] == "failed"

    page.goto(f"{web}/tasks/{rejected}")
    page.click('[data-action="reject"]')
    expect(page.locator('[data-field="state"]')).to_have_text("canceled")
    expect(page.locator('[data-field="approval"]')).to_contain_text("rejected by")
    expect(page.locator('[data-field="error"]')).to_contain_text("rejected")
    assert api_task(web, rejected)["approval"]["decision"] == "rejected"


def test_unknown_build_is_a_page_not_json(web, pages):
    response = requests.get(f"{web}/tasks/999999999", timeout=5)
    assert response.status_code == 404
    assert response.headers["Content-Type"].startswith("text/html")
    assert "There is no build #999999999" in response.text


# --- agents and projects --------------------------------------------------------------------


def test_agents_page_lists_both_nodes_online(web, pages):
    page = pages.open(f"{web}/agents")
    for name in ("node1", "node2"):
        row = page.locator(f'tr[data-agent^="{name}@"]')
        expect(row.locator(".state")).to_have_text("online")
        expect(row.locator(".capacity")).to_contain_text("/3")
        expect(row).to_contain_text("opscd ")
    heartbeat = page.locator('tr[data-agent^="node1@"] td').nth(5)
    before = heartbeat.get_attribute("title")
    page.evaluate("window.notReloaded = true")
    expect(heartbeat).not_to_have_attribute("title", before, timeout=10_000)  # refreshed
    assert page.evaluate("window.notReloaded") is True


def test_projects_page_and_badges(web, repo, pages):
    task_id = push(web, repo, {"ci.yaml": "build:\n  script: 'true'\n"})
    wait_for_task(web, task_id)
    failed = push(web, repo, {"ci.yaml": "build:\n  script: exit 1\n"}, branch="topic")
    wait_for_task(web, failed)

    page = pages.open(f"{web}/projects")
    section = page.locator(f'section[data-project="{repo.project_path}"]')
    expect(section.locator("tr[data-branch]")).to_have_count(2)
    expect(section.locator('tr[data-branch="main"] .state')).to_have_text("success")
    expect(section.locator('tr[data-branch="topic"] .state')).to_have_text("failed")
    badge = section.locator('tr[data-branch="main"] img.badge')
    wait_until(lambda: badge.evaluate("i => i.complete && i.naturalWidth > 0"), 10, "badge")
    section.locator('tr[data-branch="main"] summary').click()
    snippet = section.locator('tr[data-branch="main"] .snippet input').input_value()
    assert snippet.startswith(f"[![build]({web}/badge.svg?project=")

    def svg(**params: str) -> tuple[requests.Response, ET.Element]:
        response = requests.get(f"{web}/badge.svg", params=params, timeout=5)
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("image/svg+xml")
        assert response.headers["Cache-Control"] == "no-cache"
        return response, ET.fromstring(response.text)  # noqa: S314 (ours; well-formed?)

    response, root = svg(project=repo.project_path, branch="main")
    assert root.find("{http://www.w3.org/2000/svg}title").text == "build: success"
    assert 'fill="#4c1"' in response.text
    response, root = svg(project=repo.project_path, branch="topic")
    assert root.find("{http://www.w3.org/2000/svg}title").text == "build: failed"
    assert 'fill="#e05d44"' in response.text
    response, root = svg(project=repo.project_path)  # no branch: the project's last build
    assert "build: failed" in response.text
    response, root = svg(project='<x>"&', branch="<script>")
    assert root.find("{http://www.w3.org/2000/svg}title").text == "build: unknown"
    assert 'fill="#9f9f9f"' in response.text


def test_projects_page_registers_a_project_and_shows_its_secret_once(web, pages):
    project = f"web-{uuid.uuid4().hex[:6]}/app"
    page = pages.open(f"{web}/projects")
    form = page.locator("#register-project")
    form.locator("input[name=project]").fill(project)
    form.locator("input[name=clone_url]").fill(f"https://git.example.com/{project}.git")
    form.locator("input[name=protected]").fill("main,release/*")
    form.locator("button").click()
    shown = page.locator("#registered")
    expect(shown).to_be_visible()
    expect(shown.locator("[data-field=project]")).to_have_text(project)
    secret = shown.locator("[data-field=webhook_secret]").input_value()
    assert len(secret) >= 40
    assert shown.locator("[data-field=webhook_url]").input_value() == f"{web}/webhooks/gitlab"
    row = page.locator(f'tr[data-registered="{project}"]')
    expect(row).to_contain_text("main, release/*")
    answer = requests.get(f"{web}/api/projects/{project}", timeout=5).json()
    assert answer["protected"] == ["main", "release/*"]
    page.reload()  # the secret was in that one answer: gone now
    expect(page.locator(f'tr[data-registered="{project}"]')).to_be_visible()
    assert secret not in page.content()
    form = page.locator("#register-project")  # a bad one is refused, saying why
    form.locator("input[name=project]").fill(project)
    form.locator("input[name=clone_url]").fill("https://git.example.com/other.git")
    form.locator("button").click()
    expect(page.locator("#toast")).to_contain_text("registered already")
    expect(page.locator("#registered")).to_be_hidden()
    expected = [e for e in pages.errors if "status of 409 (CONFLICT)" in e]  # that refusal
    assert len(expected) == 1, pages.errors
    page.reload()  # a GitHub project: its webhook URL is GitHub's endpoint
    form = page.locator("#register-project")
    form.locator("select[name=forge]").select_option("github")
    form.locator("input[name=project]").fill(f"{project}-gh")
    form.locator("input[name=clone_url]").fill(f"https://github.com/{project}-gh.git")
    form.locator("button").click()
    expect(page.locator("#registered")).to_be_visible()
    assert shown.locator("[data-field=webhook_url]").input_value() == f"{web}/webhooks/github"
    expect(page.locator(f'tr[data-registered="{project}-gh"] [data-field=forge]')).to_have_text(
        "github"
    )
    pages.errors.remove(expected[0])


# --- login ----------------------------------------------------------------------------------


def test_pages_need_the_login_when_a_password_is_set(start_web, repo, pages):
    password = "ui-pass-" + uuid.uuid4().hex[:8]
    base = start_web(CICD_UI_PASSWORD=password)
    task_id = push(base, repo, {"ci.yaml": SLOW_LINES})
    for path in ("/", "/agents", "/projects", f"/tasks/{task_id}"):
        response = requests.get(base + path, timeout=5)
        assert response.status_code == 401, path
        assert response.headers["WWW-Authenticate"].startswith("Basic")
        assert requests.get(base + path, auth=("admin", password), timeout=5).status_code == 200

    credentials = {"username": "admin", "password": password}
    page = pages.open(f"{base}/?project={repo.project_path}", http_credentials=credentials)
    expect(page.locator(f'tr[data-task-id="{task_id}"]')).to_be_visible()
    page.goto(f"{base}/tasks/{task_id}")
    expect(page.locator("#log")).to_contain_text("line 2", timeout=30_000)  # the stream too
    expect(page.locator('[data-field="state"]')).to_have_text("success", timeout=30_000)


STEPS_CI = """\
steps:
  - name: compile
    commands: [echo compiling, sleep 1, echo compiled]
  - name: lint
    depends_on: [compile]
    commands: [echo no lint problems]
  - name: test
    depends_on: [compile]
    commands: ['echo "test_checkout: expected 2 charges, got 3"', exit 1]
  - name: package
    depends_on: [lint, test]
    commands: [echo packaging]
  - name: notify
    depends_on: [package]
    commands: [echo tell the team]
    when:
      status: failure
"""


def test_the_build_page_shows_each_step_its_log_and_retries_from_the_failed_one(
    web, git_server, pages, tmp_path
):
    repo = new_repo(git_server, f"acme/checkout-{uuid.uuid4().hex[:4]}")
    task_id = push(web, repo, {"ci.yaml": STEPS_CI}, message="Charge saved cards once")
    wait_state(web, task_id, "failed")
    page = pages.open(f"{web}/tasks/{task_id}")
    steps = page.locator('[data-field="steps"] li')
    expect(steps).to_have_count(5)
    expect(page.locator('[data-step="compile"]')).to_have_class(re.compile("step-success"))
    expect(page.locator('[data-step="test"] [data-step-field="state"]')).to_have_text("failed (1)")
    expect(page.locator('[data-step="package"]')).to_have_class(re.compile("step-skipped"))
    expect(page.locator('[data-step="package"] [data-step-field="reason"]')).not_to_be_empty()
    expect(page.locator('[data-step="notify"]')).to_have_class(re.compile("step-success"))
    page.locator('[data-step="test"] summary').click()  # its own section of the log
    section = page.locator('[data-step="test"] .step-log')
    expect(section).to_contain_text("expected 2 charges, got 3")
    expect(section).not_to_contain_text("compiling")
    screenshots(tmp_path)(page, "build-steps")
    page.click('[data-action="retry-failed"]')
    page.wait_for_url(re.compile(rf"/tasks/(?!{task_id}$)\d+$"))
    expect(page.locator('[data-step="compile"] [data-step-field="reason"]')).to_contain_text(
        "reused"
    )
