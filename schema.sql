-- svcmgr database schema (MySQL 5.7+ / MariaDB 10.3+). Applied by `svcmgr.py db init`,
-- checked by `svcmgr.py db check`. Every statement is idempotent, so applying it again
-- on a live database changes nothing. Times are the node's local time, as in records/.

-- One row per speechID: inserted when the task is accepted, updated as it moves, final
-- once finished_at is set. `id` is the task's seq in 3001 when the database is up.
CREATE TABLE IF NOT EXISTS task (
    id                  BIGINT UNSIGNED  NOT NULL AUTO_INCREMENT,
    -- Binary collation: speechIDs are case-sensitive names, 'A1' and 'a1' are two tasks.
    speech_id           VARCHAR(64)      CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    node                VARCHAR(128)     NOT NULL,
    server_seq          INT UNSIGNED     NULL,
    seq                 BIGINT UNSIGNED  NULL COMMENT 'seq sent in 3001 (a per-day number when the row id was unknown)',
    source              VARCHAR(16)      NOT NULL COMMENT 'client or scanner',
    domain_name         VARCHAR(255)     NULL,
    domain_code         VARCHAR(255)     NULL,
    file_id             TEXT             NULL,
    file_name           TEXT             NULL,
    file_path           TEXT             NULL,
    audio_path          TEXT             NULL,
    audio_wav           VARCHAR(1024)    NULL,
    audio_mp3           VARCHAR(1024)    NULL,
    channels            TINYINT UNSIGNED NULL,
    duration            DOUBLE           NULL COMMENT 'seconds of audio',
    state               VARCHAR(16)      NOT NULL,
    result              VARCHAR(2)       NULL COMMENT 'result code, NULL while running',
    message             TEXT             NULL,
    transcript          MEDIUMTEXT       NULL,
    channel_transcripts JSON             NULL COMMENT '[{"channel": "A", "transcript": "..."}]',
    timings             JSON             NULL COMMENT '[{"mark": "TRANSCRIBE_START", "secs": 0.0}, ...]',
    elapsed_secs        DOUBLE           NULL,
    worker              SMALLINT UNSIGNED NULL,
    request             JSON             NULL COMMENT 'request fields without a column of their own',
    created_at          DATETIME(6)      NOT NULL COMMENT 'accepted',
    started_at          DATETIME(6)      NULL COMMENT 'a worker took it',
    finished_at         DATETIME(6)      NULL COMMENT 'ended (set = the row is final)',
    state_at            DATETIME(6)      NULL COMMENT 'time of the state stored; keeps updates monotonic',
    updated_at          DATETIME(6)      NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    UNIQUE KEY uq_task_speech_id (speech_id),
    KEY ix_task_node_created (node, created_at),
    KEY ix_task_state (state),
    KEY ix_task_finished (finished_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- One row per Service Manager node, refreshed every monitor_interval_secs.
CREATE TABLE IF NOT EXISTS node_status (
    node                VARCHAR(128)     NOT NULL,
    server_seq          INT UNSIGNED     NULL,
    version             VARCHAR(64)      NULL,
    pid                 INT UNSIGNED     NULL,
    status              VARCHAR(16)      NOT NULL COMMENT 'running or stopped',
    engine_type         VARCHAR(32)      NULL,
    engine_up           TINYINT(1)       NOT NULL,
    workers             SMALLINT UNSIGNED NULL,
    tasks_running       INT UNSIGNED     NOT NULL,
    tasks_queued        INT UNSIGNED     NOT NULL,
    max_tasks           INT UNSIGNED     NULL,
    cpu_percent         DOUBLE           NULL COMMENT '100 - idle',
    cpu                 JSON             NULL COMMENT '{"user", "system", "idle", "nice"} percent',
    mem_total           BIGINT UNSIGNED  NULL,
    mem_available       BIGINT UNSIGNED  NULL,
    mem_percent         DOUBLE           NULL,
    disks               JSON             NULL COMMENT 'as in Monitor (2003) "disk"',
    db_queue            INT UNSIGNED     NULL COMMENT 'events waiting for the database writer',
    db_spooled          INT UNSIGNED     NULL COMMENT 'events in records/db-spool.jsonl',
    started_at          DATETIME(6)      NULL,
    updated_at          DATETIME(6)      NOT NULL,
    PRIMARY KEY (node)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- One row per segment (an utterance of one channel) of a finished task, written in the same
-- transaction as the task's final row and replayed from the spool with it; a replay rewrites
-- the same rows (key: task_id, seq). Words as JSON: [{"word", "start", "end", "confidence"}].
CREATE TABLE IF NOT EXISTS task_segment (
    task_id             BIGINT UNSIGNED  NOT NULL COMMENT 'task.id',
    seq                 INT UNSIGNED     NOT NULL COMMENT 'order by start time across channels, from 1',
    speech_id           VARCHAR(64)      CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    channel             CHAR(1)          NOT NULL COMMENT 'A (left or mono) or B (right)',
    start_secs          DOUBLE           NOT NULL COMMENT 'seconds from the start of the source file',
    end_secs            DOUBLE           NOT NULL,
    text                TEXT             NOT NULL,
    confidence          DOUBLE           NULL COMMENT '0..1, NULL when the engine gives none',
    low_confidence      TINYINT(1)       NOT NULL DEFAULT 0 COMMENT 'below [task] low_confidence',
    words               JSON             NULL,
    PRIMARY KEY (task_id, seq),
    KEY ix_task_segment_speech_id (speech_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Cluster mode ([cluster] enabled): one row per task of the cluster while it is in the broker's
-- queue or running, kept once final (its answer, for a redelivered message). The primary key
-- makes a speechID unique across every node; `token` tells this task from an older one that
-- used the same speechID (a final row is taken over by the next task of that speechID).
CREATE TABLE IF NOT EXISTS cluster_task (
    speech_id           VARCHAR(64)      CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    token               CHAR(32)         NOT NULL COMMENT 'this task, as published',
    origin_node         VARCHAR(128)     NOT NULL COMMENT 'the node holding the client',
    origin_token        CHAR(32)         NULL COMMENT 'the life of origin_node that entered it',
    message             MEDIUMTEXT       NULL COMMENT 'the message published, for a live node to publish again',
    run_node            VARCHAR(128)     NULL,
    run_token           CHAR(32)         NULL COMMENT 'the life (cluster_node.token) of run_node running it',
    state               VARCHAR(16)      NOT NULL COMMENT 'queued, running or final',
    attempts            INT UNSIGNED     NOT NULL DEFAULT 0 COMMENT 'runs started',
    source              VARCHAR(16)      NOT NULL,
    answer              MEDIUMTEXT       NULL COMMENT 'the 2002 body (JSON) once final',
    created_at          DATETIME(6)      NOT NULL,
    updated_at          DATETIME(6)      NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    PRIMARY KEY (speech_id),
    KEY ix_cluster_task_state (state, run_node)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Cluster mode: one row per node, its heartbeat written on the database's clock (alive_at), so
-- nodes with skewed clocks agree on who is alive. A new `token` at each start of the node.
CREATE TABLE IF NOT EXISTS cluster_node (
    node                VARCHAR(128)     NOT NULL,
    token               CHAR(32)         NOT NULL,
    pid                 INT UNSIGNED     NULL,
    status              VARCHAR(16)      NOT NULL COMMENT 'running or stopped',
    broker_up           TINYINT(1)       NOT NULL,
    capacity            INT UNSIGNED     NOT NULL COMMENT 'tasks it takes from the queue at once (prefetch)',
    running             INT UNSIGNED     NOT NULL COMMENT 'tasks of the queue running here',
    waiting             INT UNSIGNED     NOT NULL COMMENT 'tasks admitted here whose answer is not back',
    started_at          DATETIME(6)      NOT NULL,
    alive_at            DATETIME(6)      NOT NULL,
    PRIMARY KEY (node)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
