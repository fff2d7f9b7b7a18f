-- OpsCD schema for MySQL / MariaDB (utf8mb4, InnoDB).
-- The same schema as the SQLAlchemy models in cicd/models.py; tests/test_schema.py
-- loads this file into MariaDB and compares it with them. Change both together.
-- Timestamps are UTC with microseconds. Apply with:  mysql opscd < sql/schema.sql
-- (or `cicd init-db`, which creates the same tables from the models).

-- What to build: one row per accepted push, written once by the webhook.
CREATE TABLE IF NOT EXISTS task_details (
    id              BIGINT        NOT NULL AUTO_INCREMENT,
    forge           VARCHAR(32)   NOT NULL,              -- gitlab
    delivery_id     VARCHAR(128)  NULL,                  -- X-Gitlab-Event-UUID / Idempotency-Key
    project         VARCHAR(255)  NOT NULL,              -- path with namespace, e.g. group/app
    clone_url       VARCHAR(1024) NOT NULL,              -- http(s), never with credentials
    web_url         VARCHAR(1024) NULL,
    ref_type        ENUM('branch','tag') NOT NULL,
    ref_name        VARCHAR(255)  NOT NULL,              -- full name: feature/login, v1.0.0
    commit_sha      VARCHAR(64)   NOT NULL,              -- the exact commit built
    before_sha      VARCHAR(64)   NULL,
    commit_message  TEXT          NULL,
    commit_author   VARCHAR(255)  NULL,
    pusher          VARCHAR(255)  NULL,
    retry_of        BIGINT        NULL,                  -- the task this one runs again
    created_at      DATETIME(6)   NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT uq_task_details_delivery UNIQUE (forge, delivery_id),
    INDEX ix_task_details_project_ref (project, ref_name),
    FOREIGN KEY (retry_of) REFERENCES task_details (id) ON DELETE SET NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Where the build is: one row per task, kept current by the workers' Celery signals.
CREATE TABLE IF NOT EXISTS task_states (
    task_id       BIGINT       NOT NULL,
    state         ENUM('queued','running','waiting','success','failed','canceled') NOT NULL,
    stage         ENUM('clone','build','publish') NULL,  -- the stage running or last run
    worker        VARCHAR(255) NULL,                     -- Celery node name, e.g. agent@host1
    queued_at     DATETIME(6)  NOT NULL,
    enqueued_at   DATETIME(6)  NULL,                     -- NULL: never reached the broker
    started_at    DATETIME(6)  NULL,
    finished_at   DATETIME(6)  NULL,
    exit_code     INTEGER      NULL,                     -- of the build script
    error         TEXT         NULL,                     -- why it failed, credentials masked
    attempt       INTEGER      NOT NULL DEFAULT 1,       -- runs; +1 when its node died
    image         VARCHAR(512) NULL,                     -- pushed image name
    image_digest  VARCHAR(100) NULL,
    updated_at    DATETIME(6)  NOT NULL,
    PRIMARY KEY (task_id),
    INDEX ix_task_states_state (state),
    FOREIGN KEY (task_id) REFERENCES task_details (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- The build's timeline: one row per stage that started or was skipped.
CREATE TABLE IF NOT EXISTS task_stages (
    task_id      BIGINT       NOT NULL,
    stage        ENUM('clone','build','publish') NOT NULL,
    state        ENUM('running','success','failed','skipped','canceled') NOT NULL,
    worker       VARCHAR(255) NULL,
    started_at   DATETIME(6)  NOT NULL,
    finished_at  DATETIME(6)  NULL,
    PRIMARY KEY (task_id, stage),
    FOREIGN KEY (task_id) REFERENCES task_details (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Build output in order of id, masked, readable from any host.
CREATE TABLE IF NOT EXISTS task_logs (
    id          BIGINT      NOT NULL AUTO_INCREMENT,
    task_id     BIGINT      NOT NULL,
    stage       ENUM('clone','build','publish') NULL,
    attempt     INTEGER     NOT NULL DEFAULT 1,          -- the run that wrote it
    created_at  DATETIME(6) NOT NULL,
    content     MEDIUMTEXT  NOT NULL,
    PRIMARY KEY (id),
    INDEX ix_task_logs_task (task_id, id),
    FOREIGN KEY (task_id) REFERENCES task_details (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Builds whose publish waits for a person: who decided, when, and how to resume.
CREATE TABLE IF NOT EXISTS task_approvals (
    task_id       BIGINT       NOT NULL,
    node          VARCHAR(255) NOT NULL,                 -- the worker holding the workspace
    context       MEDIUMTEXT   NOT NULL,                 -- JSON the publish stage resumes with
    requested_at  DATETIME(6)  NOT NULL,
    decision      ENUM('approved','rejected') NULL,
    decided_by    VARCHAR(255) NULL,
    decided_at    DATETIME(6)  NULL,
    PRIMARY KEY (task_id),
    FOREIGN KEY (task_id) REFERENCES task_details (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Per-project secret variables, encrypted at rest (Fernet, key CICD_SECRETS_KEY).
CREATE TABLE IF NOT EXISTS project_secrets (
    project     VARCHAR(255) NOT NULL,
    name        VARCHAR(128) NOT NULL,
    ciphertext  MEDIUMTEXT   NOT NULL,
    created_at  DATETIME(6)  NOT NULL,
    updated_at  DATETIME(6)  NOT NULL,
    PRIMARY KEY (project, name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- One row per worker node, kept current by its heartbeats.
CREATE TABLE IF NOT EXISTS agent_states (
    hostname        VARCHAR(255) NOT NULL,               -- Celery node name
    online          BOOL         NOT NULL,
    concurrency     INTEGER      NOT NULL,
    active          INTEGER      NOT NULL,               -- builds running now
    processed       BIGINT       NOT NULL,
    loadavg         VARCHAR(64)  NULL,
    sw_version      VARCHAR(64)  NULL,
    first_seen      DATETIME(6)  NOT NULL,
    last_heartbeat  DATETIME(6)  NOT NULL,               -- the database's clock, UTC
    broker_lost_at  DATETIME(6)  NULL,                   -- no broker connection since
    PRIMARY KEY (hostname),
    INDEX ix_agent_states_last_heartbeat (last_heartbeat)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
