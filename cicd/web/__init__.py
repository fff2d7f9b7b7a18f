"""The web side: the Flask app that takes webhooks and serves the API and the pages.

``create_app(settings)`` configures the database and the broker with the
settings it is given (by default the environment's) and registers the
blueprints (webhook, REST API, metrics, pages); it opens no connection (the
database engine is made on first use, per process), so ``gunicorn 'cicd.web:create_app()'`` forks
cheaply. It sends builds through :mod:`cicd.broker` and never imports the
worker's code.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

from flask import Flask, Response, g, jsonify, request

from cicd import broker, db
from cicd.config import Settings, load_settings
from cicd.web import api, metrics, pages, webhook

__all__ = ["create_app"]

#: Reachable without the UI login: the webhook checks each project's own secret; probes,
#: scrapes, and the build badges project READMEs embed (they show a branch's last state).
WEBHOOKS = {"webhook.gitlab_webhook", "webhook.github_webhook", "webhook.gitea_webhook"}
OPEN_ENDPOINTS = {*WEBHOOKS, "healthz", "metrics.metrics", "web.badge"}
#: Methods that change something: they need an X-Requested-With header, which a page of
#: another site cannot send (a form cannot, and a script must ask CORS, which is not
#: granted), so it cannot act with the user's login, or with no login on loopback.
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
#: Answered whatever the Host: the forge's deliveries and load balancers' probes.
ANY_HOST_ENDPOINTS = {*WEBHOOKS, "healthz"}
LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}


def _host_allowed(host: str, public_host: str | None) -> bool:
    """A Host header is served if it is an IP address, a loopback name or the public URL's
    host: a DNS name of an attacker's (rebound to this server) is none of these."""
    name = (urlsplit(f"//{host}").hostname or "").rstrip(".").lower()
    if name in LOOPBACK_NAMES or name.endswith(".localhost") or name == public_host:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _guard(settings: Settings) -> Callable[[], Response | None]:
    """Refuse requests for another site's name (DNS rebinding), and changes without
    X-Requested-With (cross-site forms), whatever the login."""
    public_host = urlsplit(settings.public_url).hostname if settings.public_url else None

    def check() -> Response | None:
        if request.endpoint in ANY_HOST_ENDPOINTS:
            return None
        if not _host_allowed(request.host, public_host):
            response = jsonify(error=f"this server is not {request.host!r}: reach it by the "
                               "host of CICD_PUBLIC_URL, an IP address or localhost")  # fmt: skip
            response.status_code = 421
            return response
        return None

    return check


def _require_change_header() -> Response | None:
    """Changes need X-Requested-With, or a Bearer token: neither can a cross-site form send
    (a browser adds a remembered Basic login to one, so Basic alone is not enough)."""
    if request.method in UNSAFE_METHODS and request.endpoint not in ANY_HOST_ENDPOINTS:
        bearer = request.headers.get("Authorization", "").startswith("Bearer ")
        if not bearer and not request.headers.get("X-Requested-With"):
            response = jsonify(error="send an X-Requested-With header with changes")
            response.status_code = 403
            return response
    return None


def _require_login(settings: Settings) -> Callable[[], Response | None]:
    """HTTP Basic (``CICD_UI_USER``/``CICD_UI_PASSWORD``) or a Bearer ``CICD_API_TOKEN``."""
    password = settings.ui_password.get_secret_value() if settings.ui_password else None
    token = settings.api_token.get_secret_value() if settings.api_token else None

    def check() -> Response | None:
        if request.endpoint in OPEN_ENDPOINTS:
            return None
        header = request.headers.get("Authorization", "")
        if token and header.startswith("Bearer "):
            if hmac.compare_digest(header[7:].encode(), token.encode()):
                g.user = "api-token"
                return None
        auth = request.authorization
        if password and auth is not None and auth.type == "basic":
            user_ok = hmac.compare_digest((auth.username or "").encode(), settings.ui_user.encode())
            password_ok = hmac.compare_digest((auth.password or "").encode(), password.encode())
            if user_ok and password_ok:
                g.user = auth.username
                return None
        response = jsonify(error="login required")
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Basic realm="OpsCD", charset="UTF-8"'
        return response

    return check


def create_app(settings: Settings | None = None) -> Flask:
    """The web application; raises :class:`~cicd.errors.ConfigError` on bad settings."""
    settings = settings or load_settings()
    settings.require("database_url", "broker_url")
    logging.getLogger("cicd").setLevel(settings.log_level.upper())
    db.configure(settings)
    broker.configure(settings)
    app = Flask("cicd")
    app.config.update(
        SETTINGS=settings,
        PUBLIC_URL=settings.public_url,
        AGENT_OFFLINE_AFTER=settings.agent_offline_after,
        AUTO_CANCEL=settings.auto_cancel,
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        JSON_SORT_KEYS=False,
    )

    app.register_blueprint(webhook.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(pages.bp)

    app.before_request(_guard(settings))
    if settings.ui_password or settings.api_token:
        app.before_request(_require_login(settings))
    app.before_request(_require_change_header)  # after the login: without it, 401 first

    @app.errorhandler(413)
    def too_large(_error: Exception) -> tuple[Response, int]:
        return jsonify(error=f"body larger than {settings.max_body_bytes} bytes"), 413

    @app.errorhandler(404)
    def not_found(_error: Exception) -> tuple[Response, int]:
        return jsonify(error="not found"), 404

    @app.errorhandler(405)
    def not_allowed(_error: Exception) -> tuple[Response, int]:
        return jsonify(error="method not allowed"), 405

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    return app
