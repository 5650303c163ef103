"""Who may reach the app: the access flags of `python -m app`, checked alone and on real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from app.__main__ import AUTH_ENV, check_access
from tests.running_app import ROOT, free_port, serving
from trainer.data import MB, UploadLimits

# host, share, auth, insecure -> credentials passed to gradio, warning printed, or the words of the refusal
ACCESS_CASES = [
    ("127.0.0.1", False, None, False, None, None, None),
    ("localhost", False, None, False, None, None, None),
    ("::1", False, None, False, None, None, None),
    ("127.0.0.1", False, "ann:pw", False, ("ann", "pw"), None, None),  # a password on loopback is still used
    ("0.0.0.0", False, "ann:pw", False, ("ann", "pw"), None, None),
    ("192.168.1.5", False, "ann:pw", False, ("ann", "pw"), None, None),
    ("127.0.0.1", True, "ann:pw", False, ("ann", "pw"), None, None),
    ("0.0.0.0", False, None, False, None, None, "--host 0.0.0.0 lets other machines reach the app"),
    ("my-box.lan", False, None, False, None, None, "--host my-box.lan"),  # a name may resolve to any interface
    ("", False, None, False, None, None, "--host '' lets other machines"),  # '' binds every interface
    ("127.0.0.1", True, None, False, None, None, "--share publishes the app"),
    ("0.0.0.0", False, None, True, None, "with no password (--insecure)", None),
    ("127.0.0.1", True, None, True, None,
     "--share publishes the app at a public gradio.live address, with no password", None),
    ("0.0.0.0", False, "ann:pw", True, ("ann", "pw"), None, None),  # --auth wins: no warning
    ("127.0.0.1", False, "annpw", False, None, None, "must be USER:PASSWORD"),
    ("127.0.0.1", False, "ann:p:w", False, None, None, "must be USER:PASSWORD"),
    ("0.0.0.0", False, ":pw", False, None, None, "must be USER:PASSWORD"),
    ("0.0.0.0", False, "ann:", True, None, None, "must be USER:PASSWORD"),  # --insecure does not excuse a broken --auth
    ("0.0.0.0", False, "", False, None, None, "must be USER:PASSWORD"),
]


@pytest.mark.parametrize("host,share,auth,insecure,credentials,warning,refusal", ACCESS_CASES)
def test_check_access(host, share, auth, insecure, credentials, warning, refusal):
    if refusal:
        with pytest.raises(ValueError) as caught:
            check_access(host, share, auth, insecure)
        message = str(caught.value)
        assert refusal in message
        assert "pw" not in message.replace("password", "").replace("PASSWORD", "")  # never echoes the password
        if "must be" not in refusal:  # exposed without a password: the message names both fixes
            assert "--auth USER:PASSWORD" in message and AUTH_ENV in message and "--insecure" in message
        return
    got_credentials, got_warning = check_access(host, share, auth, insecure)
    assert got_credentials == credentials
    assert (warning is None and got_warning is None) or warning in got_warning


def _run_app(*args, env_auth=None):
    env = {key: value for key, value in os.environ.items() if key != AUTH_ENV}
    if env_auth is not None:
        env[AUTH_ENV] = env_auth
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    return result, time.monotonic() - started


@pytest.mark.parametrize(
    "args,env_auth,words",
    [
        (["--host", "0.0.0.0"], None,
         ["--host 0.0.0.0 lets other machines reach the app", "--auth USER:PASSWORD", "--insecure"]),
        (["--host", "0.0.0.0", "--auth", "ann:se:cret"], None, ["must be USER:PASSWORD"]),
        # the variable is read
        (["--host", "0.0.0.0"], "ann-se-cret", [f"--auth (or {AUTH_ENV}) must be USER:PASSWORD"]),
    ],
    ids=["no-auth", "bad-auth", "bad-env-auth"],
)
def test_exposed_app_without_a_password_exits_before_loading_the_model(tmp_path, args, env_auth, words):
    result, seconds = _run_app(*args, "--port", str(free_port()), "--workspace", str(tmp_path / "ws"),
                               env_auth=env_auth)
    assert result.returncode == 2, result.stderr
    assert all(word in result.stderr for word in words), result.stderr
    assert "se-cret" not in result.stderr and "se:cret" not in result.stderr
    assert seconds < 20 and not (tmp_path / "ws").exists()  # refused before the workspace or the model was touched


@pytest.fixture(scope="module")
def guarded_app(tmp_path_factory):
    """The app's server with a password and a 1 MB upload cap (what --auth u:p --max-file-mb 1 --max-upload-mb 1
    give serve()), in this process; yields (url, workspace)."""
    workspace = tmp_path_factory.mktemp("workspace")
    with serving(workspace, limits=UploadLimits(max_file_bytes=MB, max_total_bytes=MB), auth=("u", "p")) as (_, url, _):
        yield url, workspace


def test_password_is_required(guarded_app):
    from gradio_client import Client

    url, _ = guarded_app
    for auth in (None, ("u", "wrong"), ("someone", "p")):
        # AuthenticationError without auth, ValueError for a failed login
        with pytest.raises(Exception, match="(?i)login"):
            Client(url, verbose=False, auth=auth).predict(api_name="/list_styles")
    assert Client(url, verbose=False, auth=("u", "p")).predict(api_name="/list_styles") == []


def test_server_refuses_a_file_over_its_cap_before_it_reaches_disk(guarded_app, tmp_path):
    import httpx
    from gradio_client import Client, handle_file

    url, workspace = guarded_app
    big = tmp_path / "big.png"
    big.write_bytes(bytes(2 * 1024 * 1024))
    # gradio_client reads the cap from the app's config and refuses before sending...
    with pytest.raises(ValueError, match="exceeds the maximum file size of 1048576 bytes"):
        Client(url, verbose=False, auth=("u", "p")).predict(files=[handle_file(str(big))], style_name="big",
                                                             api_name="/submit_training")
    # ...and a client that sends anyway is cut off by the server mid-stream.
    with httpx.Client(base_url=url) as http:
        assert http.post("gradio_api/upload", files={"files": ("a.png", b"x")}).status_code == 401  # not logged in
        assert http.post("login", data={"username": "u", "password": "p"}).is_success
        response = http.post("gradio_api/upload", files={"files": ("big.png", big.read_bytes())})
    assert response.status_code == 413 and "maximum allowed size of 1048576 bytes" in response.text
    assert not (workspace / "jobs").exists() or not any((workspace / "jobs").iterdir())


API_WORDS = ("list_styles", "generate_grid", "submit_training", "named_endpoints", "negative_prompt")


def test_nothing_about_the_api_is_served_before_login(guarded_app):
    """Issue 18, item 16: gradio embedded the whole API description in the login page it serves at `/`."""
    import httpx

    url, _ = guarded_app
    with httpx.Client(base_url=url) as http:
        pages = {path: http.get(path) for path in ("/", "/?page=", "/?view=api", "gradio_api/runs")}
        for path, page in pages.items():
            assert page.status_code in (200, 401, 404), path
            assert not [word for word in API_WORDS if word in page.text], path
        assert "auth_required" in pages["/"].text  # what was served is gradio's login page
        assert http.get("gradio_api/info").status_code == 401
        assert http.post("login", data={"username": "u", "password": "p"}).is_success
        after = http.get("/").text  # logged in, the page describes the API as before
    assert all(word in after for word in API_WORDS)
