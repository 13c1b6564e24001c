-- The rewarder's online reward model (core/reward_model.py). Feedback names request ids only, so
-- the rewarder joins it with the texts it is about; the model is a pure function of the ordered
-- examples below, and a snapshot of it lets a restarted rewarder resume exactly.

-- What was asked and answered per request (requests give the prompt, responses and rollouts the
-- text), whether any feedback rated it, and whether the reward model scored its rollout.
CREATE TABLE reward_texts (
    deployment    text NOT NULL,               -- topic prefix
    request_id    text NOT NULL,
    user_id       text NOT NULL,
    tenant_id     text NOT NULL DEFAULT 'default',
    prompt        text,
    response      text,
    model         text,
    model_version text,
    rollout_at    timestamptz,                 -- a Rollout of it arrived: it may need a model reward
    rated         boolean NOT NULL DEFAULT false,  -- feedback rewarded it: the model never scores it
    scored_at     timestamptz,                 -- the reward model scored it
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (deployment, request_id)
);
CREATE INDEX reward_texts_unscored ON reward_texts (deployment, rollout_at)
    WHERE rollout_at IS NOT NULL AND NOT rated AND scored_at IS NULL;
CREATE INDEX reward_texts_updated ON reward_texts (updated_at);

-- One row per feedback event that says something about quality, in the order the rewarder read
-- the (single-partition) feedback topic. ``waiting`` rows wait for their texts; the first process
-- to decide a row (``joined`` with its features, or ``unjoinable`` with the reason) wins, and the
-- model folds rows strictly in ``seq`` order, so every replica and every restart agrees.
CREATE TABLE reward_examples (
    deployment  text        NOT NULL,          -- topic prefix: one model per deployment
    feedback_id text        NOT NULL,
    seq         bigserial   NOT NULL,
    label       jsonb       NOT NULL,          -- core.reward_model.Label
    status      text        NOT NULL DEFAULT 'waiting' CHECK (status IN ('waiting', 'joined', 'unjoinable')),
    features    bytea,                         -- float32 features of the example (joined rows)
    scope       text        NOT NULL DEFAULT '', -- the model behind all its responses ('' across models)
    reason      text,                          -- why a row is unjoinable
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (deployment, feedback_id)
);
CREATE UNIQUE INDEX reward_examples_order ON reward_examples (deployment, seq);

-- The model's snapshot (core.reward_model.RewardModel.state) after the row ``last_seq``, and the
-- figures the dashboard shows.
CREATE TABLE reward_model_state (
    deployment text PRIMARY KEY,
    last_seq   bigint  NOT NULL DEFAULT 0,
    snapshot   jsonb,
    accuracy   double precision,               -- balanced held-out accuracy (NULL: not enough held out)
    heldout    integer NOT NULL DEFAULT 0,
    examples   bigint  NOT NULL DEFAULT 0,     -- examples folded (trained + held out)
    skipped    bigint  NOT NULL DEFAULT 0,     -- unjoinable rows
    scored     bigint  NOT NULL DEFAULT 0,     -- rollouts the model scored
    usable     boolean NOT NULL DEFAULT false, -- it scores some model's rollouts (see per_model)
    per_model  jsonb   NOT NULL DEFAULT '{}',  -- model -> {accuracy, heldout, usable}: the gate per model
    threshold  double precision,
    updated_at timestamptz NOT NULL DEFAULT now()
);
