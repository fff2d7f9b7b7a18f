"""Tests of the test git server helper: real git clients over real HTTP."""

from __future__ import annotations

import base64
import gzip
import os
import stat
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from support.git import GitHttpServer, GitRepo, git_env

USER = "ci-bot"
PASSWORD = "s3cret-t0ken"
PROJECT = "group/project"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[GitHttpServer]:
    with GitHttpServer(tmp_path / "srv", USER, PASSWORD) as srv:
        yield srv


@pytest.fixture
def repo(server: GitHttpServer) -> GitRepo:
    return GitRepo.create(server.root, PROJECT)


@pytest.fixture
def client_env(tmp_path: Path) -> dict[str, str]:
    """Environment for the git *client*: no user/system config, never prompt."""
    home = tmp_path / "client-home"
    home.mkdir()
    return git_env({"HOME": str(home)})


def basic_header(user: str, password: str) -> str:
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return f"Authorization: Basic {token}"


def run_git(
    env: dict[str, str], *args: str | os.PathLike[str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *(os.fspath(a) for a in args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def git_out(env: dict[str, str], *args: str | os.PathLike[str]) -> str:
    """Run git, require success, return stripped stdout."""
    result = run_git(env, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def authed(server: GitHttpServer, password: str = PASSWORD) -> list[str]:
    return ["-c", f"http.extraHeader={basic_header(USER, password)}"]


def fetch_sha(
    server: GitHttpServer,
    env: dict[str, str],
    dest: Path,
    sha: str,
    protocol: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``git init`` + ``git fetch --depth 1 origin <sha>``, like a CI checkout."""
    git_out(env, "init", "--quiet", dest)
    git_out(env, "-C", dest, "remote", "add", "origin", server.repo_url(PROJECT))
    proto = ["-c", f"protocol.version={protocol}"] if protocol else []
    return run_git(env, "-C", dest, *authed(server), *proto, "fetch", "--depth", "1", "origin", sha)


# -- basics ------------------------------------------------------------------------------------


def test_urls_and_layout(server: GitHttpServer, repo: GitRepo) -> None:
    assert server.base_url == f"http://127.0.0.1:{server.port}"
    assert server.port > 0
    assert server.repo_url(PROJECT) == f"{server.base_url}/{PROJECT}.git"
    assert "@" not in server.repo_url(PROJECT)
    assert repo.bare_path == server.root / f"{PROJECT}.git"
    assert (repo.bare_path / "HEAD").is_file()
    assert repo.work_path == server.root / "_work" / PROJECT


def test_clone_with_auth_header(
    server: GitHttpServer, repo: GitRepo, client_env: dict[str, str], tmp_path: Path
) -> None:
    sha = repo.commit(
        {"README.md": "hello\n", "bin/run.sh": "#!/bin/sh\necho hi\n", "data.bin": b"\x00\xff"},
        message="initial",
        executable={"bin/run.sh"},
    )
    assert len(sha) == 40
    assert repo.head() == sha

    dest = tmp_path / "clone"
    result = run_git(client_env, *authed(server), "clone", server.repo_url(PROJECT), dest)
    assert result.returncode == 0, result.stderr

    assert (dest / "README.md").read_text() == "hello\n"
    assert (dest / "data.bin").read_bytes() == b"\x00\xff"
    assert (dest / "bin/run.sh").stat().st_mode & stat.S_IXUSR
    assert not (dest / "README.md").stat().st_mode & stat.S_IXUSR
    assert run_git(client_env, "-C", dest, "rev-parse", "HEAD").stdout.strip() == sha
    log = run_git(client_env, "-C", dest, "log", "-1", "--format=%an <%ae>|%s").stdout.strip()
    assert log == "Test User <test@example.com>|initial"

    assert server.auth_failures == 0
    assert ("GET", f"/{PROJECT}.git/info/refs", 200) in server.requests_seen
    assert ("POST", f"/{PROJECT}.git/git-upload-pack", 200) in server.requests_seen


def test_wrong_password_with_credentials_says_authentication_failed(
    server: GitHttpServer, repo: GitRepo, client_env: dict[str, str], tmp_path: Path
) -> None:
    repo.commit({"README.md": "hello\n"})
    # Credentials git itself manages (URL / credential helper) that the server rejects.
    url = server.repo_url(PROJECT).replace("http://", f"http://{USER}:wrong@")
    result = run_git(client_env, "clone", url, tmp_path / "clone")
    assert result.returncode != 0
    assert "Authentication failed" in result.stderr
    assert not (tmp_path / "clone").exists()
    assert server.auth_failures >= 1
    assert all(status == 401 for _, _, status in server.requests_seen)


def test_wrong_password_in_extra_header_fails(
    server: GitHttpServer, repo: GitRepo, client_env: dict[str, str], tmp_path: Path
) -> None:
    repo.commit({"README.md": "hello\n"})
    result = run_git(
        client_env,
        *authed(server, password="wrong"),
        "clone",
        server.repo_url(PROJECT),
        tmp_path / "clone",
    )
    assert result.returncode != 0
    # With an http.extraHeader the 401 makes git ask for a username (it has none of its own),
    # so with prompts disabled the message is NOT "Authentication failed".
    assert "terminal prompts disabled" in result.stderr
    assert server.auth_failures >= 1


def test_missing_credentials_get_401_with_challenge(server: GitHttpServer, repo: GitRepo) -> None:
    repo.commit({"README.md": "hello\n"})
    url = f"{server.repo_url(PROJECT)}/info/refs?service=git-upload-pack"
    response = requests.get(url, timeout=10)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="git"'
    wrong_user = requests.get(url, auth=("someone", PASSWORD), timeout=10)
    assert wrong_user.status_code == 401
    assert server.auth_failures == 2

    ok = requests.get(url, auth=(USER, PASSWORD), timeout=10)
    assert ok.status_code == 200
    assert ok.headers["Content-Type"] == "application/x-git-upload-pack-advertisement"
    assert server.requests_seen[-1] == ("GET", f"/{PROJECT}.git/info/refs", 200)


@pytest.mark.parametrize("path", ["/group/../group/project.git/HEAD", "/group/%2e%2e/x.git/HEAD"])
def test_dotdot_path_is_404(server: GitHttpServer, repo: GitRepo, path: str) -> None:
    repo.commit({"README.md": "hello\n"})
    # Build the request by hand: requests would normalise the literal "..".
    session = requests.Session()
    prepared = requests.Request("GET", server.base_url, auth=(USER, PASSWORD)).prepare()
    prepared.url = server.base_url + path
    response = session.send(prepared, timeout=10)
    assert response.status_code == 404
    assert server.requests_seen[-1][2] == 404


def test_unknown_repository_is_404(server: GitHttpServer, client_env: dict[str, str]) -> None:
    result = run_git(client_env, *authed(server), "ls-remote", server.repo_url("nope/missing"))
    assert result.returncode != 0
    assert ("GET", "/nope/missing.git/info/refs", 404) in server.requests_seen


def test_push_over_http_is_refused(
    server: GitHttpServer, repo: GitRepo, client_env: dict[str, str], tmp_path: Path
) -> None:
    sha = repo.commit({"README.md": "hello\n"})
    dest = tmp_path / "clone"
    git_out(client_env, *authed(server), "clone", server.repo_url(PROJECT), dest)
    ident = ["-c", "user.name=X", "-c", "user.email=x@example.com"]
    git_out(client_env, "-C", dest, *ident, "commit", "--allow-empty", "-m", "x")
    result = run_git(client_env, "-C", dest, *authed(server), "push", "origin", "HEAD:main")
    assert result.returncode != 0
    assert repo.head() == sha
    assert ("GET", f"/{PROJECT}.git/info/refs", 403) in server.requests_seen


# -- protocol v2 and fetching exact commits ----------------------------------------------------


def test_protocol_v2_is_negotiated(
    server: GitHttpServer, repo: GitRepo, client_env: dict[str, str]
) -> None:
    sha = repo.commit({"README.md": "hello\n"})
    env = {**client_env, "GIT_TRACE_PACKET": "1"}
    result = run_git(env, *authed(server), "ls-remote", server.repo_url(PROJECT))
    assert result.returncode == 0, result.stderr
    assert f"{sha}\trefs/heads/main" in result.stdout
    assert "< version 2" in result.stderr  # the Git-Protocol header reached http-backend


@pytest.mark.parametrize("protocol", [None, "2", "0"])
def test_fetch_depth1_of_branch_head_sha(
    server: GitHttpServer,
    repo: GitRepo,
    client_env: dict[str, str],
    tmp_path: Path,
    protocol: str | None,
) -> None:
    repo.commit({"README.md": "one\n"})
    head = repo.commit({"README.md": "two\n"})
    dest = tmp_path / "ws"
    result = fetch_sha(server, client_env, dest, head, protocol)
    assert result.returncode == 0, result.stderr
    assert run_git(client_env, "-C", dest, "rev-parse", "FETCH_HEAD").stdout.strip() == head
    assert run_git(client_env, "-C", dest, "checkout", "--quiet", "FETCH_HEAD").returncode == 0
    assert (dest / "README.md").read_text() == "two\n"
    shallow = run_git(client_env, "-C", dest, "rev-list", "--count", "FETCH_HEAD").stdout.strip()
    assert shallow == "1"


@pytest.mark.parametrize("protocol", [None, "2"])
def test_fetch_depth1_of_reachable_non_head_sha_works_over_v2(
    server: GitHttpServer,
    repo: GitRepo,
    client_env: dict[str, str],
    tmp_path: Path,
    protocol: str | None,
) -> None:
    old = repo.commit({"README.md": "one\n"})
    repo.commit({"README.md": "two\n"})
    assert repo.head() != old
    dest = tmp_path / "ws"
    result = fetch_sha(server, client_env, dest, old, protocol)
    assert result.returncode == 0, result.stderr
    assert run_git(client_env, "-C", dest, "rev-parse", "FETCH_HEAD").stdout.strip() == old
    assert run_git(client_env, "-C", dest, "checkout", "--quiet", "FETCH_HEAD").returncode == 0
    assert (dest / "README.md").read_text() == "one\n"


def test_fetch_of_non_head_sha_is_refused_over_v0(
    server: GitHttpServer, repo: GitRepo, client_env: dict[str, str], tmp_path: Path
) -> None:
    old = repo.commit({"README.md": "one\n"})
    repo.commit({"README.md": "two\n"})
    result = fetch_sha(server, client_env, tmp_path / "ws", old, protocol="0")
    assert result.returncode != 0
    assert "not allow request for unadvertised object" in result.stderr


def test_fetch_of_deleted_branch_sha_still_works_over_v2(
    server: GitHttpServer, repo: GitRepo, client_env: dict[str, str], tmp_path: Path
) -> None:
    """Plain git upload-pack v2 serves any object it has, even one no ref reaches any more."""
    repo.commit({"README.md": "one\n"})
    orphan = repo.commit({"gone.txt": "x\n"}, branch="feature/gone")
    repo.delete_branch("feature/gone")
    refs = run_git(client_env, *authed(server), "ls-remote", server.repo_url(PROJECT)).stdout
    assert "feature/gone" not in refs
    result = fetch_sha(server, client_env, tmp_path / "ws", orphan)
    assert result.returncode == 0, result.stderr


# -- branches and tags ------------------------------------------------------------------------


def test_branch_with_slashes(
    server: GitHttpServer, repo: GitRepo, client_env: dict[str, str], tmp_path: Path
) -> None:
    main = repo.commit({"README.md": "main\n"})
    feature = repo.commit({"login.py": "print('login')\n"}, branch="feature/login")
    deeper = repo.commit({"x.txt": "x\n"}, branch="team/a/b")
    assert repo.head("main") == main
    assert repo.head("feature/login") == feature
    assert repo.head("team/a/b") == deeper

    refs = run_git(client_env, *authed(server), "ls-remote", server.repo_url(PROJECT)).stdout
    assert f"{feature}\trefs/heads/feature/login" in refs
    assert f"{deeper}\trefs/heads/team/a/b" in refs
    assert f"{main}\trefs/heads/main" in refs

    dest = tmp_path / "clone"
    result = run_git(
        client_env,
        *authed(server),
        "clone",
        "--branch",
        "feature/login",
        server.repo_url(PROJECT),
        dest,
    )
    assert result.returncode == 0, result.stderr
    assert (dest / "login.py").read_text() == "print('login')\n"
    assert (dest / "README.md").read_text() == "main\n"  # branched from main
    # Going back to an existing branch continues it.
    main2 = repo.commit({"README.md": "main 2\n"}, branch="main")
    assert git_out(client_env, "-C", repo.bare_path, "rev-parse", f"{main2}^") == main


def test_tag(
    server: GitHttpServer, repo: GitRepo, client_env: dict[str, str], tmp_path: Path
) -> None:
    first = repo.commit({"VERSION": "1.0\n"})
    second = repo.commit({"VERSION": "1.1\n"})
    assert repo.tag("v1.0", first) == first
    assert repo.tag("release/1.1") == second  # default: current HEAD

    refs = run_git(client_env, *authed(server), "ls-remote", "--tags", server.repo_url(PROJECT))
    assert f"{first}\trefs/tags/v1.0" in refs.stdout
    assert f"{second}\trefs/tags/release/1.1" in refs.stdout
    # Lightweight: the tag ref points straight at the commit (no peeled ^{} entry).
    assert "^{}" not in refs.stdout

    dest = tmp_path / "clone"
    result = run_git(
        client_env, *authed(server), "clone", "--branch", "v1.0", server.repo_url(PROJECT), dest
    )
    assert result.returncode == 0, result.stderr
    assert (dest / "VERSION").read_text() == "1.0\n"


def test_commit_delete_and_delete_branch(repo: GitRepo, client_env: dict[str, str]) -> None:
    repo.commit({"a.txt": "a", "dir/b.txt": "b"})
    sha = repo.commit({}, delete={"a.txt"}, message="remove a")
    files = run_git(client_env, "-C", repo.bare_path, "ls-tree", "-r", "--name-only", sha).stdout
    assert files.split() == ["dir/b.txt"]
    empty = repo.commit({}, message="empty")
    assert empty != sha

    repo.commit({"c.txt": "c"}, branch="topic")
    repo.delete_branch("topic")
    with pytest.raises(subprocess.CalledProcessError):
        repo.head("topic")
    # The work tree is still usable after deleting the branch it had checked out.
    assert repo.commit({"d.txt": "d"}) != empty


# -- request bodies ---------------------------------------------------------------------------


def _pkt(line: str) -> bytes:
    data = line.encode()
    return f"{len(data) + 4:04x}".encode() + data


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
def test_upload_pack_request_bodies(
    server: GitHttpServer, repo: GitRepo, chunked: bool, gzipped: bool
) -> None:
    sha = repo.commit({"README.md": "hello\n"})
    body = _pkt(f"want {sha} ofs-delta\n") + b"0000" + _pkt("done\n")
    headers = {"Content-Type": "application/x-git-upload-pack-request"}
    if gzipped:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    data: bytes | Iterator[bytes] = iter([body[:7], body[7:]]) if chunked else body
    response = requests.post(
        f"{server.repo_url(PROJECT)}/git-upload-pack",
        data=data,
        headers=headers,
        auth=(USER, PASSWORD),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/x-git-upload-pack-result"
    assert response.content.startswith(b"0008NAK\n")
    assert b"PACK" in response.content


def test_concurrent_clones(
    server: GitHttpServer, repo: GitRepo, client_env: dict[str, str], tmp_path: Path
) -> None:
    sha = repo.commit({f"f{i}.txt": f"{i}\n" * 1000 for i in range(50)})
    url = server.repo_url(PROJECT)

    def clone(i: int) -> subprocess.CompletedProcess[str]:
        return run_git(client_env, *authed(server), "clone", "-q", url, tmp_path / f"c{i}")

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(clone, range(6)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    for i in range(6):
        assert git_out(client_env, "-C", tmp_path / f"c{i}", "rev-parse", "HEAD") == sha
    assert len(server.requests_seen) == 6 * 3
