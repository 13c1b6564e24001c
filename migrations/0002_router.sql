-- Eagle router state. Ratings are a pure function of the ordered feedback stream; the snapshot
-- and the offset of the last feedback applied are written in one transaction, so a restarted
-- router resumes exactly after that offset (no feedback applied twice or skipped).
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE router_state (
    router_name     text PRIMARY KEY,
    snapshot        jsonb  NOT NULL,
    feedback_offset bigint NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Prompt embeddings of routed requests, so feedback that arrives later can be placed in the
-- nearest-neighbour index even when it does not repeat the prompt.
CREATE TABLE request_embeddings (
    request_id text PRIMARY KEY,
    embedding  vector(384) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One row per feedback event applied: its comparisons and the prompt embedding. The router's
-- in-memory nearest-neighbour index is rebuilt from this table at start.
CREATE TABLE router_feedback (
    router_name     text   NOT NULL,
    feedback_offset bigint NOT NULL,
    feedback_id     text   NOT NULL,
    request_id      text   NOT NULL,
    embedding       vector(384),
    comparisons     jsonb  NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (router_name, feedback_offset)
);
