-- OpsCD's schema, generated from its migrations (cicd/migrations) by:
--   cicd migrate --sql > sql/schema.sql
-- Apply it to an empty MariaDB/MySQL database: mysql opscd < sql/schema.sql
-- To upgrade a database in place, run `cicd migrate` (it keeps every row).
CREATE TABLE alembic_version (
    version_num VARCHAR(32) NOT NULL,
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);

-- Running upgrade  -> 0001

CREATE TABLE agent_states (
    hostname VARCHAR(255) NOT NULL,
    online BOOL NOT NULL,
    concurrency INTEGER NOT NULL,
    active INTEGER NOT NULL,
    processed BIGINT NOT NULL,
    loadavg VARCHAR(64),
    sw_version VARCHAR(64),
    first_seen DATETIME(6) NOT NULL,
    last_heartbeat DATETIME(6) NOT NULL,
    PRIMARY KEY (hostname)
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

CREATE INDEX ix_agent_states_last_heartbeat ON agent_states (last_heartbeat);

CREATE TABLE project_secrets (
    project VARCHAR(255) NOT NULL,
    name VARCHAR(128) NOT NULL,
    ciphertext MEDIUMTEXT NOT NULL,
    created_at DATETIME(6) NOT NULL,
    updated_at DATETIME(6) NOT NULL,
    PRIMARY KEY (project, name)
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

CREATE TABLE task_details (
    id BIGINT NOT NULL AUTO_INCREMENT,
    forge VARCHAR(32) NOT NULL,
    delivery_id VARCHAR(128),
    project VARCHAR(255) NOT NULL,
    clone_url VARCHAR(1024) NOT NULL,
    web_url VARCHAR(1024),
    ref_type ENUM('branch','tag') NOT NULL,
    ref_name VARCHAR(255) NOT NULL,
    commit_sha VARCHAR(64) NOT NULL,
    before_sha VARCHAR(64),
    commit_message TEXT,
    commit_author VARCHAR(255),
    pusher VARCHAR(255),
    retry_of BIGINT,
    created_at DATETIME(6) NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY(retry_of) REFERENCES task_details (id) ON DELETE SET NULL,
    CONSTRAINT uq_task_details_delivery UNIQUE (forge, delivery_id)
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

CREATE INDEX ix_task_details_project_ref ON task_details (project, ref_name);

CREATE TABLE task_approvals (
    task_id BIGINT NOT NULL,
    node VARCHAR(255) NOT NULL,
    context MEDIUMTEXT NOT NULL,
    requested_at DATETIME(6) NOT NULL,
    decision ENUM('approved','rejected'),
    decided_by VARCHAR(255),
    decided_at DATETIME(6),
    PRIMARY KEY (task_id),
    FOREIGN KEY(task_id) REFERENCES task_details (id) ON DELETE CASCADE
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

CREATE TABLE task_logs (
    id BIGINT NOT NULL AUTO_INCREMENT,
    task_id BIGINT NOT NULL,
    stage ENUM('clone','build','publish'),
    created_at DATETIME(6) NOT NULL,
    content MEDIUMTEXT NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY(task_id) REFERENCES task_details (id) ON DELETE CASCADE
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

CREATE INDEX ix_task_logs_task ON task_logs (task_id, id);

CREATE TABLE task_stages (
    task_id BIGINT NOT NULL,
    stage ENUM('clone','build','publish') NOT NULL,
    state ENUM('running','success','failed','skipped','canceled') NOT NULL,
    worker VARCHAR(255),
    started_at DATETIME(6) NOT NULL,
    finished_at DATETIME(6),
    PRIMARY KEY (task_id, stage),
    FOREIGN KEY(task_id) REFERENCES task_details (id) ON DELETE CASCADE
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

CREATE TABLE task_states (
    task_id BIGINT NOT NULL,
    state ENUM('queued','running','waiting','success','failed','canceled') NOT NULL,
    stage ENUM('clone','build','publish'),
    worker VARCHAR(255),
    queued_at DATETIME(6) NOT NULL,
    enqueued_at DATETIME(6),
    started_at DATETIME(6),
    finished_at DATETIME(6),
    exit_code INTEGER,
    error TEXT,
    attempt INTEGER NOT NULL DEFAULT '1',
    image VARCHAR(512),
    image_digest VARCHAR(100),
    updated_at DATETIME(6) NOT NULL,
    PRIMARY KEY (task_id),
    FOREIGN KEY(task_id) REFERENCES task_details (id) ON DELETE CASCADE
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

CREATE INDEX ix_task_states_state ON task_states (state);

INSERT INTO alembic_version (version_num) VALUES ('0001');

-- Running upgrade 0001 -> 0002

ALTER TABLE task_logs ADD COLUMN attempt INTEGER NOT NULL DEFAULT '1';

ALTER TABLE agent_states ADD COLUMN broker_lost_at DATETIME(6);

UPDATE alembic_version SET version_num='0002' WHERE alembic_version.version_num = '0001';

-- Running upgrade 0002 -> 0003

CREATE TABLE projects (
    id BIGINT NOT NULL AUTO_INCREMENT,
    path VARCHAR(255) NOT NULL,
    forge VARCHAR(32) NOT NULL,
    forge_project_id BIGINT,
    clone_url VARCHAR(1024) NOT NULL,
    webhook_secret_sha256 VARCHAR(64) NOT NULL,
    git_username VARCHAR(255),
    git_password_ciphertext TEXT,
    protected_refs VARCHAR(1024) NOT NULL,
    approval_refs VARCHAR(1024) NOT NULL,
    created_at DATETIME(6) NOT NULL,
    updated_at DATETIME(6) NOT NULL,
    PRIMARY KEY (id),
    UNIQUE (path)
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

UPDATE alembic_version SET version_num='0003' WHERE alembic_version.version_num = '0002';

-- Running upgrade 0003 -> 0004

CREATE TABLE agents (
    name VARCHAR(32) NOT NULL,
    account VARCHAR(64) NOT NULL,
    token_sha256 VARCHAR(64) NOT NULL,
    enabled BOOL NOT NULL,
    created_at DATETIME(6) NOT NULL,
    disabled_at DATETIME(6),
    revoked_at DATETIME(6),
    PRIMARY KEY (name),
    UNIQUE (account)
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

ALTER TABLE agent_states ADD COLUMN agent VARCHAR(32);

UPDATE alembic_version SET version_num='0004' WHERE alembic_version.version_num = '0003';

-- Running upgrade 0004 -> 0005

ALTER TABLE projects ADD COLUMN api_url VARCHAR(1024);

ALTER TABLE projects ADD COLUMN api_token_ciphertext TEXT;

CREATE TABLE commit_statuses (
    id BIGINT NOT NULL AUTO_INCREMENT,
    task_id BIGINT NOT NULL,
    unit VARCHAR(64) NOT NULL,
    state VARCHAR(16) NOT NULL,
    description VARCHAR(255) NOT NULL,
    created_at DATETIME(6) NOT NULL,
    tries INTEGER NOT NULL,
    next_try_at DATETIME(6),
    delivered_at DATETIME(6),
    outcome VARCHAR(16),
    last_error TEXT,
    PRIMARY KEY (id),
    FOREIGN KEY(task_id) REFERENCES task_details (id) ON DELETE CASCADE
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

CREATE INDEX ix_commit_statuses_task ON commit_statuses (task_id, id);

CREATE INDEX ix_commit_statuses_undelivered ON commit_statuses (delivered_at, id);

UPDATE alembic_version SET version_num='0005' WHERE alembic_version.version_num = '0004';

-- Running upgrade 0005 -> 0006

ALTER TABLE task_details ADD COLUMN merge_request_iid BIGINT;

ALTER TABLE task_details ADD COLUMN target_project VARCHAR(255);

ALTER TABLE task_details ADD COLUMN fork_of VARCHAR(255);

ALTER TABLE task_details ADD COLUMN head_ref VARCHAR(255);

ALTER TABLE projects ADD COLUMN fork_mrs VARCHAR(16) NOT NULL DEFAULT 'off';

ALTER TABLE projects ADD COLUMN webhook_secret_ciphertext TEXT;

UPDATE alembic_version SET version_num='0006' WHERE alembic_version.version_num = '0005';

-- Running upgrade 0006 -> 0007

CREATE TABLE task_steps (
    task_id BIGINT NOT NULL,
    name VARCHAR(64) NOT NULL,
    position INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    state ENUM('queued','running','success','failed','skipped','canceled') NOT NULL,
    exit_code INTEGER,
    image VARCHAR(512),
    node VARCHAR(255),
    started_at DATETIME(6),
    finished_at DATETIME(6),
    reason TEXT,
    PRIMARY KEY (task_id, name),
    FOREIGN KEY(task_id) REFERENCES task_details (id) ON DELETE CASCADE
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

ALTER TABLE task_logs ADD COLUMN step VARCHAR(64);

ALTER TABLE task_details ADD COLUMN reuse_steps_of BIGINT;

ALTER TABLE task_details ADD CONSTRAINT fk_task_details_reuse_steps_of FOREIGN KEY(reuse_steps_of) REFERENCES task_details (id) ON DELETE SET NULL;

UPDATE alembic_version SET version_num='0007' WHERE alembic_version.version_num = '0006';

-- Running upgrade 0007 -> 0008

CREATE TABLE project_caches (
    store VARCHAR(64) NOT NULL,
    digest VARCHAR(64) NOT NULL,
    project VARCHAR(255) NOT NULL,
    cache_key VARCHAR(255) NOT NULL,
    size_bytes BIGINT NOT NULL,
    node VARCHAR(255) NOT NULL,
    task_id BIGINT,
    saved_at DATETIME(6) NOT NULL,
    used_at DATETIME(6) NOT NULL,
    PRIMARY KEY (store, digest)
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

CREATE INDEX ix_project_caches_project ON project_caches (project);

UPDATE alembic_version SET version_num='0008' WHERE alembic_version.version_num = '0007';

