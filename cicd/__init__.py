"""OpsCD's control plane: the Flask app that takes webhooks and serves the API.

``create_app()`` reads the settings and registers the blueprints; it opens no
connection (the database engine is made on first use, per process), so
``gunicorn 'cicd:create_app()'`` forks cheaply.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify

from cicd.config import Settings, load_settings

__all__ = ["create_app", "__version__"]

__version__ = "0.1.0"


def create_app(settings: Settings | None = None) -> Flask:
    """The web application; raises :class:`~cicd.errors.ConfigError` on bad settings."""
    settings = settings or load_settings()
    settings.require("database_url", "broker_url")
    logging.getLogger("cicd").setLevel(settings.log_level.upper())
    app = Flask(__name__)
    app.config.update(
        WEBHOOK_SECRET=settings.require_webhook_secret(),
        PUBLIC_URL=settings.public_url,
        AGENT_OFFLINE_AFTER=settings.agent_offline_after,
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        JSON_SORT_KEYS=False,
    )

    from cicd import api, metrics, webhook

    app.register_blueprint(webhook.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(metrics.bp)

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
