"""Stage 1, clone: fetch the exact pushed commit over HTTP into a fresh workspace.

The clone URL and the credentials are the project's registration's (the
registered URL was recorded with the build; its own git user, else the
instance's ``CICD_GIT_*``). Credentials go to git as an
``http.<origin>.extraHeader`` through the environment (``GIT_CONFIG_*``), never
in the URL, the arguments, the log or an error, and only to the clone URL's own
origin; redirects are not followed.
Only http(s) transports are allowed (``GIT_ALLOW_PROTOCOL``): git's ``ext::``
transport would run a command.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from celery.exceptions import Ignore
from sqlalchemy import delete

from cicd import db, lifecycle, projects
from cicd.broker import STAGE_TASKS, app, language_queue, node_queue
from cicd.ciyaml import Pipeline, StepSpec, load_pipeline
from cicd.config import basic_authorization, load_settings
from cicd.errors import PipelineError, StageError
from cicd.languages import LANGUAGES
from cicd.models import Stage, TaskDetail, TaskStage
from workers import mirrors
from workers.logs import LogWriter
from workers.stages import StageTask, write_changed_files
from workers.workspace import checkout_dir, create_workspace, remove_workspace

__all__ = ["clone", "fetch_commit"]

#: How git reports an HTTP redirect it did not follow (``http.followRedirects=false``).
REDIRECTED = re.compile(r"returned error: 30[12378]\b")
#: Bytes of one git command's output kept for the log (its start; and a quarter as much of
#: its end): the rest is counted, not held.
MAX_GIT_OUTPUT = 256 * 1024
#: How far back a branch that moved on since the push is searched for the pushed commit.
MAX_HISTORY = 10_000


@app.task(name=STAGE_TASKS["clone"], base=StageTask, bind=True, stage=Stage.CLONE)
def clone(self: StageTask, ctx: dict[str, Any]) -> dict[str, Any]:
    """Check out the task's commit; the rest of the chain then runs on this node."""
    task_id = int(ctx["task_id"])
    with db.session() as session:
        task = session.get(TaskDetail, task_id)
        if task is None:
            raise StageError("clone", f"task {task_id} is not in the database")
        url, sha, ref = task.clone_url, task.commit_sha, task.fetch_ref
        before = task.before_sha if task.merge_request_iid is None else None
        registration = projects.governing(session, task.project)
        if registration is None:
            raise StageError("clone", f"project {task.project} is not registered any more",
                             f"register it again: cicd projects add {task.project}")  # fmt: skip
        settings = load_settings()
        own = projects.git_credentials(registration, settings.secrets_key)
        authorization = basic_authorization(*own) if own else settings.git_authorization()

    workspace = create_workspace(task_id)
    received = ctx
    ctx = {
        **ctx,
        "workspace": str(workspace),
        "checkout": str(checkout_dir(workspace)),
    }
    with self.log_writer(ctx) as log:
        if own:
            log.mask = log.mask.with_secrets([own[1], authorization.removeprefix("Basic ")])
        log.line(f"Cloning {url} at {sha[:12]} ({ref}) on {self.request.hostname}")
        fetch_commit(Path(ctx["checkout"]), url, ref, sha, log, authorization)
        log.line(f"Checked out {sha}")
        pipeline = _pipeline(Path(ctx["checkout"]))
        steps = pipeline.steps_to_run if pipeline else ()
        if pipeline is not None and pipeline.clone.depth != 1:
            deepen(Path(ctx["checkout"]), url, ref, sha, pipeline.clone.depth, log,
                   authorization)  # fmt: skip
        if any(condition.path is not None for step in steps for condition in step.when or ()):
            write_changed_files(workspace, changed_paths(Path(ctx["checkout"]), url, before,
                                                         sha, log, authorization))  # fmt: skip
        language = _language_to_hand_on(steps)
        if language and not received.get("handed_on"):
            queue = language_queue(language)
            log.line(f"This agent does not build {language}; handing the build to one that does")
            remove_workspace(workspace)
            # Queued again before the message goes: the next agent claims a queued build.
            _back_to_queued(task_id, int(received.get("attempt", 1)))
            self.apply_async(
                args=({**received, "handed_on": language},),
                queue=queue,
                task_id=self.request.id,
                chain=self.request.chain,
            )
            raise Ignore()

    # The checkout is on this host's disk: send build and publish to this
    # node's own queue, whatever queue the chain came from.
    if self.request.hostname:
        queue = node_queue(self.request.hostname).name
        for step in self.request.chain or ():
            step.setdefault("options", {})["queue"] = queue
        ctx["node"] = self.request.hostname  # where the checkout is (StageTask.before_start)
    return ctx


def _pipeline(checkout: Path) -> Pipeline | None:
    """ci.yaml, or None when it is invalid (the build stage reports that)."""
    try:
        return load_pipeline(checkout)
    except PipelineError:
        return None


def _language_to_hand_on(steps: tuple[StepSpec, ...]) -> str | None:
    """The first language of ci.yaml's steps this agent does not build
    (``CICD_WORKER_LANGUAGES``), if any: the build goes to that language's agents."""
    served = load_settings().languages
    if not served:
        return None
    missing = [s.language for s in steps if s.language in LANGUAGES and s.language not in served]
    return missing[0] if missing else None


def deepen(
    checkout: Path, url: str, ref: str, sha: str, depth: int | str, log: LogWriter,
    authorization: str | None,
) -> None:  # fmt: skip
    """Give the one-commit checkout of ``sha`` the history ci.yaml asks for (``depth``: a
    number of commits, or ``full``), copied from this agent's mirror of the repository
    (:mod:`workers.mirrors`), which fetches from the forge only what is new. A mirror that
    cannot be used is made again; failing that, the history comes from the forge."""
    env = _git_environment(checkout.parent / "home", url, authorization)
    depth_args = ["--unshallow"] if depth == "full" else [f"--depth={depth}"]
    fetched = f"+{ref}:refs/opscd/ref"
    mirror = mirrors.mirror_path(load_settings(), url)
    with mirrors.locked(mirror):
        usable = _refresh_mirror(mirror, url, ref, env, log)
        if usable and depth == "full" and _copy_objects(mirror, checkout, sha, env, log):
            log.line("Full history copied from this agent's mirror")
            return
        if usable:
            local = {**env, "GIT_ALLOW_PROTOCOL": "file"}  # the mirror is this agent's own
            try:
                _git(["fetch", "-q", "--no-tags", *depth_args, f"file://{mirror}", fetched],
                     checkout, local, log, quiet=True)  # fmt: skip
                log.line(f"History to depth {depth} copied from this agent's mirror")
                return
            except StageError:
                log.line("The mirror's history could not be copied; fetching it from the forge")
    _git(["fetch", "-q", "--no-tags", *depth_args, url, fetched], checkout, env, log)
    log.line(f"History to depth {depth} fetched from the forge")


def _copy_objects(mirror: Path, checkout: Path, sha: str, env: dict[str, str],
                  log: LogWriter) -> bool:  # fmt: skip
    """Copy the mirror's packs and loose objects into the checkout as files (copies, not
    links or alternates: nothing a build does to its own objects reaches the mirror, and
    nothing the mirror does later reaches the build) and make it a full clone; True if
    ``sha``'s whole history is then there. Far cheaper than a fetch, which packs the whole
    history again."""
    source, target = mirror / "objects", checkout / ".git" / "objects"
    shallow = checkout / ".git" / "shallow"
    boundary = shallow.read_bytes() if shallow.is_file() else None
    copied: list[Path] = []

    def copy(path: Path, to: Path) -> None:
        if not to.exists():  # the checkout's own objects stay as they are
            copied.append(to)
            shutil.copyfile(path, to)

    try:
        for index in (source / "pack").glob("pack-*.idx"):
            pack = index.with_suffix(".pack")
            if pack.is_file():
                copy(pack, target / "pack" / pack.name)
                copy(index, target / "pack" / index.name)
        for loose in source.glob("[0-9a-f][0-9a-f]/*"):
            (target / loose.parent.name).mkdir(exist_ok=True)
            copy(loose, target / loose.parent.name / loose.name)
        shallow.unlink(missing_ok=True)
        # Every object of the history is there (git reports the first one missing).
        _git(["rev-list", "--objects", "--quiet", sha], checkout, env, log, quiet=True)
    except (OSError, StageError):
        for path in copied:  # as it was: one commit, for a fetch to deepen
            path.unlink(missing_ok=True)
        if boundary is not None:
            shallow.write_bytes(boundary)
        return False
    return True


def _refresh_mirror(mirror: Path, url: str, ref: str, env: dict[str, str],
                    log: LogWriter) -> bool:  # fmt: skip
    """Bring the mirror's ``ref`` up to date with the forge (making the mirror if there is
    none, again if git cannot use it); False if it cannot be made usable."""
    for attempt in (1, 2):
        try:
            if not (mirror / "HEAD").is_file():
                mirrors.remove(mirror)
                _git(["init", "-q", "--bare", "--template=", str(mirror)], mirror.parent, env,
                     log, quiet=True)  # fmt: skip
            # Any housekeeping git starts runs now, under the lock, not in the background
            # while a checkout copies the mirror's files.
            _git(["-c", "gc.autoDetach=false", "fetch", "-q", "--no-tags", url, f"+{ref}:{ref}"],
                 mirror, env, log, quiet=True)  # fmt: skip
            _git(["fsck", "--connectivity-only", "--no-dangling"], mirror, env, log,
                 quiet=True)  # fmt: skip
            return True
        except StageError:
            mirrors.remove(mirror)
            if attempt == 1:
                log.line("This agent's mirror of the repository was unusable; making it again")
    return False


def changed_paths(
    checkout: Path, url: str, before: str | None, sha: str, log: LogWriter,
    authorization: str | None,
) -> list[str] | None:  # fmt: skip
    """The files the push changed (``before``..``sha``), for ``when.path``; None when they
    cannot be known: a new branch, a tag, a merge request, or a ``before`` commit the
    registered repository no longer has (a force-push). Both commits come from the
    registered repository, never from the payload's lists."""
    if before is None or not before.strip("0") or before == sha:
        return None
    env = _git_environment(checkout.parent / "home", url, authorization)
    try:
        _git(["fetch", "-q", "--no-tags", "--depth=1", url, before], checkout, env, log,
             quiet=True)  # fmt: skip
        names = _git(["diff", "--name-only", "-z", "--no-renames", before, sha], checkout, env,
                     log, quiet=True)  # fmt: skip
    except StageError:
        log.line(f"The files changed since {before[:12]} are unknown: every when.path holds")
        return None
    return [name for name in names.split("\0") if name]


def _back_to_queued(task_id: int, attempt: int) -> None:
    """The build waits for a capable agent: queued again, without the clone it did here."""
    with db.session() as session:
        if lifecycle.hand_back(session, task_id, attempt):
            session.execute(delete(TaskStage).where(TaskStage.task_id == task_id))
        session.commit()


def fetch_commit(
    checkout: Path, url: str, ref: str, sha: str, log: LogWriter, authorization: str | None
) -> None:
    """Fetch ``ref`` from the registered repository and check out ``sha``, which the
    repository must confirm: a tag's commit, or a branch's head or one of its ancestors (the
    branch moved on since the push). A webhook only claims that ``sha`` is on ``ref``; a
    build of another commit under a protected ref's name would get its secrets.

    ``authorization`` (an HTTP ``Authorization`` value) goes only to ``url``'s origin.
    """
    env = _git_environment(checkout.parent / "home", url, authorization)
    # No template (no sample hooks to copy) and no remote: fetch straight from the URL.
    _git(["init", "-q", "--template="], checkout, env, log)
    fetched = "refs/opscd/ref"
    _git(["fetch", "-q", "--no-tags", "--depth=1", url, f"+{ref}:{fetched}"], checkout, env, log)
    head = _git(["rev-parse", "--verify", f"{fetched}^{{commit}}"], checkout, env, log,
                quiet=True).strip()  # fmt: skip
    if head != sha:
        if ref.startswith("refs/tags/"):
            raise StageError("git fetch", f"{ref} points at {head[:12]}, not at the pushed "
                             f"{sha[:12]}", "the tag was moved since; push it again")  # fmt: skip
        log.line(f"{ref} has moved on to {head[:12]}; fetching its history to find {sha[:12]}")
        _git(["fetch", "-q", "--no-tags", f"--depth={MAX_HISTORY}", url, f"+{ref}:{fetched}"],
             checkout, env, log)  # fmt: skip
        try:
            _git(["merge-base", "--is-ancestor", sha, fetched], checkout, env, log, quiet=True)
        except StageError:
            raise StageError(
                "git fetch",
                f"commit {sha} is not on {ref} in the registered repository (not among its "
                f"last {MAX_HISTORY} commits)",
                "the branch was force-pushed (push again to build its new head), or the "
                "webhook named a commit its ref does not hold",
            ) from None
    _git(["-c", "advice.detachedHead=false", "checkout", "-q", "--detach", sha], checkout, env, log)


def origin(url: str) -> str:
    """``scheme://host[:port]/`` of ``url``: git's ``http.<url>.*`` settings match by it."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/"


def _git_environment(home: Path, url: str, authorization: str | None) -> dict[str, str]:
    """git's environment: no user or system config, HTTP(S) only, no redirects followed, and
    the credentials (``http.<origin>.extraHeader``) sent only to the clone URL's origin.

    git applies a redirect of its first request to every later one, so a server
    (or a man in the middle of plain HTTP) could send the credentials elsewhere:
    a clone that is redirected fails instead, saying so.
    """
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "/bin/true",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_ALLOW_PROTOCOL": "http:https",
    }
    config = {"protocol.version": "2", "http.followRedirects": "false"}
    if authorization:
        config[f"http.{origin(url)}.extraHeader"] = "Authorization: " + authorization
    env["GIT_CONFIG_COUNT"] = str(len(config))
    for index, (key, value) in enumerate(config.items()):
        env[f"GIT_CONFIG_KEY_{index}"], env[f"GIT_CONFIG_VALUE_{index}"] = key, value
    return env


def _git(
    args: list[str], cwd: Path, env: dict[str, str], log: LogWriter, quiet: bool = False
) -> str:
    """Run one git command; its output goes to the log (``quiet``: only if it fails) and is
    returned; a failure is a masked StageError."""
    timeout = load_settings().clone_timeout
    operation = f"git {args[0] if args[0] != '-c' else args[2]}"
    process = subprocess.Popen(
        ["git", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    # Read as it comes, keeping a bounded head and tail: a server can send endless
    # "remote:" lines, and the worker must not hold them all.
    head, tail, dropped = bytearray(), collections.deque(maxlen=64), [0]

    def read() -> None:
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            room = MAX_GIT_OUTPUT - len(head)
            if room > 0:
                head.extend(chunk[:room])
                chunk = chunk[room:]
            if chunk:
                tail.append(chunk)
                dropped[0] += len(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise StageError(
            operation, f"timed out after {timeout}s", "raise CICD_CLONE_TIMEOUT"
        ) from None
    finally:
        reader.join(5)
        process.stdout.close()
    kept_tail = b"".join(tail)[-MAX_GIT_OUTPUT // 4 :]
    output = bytes(head)
    if dropped[0] > len(kept_tail):
        output += f"\n[opscd] {dropped[0] - len(kept_tail)} bytes of git output not kept\n".encode()
    output += kept_tail
    text = log.mask(output.decode("utf-8", "replace"))
    if text and (not quiet or process.returncode != 0):
        log.write(text)
    if process.returncode != 0:
        last = text.strip().splitlines()[-1] if text.strip() else f"exit code {process.returncode}"
        hint = None
        if "Authentication failed" in text or "could not read Username" in text:
            hint = "check the project's git credentials (cicd projects show), else "
            hint += "CICD_GIT_USERNAME and CICD_GIT_PASSWORD"
        elif REDIRECTED.search(text):
            hint = "the git server redirects; OpsCD follows no redirect (its credentials would "
            hint += "go along): use the URL it redirects to"
        elif "couldn't find remote ref" in text:
            hint = "the branch or tag was deleted since the push"
        raise StageError(operation, last, hint)
    return text
