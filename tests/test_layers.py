"""Layers that depend one way: core ← web side, core ← worker side, never web ↔ worker.

The imports are read with ``ast`` (every ``import`` and ``from … import``,
also those inside functions), not with grep; then real processes are asked:
a worker node has no Flask, the web process no worker code or signal handler.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import uuid
from pathlib import Path

from conftest import (
    ROOT,
    GitRepo,
    Process,
    gitlab_payload,
    post_gitlab,
    wait_for_task,
    wait_ready,
    worker_args,
)

#: The web side: the Flask app and the command line. Everything else in cicd/ is the core.
WEB_SIDE = ("cicd.web", "cicd.cli", "cicd.up", "cicd.trigger", "cicd.gitserve")
FLASK = ("flask", "werkzeug", "jinja2")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module the file imports, absolute; ``from a import b`` counts ``a`` and ``a.b``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def wrong_steps() -> list[str]:
    steps = []
    for path in sorted([*ROOT.glob("cicd/**/*.py"), *ROOT.glob("workers/**/*.py")]):
        name = module_name(path)
        for imported in imports_of(path):
            if name.startswith("cicd") and under(imported, ("workers",)):
                steps.append(f"{name} imports {imported} (cicd never imports the worker side)")
            elif not under(name, WEB_SIDE) and under(imported, WEB_SIDE + FLASK):
                layer = "the worker side" if name.startswith("workers") else "the core"
                steps.append(f"{name} imports {imported} ({layer} imports no web code)")
    return steps


def python_says(probe: str, env: dict[str, str]) -> list[str]:
    """The words a fresh Python process running ``probe`` prints."""
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_no_import_steps_the_wrong_way():
    assert wrong_steps() == []


def test_the_walk_sees_imports_inside_functions(tmp_path):
    sample = ROOT / "workers" / f"_layers_probe_{uuid.uuid4().hex[:6]}.py"
    sample.write_text("def late():\n    from cicd.web import create_app\n    import flask\n")
    try:
        found = wrong_steps()
    finally:
        sample.unlink()
    assert any(sample.stem in step and "cicd.web" in step for step in found), found
    assert any(sample.stem in step and "flask" in step for step in found), found


def test_the_web_process_has_no_worker_code_or_handler(opscd_env):
    probe = (
        "import sys\n"
        "from celery import signals\n"
        "from cicd.web import create_app\n"
        "create_app()\n"
        "handlers = sum(len(s.receivers) for s in (signals.task_prerun, signals.task_success,"
        " signals.task_failure, signals.heartbeat_sent, signals.worker_ready))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'workers'), handlers)\n"
    )
    assert python_says(probe, opscd_env) == ["[]", "0"]


def test_a_worker_node_that_ran_a_build_never_imported_flask(
    isolated_env, start_web, git_server, tmp_path
):
    env = isolated_env("noflask")
    web = start_web(**{k: v for k, v in env.items() if k.startswith("CICD_")})
    name = f"noflask{uuid.uuid4().hex[:4]}"
    # -X importtime: the node (main and pool processes) prints every module it imports.
    args = [sys.executable, "-X", "importtime", *worker_args(name)[1:]]
    node = Process(name, args, env, tmp_path)
    try:
        wait_ready(node)
        repo = GitRepo.create(git_server.root, f"layers/app-{uuid.uuid4().hex[:6]}")
        repo.clone_url = git_server.repo_url(repo.project_path)
        sha = repo.commit({"ci.yaml": "build:\n  script: echo built without flask\n"})
        answer = post_gitlab(web, gitlab_payload("push-event.json", repo, "refs/heads/main", sha))
        done = wait_for_task(web, answer.json()["task_id"], timeout=60)
    finally:
        node.stop()
    assert done["state"] == "success" and done["worker"].startswith(name), done
    imported = {line.rsplit("|", 1)[1].strip() for line in node.output().splitlines()
                if line.startswith("import time:")}  # fmt: skip
    assert {"workers.stages.build", "celery.worker.request"} <= imported  # the probe works
    assert not {m for m in imported if m.split(".")[0] in FLASK}, "a worker imported Flask"


#: The entry points that read the settings from the environment and pass them on.
READS_SETTINGS = {
    "cicd.web": "create_app's default",
    "cicd.cli": "the command line",
    "cicd.broker": "Flower's -A cicd.broker, which configures nothing",
    "workers.celery_app": "the worker at start",
    "cicd.reporter": "the reporter at start",
    "workers.localrun": "cicd run",
}


def environ_written(node: ast.AST) -> bool:
    """``os.environ[...] = ...``, ``os.environ.update(...)`` and the like."""
    if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store | ast.Del):
        return ast.unparse(node.value) == "os.environ"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        mutators = ("update", "setdefault", "pop", "clear", "__setitem__")
        return node.func.attr in mutators and ast.unparse(node.func.value) == "os.environ"
    return False


def settings_readers_and_environ_writes() -> tuple[set[str], list[str]]:
    readers, writes = set(), []
    paths = sorted(p for top in ("cicd", "workers", "bench") for p in ROOT.glob(f"{top}/**/*.py"))
    for path in paths:
        name = module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_settings":
                readers.add(name)
            if environ_written(node):
                writes.append(f"{name}:{node.lineno}")
    return readers, writes


def test_settings_are_read_by_entry_points_and_passed_in():
    readers, writes = settings_readers_and_environ_writes()
    core_and_web = {r for r in readers if r.startswith("cicd")}
    assert core_and_web <= set(READS_SETTINGS), core_and_web - set(READS_SETTINGS)
    assert writes == [], "configured by writing os.environ"


def test_create_app_configures_the_database_and_broker_it_is_given(opscd_env):
    probe = (
        "from cicd import broker, db\n"
        "from cicd.config import Settings\n"
        "from cicd.web import create_app\n"
        "s = Settings(database_url='sqlite:///passed.db', broker_url='redis://127.0.0.1:9/3',"
        " webhook_secret='x')\n"
        "app = create_app(s)\n"
        "print(db.engine().url, broker.app.conf.broker_url, app.config['SETTINGS'] is s)\n"
    )
    assert python_says(probe, opscd_env) == ["sqlite:///passed.db", "redis://127.0.0.1:9/3", "True"]
