"""One definition of each process (``cicd.processes``): the Procfile is written from it."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

from cicd import processes


def test_the_procfile_is_the_one_definition_of_the_processes():
    assert (ROOT / "Procfile").read_text() == processes.procfile()
    printed = subprocess.run([sys.executable, "-m", "cicd.processes"], cwd=ROOT,
                             capture_output=True, text=True, check=True)  # fmt: skip
    assert printed.stdout == processes.procfile()  # `python -m cicd.processes > Procfile`


def test_the_command_lines_are_argument_lists_never_shell_strings():
    node = processes.worker("builder", 2)
    assert node[:6] == ["celery", "-A", "workers.celery_app", "worker", "-n", "builder@%h"]
    assert node[-2:] == ["--concurrency", "2"]
    assert processes.worker("a@host")[5] == "a@host"
    assert "--concurrency" not in processes.worker("a")  # CICD_WORKER_CONCURRENCY decides
    assert processes.web("127.0.0.1:1")[-1] == processes.WEB_APP
    assert processes.flower("127.0.0.1", 5)[2] == processes.MONITOR_APP
    assert processes.with_python(["gunicorn"], "/py") == ["/py", "-m", "gunicorn"]
