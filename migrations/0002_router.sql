-- Eagle router state. The ratings are a pure function of the ordered feedback stream: every
-- feedback event the router applies is journalled here with its offset, in the same transaction
-- as the router's offset, so a restarted router replays the journal (from the last snapshot)
-- and resumes exactly after that offset: no feedback applied twice, none skipped.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE router_state (
    router_name     text PRIMARY KEY,
    feedback_offset bigint NOT NULL,            -- last feedback offset applied (-1: none)
    snapshot        jsonb,                      -- RouterState at snapshot_offset (speeds up restarts)
    snapshot_offset bigint NOT NULL DEFAULT -1,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The journal: one row per feedback event applied, with the inputs the router used.
CREATE TABLE router_feedback (
    router_name     text   NOT NULL,
    feedback_offset bigint NOT NULL,
    feedback_id     text   NOT NULL,
    prompt_key      text   NOT NULL,
    embedding       vector(384),                -- set on the first feedback for a prompt key
    feedback        jsonb  NOT NULL,            -- core.routing.state.RouterFeedback
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (router_name, feedback_offset)
);

-- Prompt embeddings of routed requests, so feedback that arrives later (and does not repeat the
-- prompt) can be placed among its nearest neighbours.
CREATE TABLE request_embeddings (
    request_id text PRIMARY KEY,
    prompt_key text NOT NULL,
    embedding  vector(384) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
