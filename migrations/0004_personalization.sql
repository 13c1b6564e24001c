-- ASLS personalisation state. The personaliser agent joins Feedback to the responses it is about
-- (prompt from the request, text and adapter from the response), keeps each user's profile,
-- strategy state and training signals, and registers every adapter version it announces.

-- What each user was shown: filled by two streams (requests give the prompt, responses the text),
-- so a feedback event can be turned into training signals without re-reading the topics.
CREATE TABLE personalizer_shown (
    request_id      text PRIMARY KEY,
    user_id         text NOT NULL,
    prompt          text,
    response        text,
    model           text,
    adapter_version text,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX personalizer_shown_updated ON personalizer_shown (updated_at);

-- One row per user: core.personalization.online.UserState as JSON.
CREATE TABLE personalizer_users (
    user_id     text PRIMARY KEY,
    state       jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Feedback events already applied (written in the same transaction as the user's state), so a
-- redelivered event is never folded twice; its adapter announcement is re-sent instead.
CREATE TABLE personalizer_applied (
    feedback_id text PRIMARY KEY,
    user_id     text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- The adapter registry: every version ever announced per user (rollbacks included). Versions are
-- never reused; the hash names the weights, the uri says where the files are.
CREATE TABLE adapters (
    user_id      text    NOT NULL,
    version      integer NOT NULL,
    adapter_hash text    NOT NULL,
    base_model   text    NOT NULL,
    uri          text    NOT NULL,
    parent_hash  text,
    rollback     boolean NOT NULL DEFAULT false,
    metrics      jsonb   NOT NULL DEFAULT '{}',
    feedback_id  text,                          -- the feedback event that triggered it (NULL: operator)
    event        jsonb   NOT NULL,              -- the AdapterPublished event, re-sent verbatim on replay
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, version)
);
CREATE INDEX adapters_feedback ON adapters (feedback_id);
