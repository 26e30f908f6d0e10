"""The postgres backend's schema: versioned migrations, applied at start in one transaction holding an
advisory lock, so replicas starting together apply each exactly once."""

from __future__ import annotations

# Any fixed 64-bit number: the advisory lock the migrations run under.
MIGRATION_LOCK = 0x61676E7473706163

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE sessions (
            id text PRIMARY KEY,
            title text,
            model text,
            created_at text NOT NULL,
            last_activity_at text NOT NULL,
            message_count integer NOT NULL DEFAULT 0,
            client text
        );
        CREATE INDEX sessions_activity ON sessions (last_activity_at DESC, created_at DESC, id DESC);
        CREATE TABLE messages (
            session_id text NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            seq integer NOT NULL,
            id text NOT NULL,
            body text NOT NULL,
            PRIMARY KEY (session_id, seq)
        );
        CREATE INDEX messages_id ON messages (session_id, id);
        CREATE TABLE usage_records (
            id text NOT NULL,
            ts timestamptz NOT NULL,
            model text NOT NULL,
            client text,
            session_id text,
            input_tokens bigint NOT NULL,
            output_tokens bigint NOT NULL,
            total_tokens bigint NOT NULL,
            cache_read_tokens bigint NOT NULL,
            cache_write_tokens bigint NOT NULL,
            reasoning_tokens bigint NOT NULL,
            total_cost double precision NOT NULL,
            answered boolean NOT NULL,
            is_error boolean NOT NULL,
            estimated boolean NOT NULL,
            price_unknown boolean NOT NULL,
            record text NOT NULL,
            PRIMARY KEY (ts, id)
        ) PARTITION BY RANGE (ts);
        CREATE INDEX usage_model ON usage_records (model, ts);
        CREATE INDEX usage_client ON usage_records (client, ts);
        CREATE INDEX usage_session ON usage_records (session_id, ts);
        """,
    ),
    (
        2,
        """
        CREATE TABLE clients (
            name text PRIMARY KEY,
            key_hash text NOT NULL UNIQUE,
            stored text NOT NULL
        );
        """,
    ),
    (
        3,
        # Usage rollups: the records' totals per (UTC day, model, client, session, endpoint), kept in the same
        # transaction as the inserts (``_INSERT``), so reports read groups instead of records. '' stands for
        # none (client, session, endpoint), as primary keys cannot hold NULL. Filled from what is stored.
        """
        CREATE TABLE usage_rollups (
            day date NOT NULL,
            model text NOT NULL,
            client text NOT NULL,
            session_id text NOT NULL,
            endpoint text NOT NULL,
            input_tokens bigint NOT NULL,
            output_tokens bigint NOT NULL,
            total_tokens bigint NOT NULL,
            cache_read_tokens bigint NOT NULL,
            cache_write_tokens bigint NOT NULL,
            reasoning_tokens bigint NOT NULL,
            total_cost double precision NOT NULL,
            answered bigint NOT NULL,
            errors bigint NOT NULL,
            estimated bigint NOT NULL,
            price_unknown boolean NOT NULL,
            PRIMARY KEY (day, model, client, session_id, endpoint)
        );
        INSERT INTO usage_rollups
        SELECT (ts AT TIME ZONE 'UTC')::date, model, coalesce(client, ''), coalesce(session_id, ''),
               coalesce(record::json->>'endpoint', ''),
               sum(input_tokens), sum(output_tokens), sum(total_tokens), sum(cache_read_tokens),
               sum(cache_write_tokens), sum(reasoning_tokens), sum(total_cost), count(*) FILTER (WHERE answered),
               count(*) FILTER (WHERE is_error), count(*) FILTER (WHERE estimated), bool_or(price_unknown)
        FROM usage_records GROUP BY 1, 2, 3, 4, 5;
        """,
    ),
    (
        4,
        # Server-tool fees (web search, ...: part of total_cost) and their uses, a column of their own in the
        # reports: on the records, recomputed from the stored ones (the JSON keeps ``serverToolCost`` and
        # ``serverToolUse``), and on the rollups, summed from those records.
        """
        ALTER TABLE usage_records ADD COLUMN server_tool_cost double precision NOT NULL DEFAULT 0,
            ADD COLUMN server_tool_uses bigint NOT NULL DEFAULT 0;
        UPDATE usage_records SET
            server_tool_cost = coalesce((record::json->>'serverToolCost')::double precision, 0),
            server_tool_uses = (
                SELECT coalesce(sum(value::text::bigint), 0)
                FROM json_each(CASE WHEN json_typeof(record::json->'serverToolUse') = 'object'
                                    THEN record::json->'serverToolUse' END)
                WHERE json_typeof(value) = 'number' AND value::text ~ '^-?[0-9]+$'
            )
        WHERE record LIKE '%"serverTool%';
        ALTER TABLE usage_rollups ADD COLUMN server_tool_cost double precision NOT NULL DEFAULT 0,
            ADD COLUMN server_tool_uses bigint NOT NULL DEFAULT 0;
        UPDATE usage_rollups r SET server_tool_cost = s.cost, server_tool_uses = s.uses
        FROM (
            SELECT (ts AT TIME ZONE 'UTC')::date AS day, model, coalesce(client, '') AS client,
                   coalesce(session_id, '') AS session_id, coalesce(record::json->>'endpoint', '') AS endpoint,
                   sum(server_tool_cost) AS cost, sum(server_tool_uses) AS uses
            FROM usage_records WHERE server_tool_cost <> 0 OR server_tool_uses <> 0 GROUP BY 1, 2, 3, 4, 5
        ) s
        WHERE r.day = s.day AND r.model = s.model AND r.client = s.client AND r.session_id = s.session_id
            AND r.endpoint = s.endpoint;
        """,
    ),
    (
        5,
        # The bytes of the sessions' files, once per SHA-256, and the sessions using each (storage/postgres/blobs.py).
        """
        CREATE TABLE blobs (sha256 text PRIMARY KEY, size bigint NOT NULL, data bytea NOT NULL);
        CREATE TABLE blob_refs (
            sha256 text NOT NULL REFERENCES blobs ON DELETE CASCADE,
            session_id text NOT NULL,
            PRIMARY KEY (sha256, session_id)
        );
        CREATE INDEX blob_refs_session ON blob_refs (session_id);
        """,
    ),
    (
        6,
        # Every insert updates its rollup row, and PostgreSQL writes each update as a new row version. With full
        # pages the new version lands on another page, and the table grows by a row per record until a vacuum
        # (112 MB for 7,000 rows after a million records: a report scanned all of it). Pages half full let the
        # update stay on its page (a HOT update: the rollup's key columns never change), where the old version
        # is pruned as the page is next used, so the table stays the size of its rows. A table already grown is
        # rewritten here, its rows only, at the new fill (CLUSTER, unlike VACUUM FULL, runs in the migration's
        # transaction; it holds the table for the time of a copy of its rows, once).
        """
        ALTER TABLE usage_rollups SET (fillfactor = 50);
        CLUSTER usage_rollups USING usage_rollups_pkey;
        """,
    ),
    (
        7,
        # The recovered estimates stored (storage/postgres/usage.py): their ids and times. The records' key is
        # (ts, id), and an estimate carries the call's start, its record as reported the call's end, so the key
        # alone does not keep them from being stored both; every insert looks its ids up here (a small table),
        # and a reported record takes its estimate's place.
        """
        CREATE TABLE usage_recovered (id text PRIMARY KEY, ts timestamptz NOT NULL);
        INSERT INTO usage_recovered
        SELECT id, min(ts) FROM usage_records
        WHERE record LIKE '%"recovered": true%' AND (record::json->>'recovered')::boolean
        GROUP BY id;
        """,
    ),
    (
        8,
        # The rollups merged without the session: per (UTC day, model, client, endpoint), kept by the same
        # statements as ``usage_rollups``. A client that makes each call a session of its own makes as many
        # ``usage_rollups`` rows as records; the reports that neither group by session nor filter on one (by
        # model, day, client, ..., and a budget's spend) read these, whose rows are the groups. Half-full pages
        # for the reason of migration 6. Filled from ``usage_rollups``.
        """
        CREATE TABLE usage_rollups_nosession (
            day date NOT NULL,
            model text NOT NULL,
            client text NOT NULL,
            endpoint text NOT NULL,
            input_tokens bigint NOT NULL,
            output_tokens bigint NOT NULL,
            total_tokens bigint NOT NULL,
            cache_read_tokens bigint NOT NULL,
            cache_write_tokens bigint NOT NULL,
            reasoning_tokens bigint NOT NULL,
            total_cost double precision NOT NULL,
            answered bigint NOT NULL,
            errors bigint NOT NULL,
            estimated bigint NOT NULL,
            price_unknown boolean NOT NULL,
            server_tool_cost double precision NOT NULL,
            server_tool_uses bigint NOT NULL,
            PRIMARY KEY (day, model, client, endpoint)
        ) WITH (fillfactor = 50);
        INSERT INTO usage_rollups_nosession
        SELECT day, model, client, endpoint, sum(input_tokens), sum(output_tokens), sum(total_tokens),
               sum(cache_read_tokens), sum(cache_write_tokens), sum(reasoning_tokens), sum(total_cost),
               sum(answered), sum(errors), sum(estimated), bool_or(price_unknown), sum(server_tool_cost),
               sum(server_tool_uses)
        FROM usage_rollups GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4;
        """,
    ),
    (
        9,
        # How many records each rollup row sums (answered or not): a row whose last record goes (an estimate
        # replaced by its call's record in another group) is deleted, not left at zero, so the reports show the
        # groups the records make, as the embedded store's do. Counted from the records; the rows left at zero by
        # earlier versions, which sum none, go.
        """
        ALTER TABLE usage_rollups ADD COLUMN records bigint NOT NULL DEFAULT 0;
        ALTER TABLE usage_rollups_nosession ADD COLUMN records bigint NOT NULL DEFAULT 0;
        UPDATE usage_rollups r SET records = c.n
        FROM (
            SELECT (ts AT TIME ZONE 'UTC')::date AS day, model, coalesce(client, '') AS client,
                   coalesce(session_id, '') AS session_id, coalesce(record::json->>'endpoint', '') AS endpoint,
                   count(*) AS n
            FROM usage_records GROUP BY 1, 2, 3, 4, 5
        ) c
        WHERE r.day = c.day AND r.model = c.model AND r.client = c.client AND r.session_id = c.session_id
              AND r.endpoint = c.endpoint;
        DELETE FROM usage_rollups WHERE records = 0;
        UPDATE usage_rollups_nosession r SET records = c.n
        FROM (SELECT day, model, client, endpoint, sum(records) AS n FROM usage_rollups GROUP BY 1, 2, 3, 4) c
        WHERE r.day = c.day AND r.model = c.model AND r.client = c.client AND r.endpoint = c.endpoint;
        DELETE FROM usage_rollups_nosession WHERE records = 0;
        ALTER TABLE usage_rollups ALTER COLUMN records DROP DEFAULT;
        ALTER TABLE usage_rollups_nosession ALTER COLUMN records DROP DEFAULT;
        """,
    ),
    (
        10,
        # A session's message_count counts the messages its client sees: earlier versions counted the answers set
        # aside (``replaced``: a regenerate, an edit) too. Counted from the messages; the text test first: most
        # messages have no such key.
        """
        UPDATE sessions s SET message_count = c.n
        FROM (
            SELECT session_id,
                   count(*) FILTER (
                       WHERE body NOT LIKE '%"replaced"%' OR coalesce(body::json->>'replaced', '') <> 'true'
                   ) AS n
            FROM messages GROUP BY 1
        ) c
        WHERE s.id = c.session_id AND s.message_count <> c.n;
        """,
    ),
]
