"""The shell executor on a real ``sh``: a script's last output, written just before it ends,
is in the log even when it falls between two of the executor's waits for output."""

from __future__ import annotations

from pathlib import Path

from workers.executors.shell import TICK_SECONDS, ShellExecutor, Step


def test_the_last_line_before_the_script_ends_is_never_dropped(tmp_path: Path) -> None:
    workspace = tmp_path / "src"
    workspace.mkdir()
    # Each script sleeps one wait of the executor and prints as it ends: the line and the
    # exit land next to the wait's end, where a race once dropped them.
    missing = []
    for run in range(12):
        chunks: list[bytes] = []
        step = Step(name=f"tail-{run}", commands=[f"sleep {TICK_SECONDS}", f"echo tail-{run}"],
                    workspace=workspace, workdir=str(workspace), timeout=30)  # fmt: skip
        result = ShellExecutor().run(step, chunks.append)
        assert result.ok, result
        if f"tail-{run}\n" not in b"".join(chunks).decode():
            missing.append(run)
    assert missing == []
