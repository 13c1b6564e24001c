-- Version pinning and CoMiGS rounds for the personaliser.

-- Every adapter records the base version it was trained on (workers serve it on that version only).
ALTER TABLE adapters ADD COLUMN base_version text NOT NULL DEFAULT 'base';

-- CoMiGS rounds: each row is one aggregation of users' generalist experts (uniform average), the
-- generalists every user's next mixture update starts from. Round numbers only grow.
CREATE TABLE comigs_rounds (
    round           integer PRIMARY KEY,
    generalist_hash text    NOT NULL,
    uri             text    NOT NULL,
    users           jsonb   NOT NULL,             -- the users whose generalists were averaged
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Each user's latest trained mixture, with the round whose generalists it started from: a round
-- averages the contributions of the current round once enough distinct users have one.
CREATE TABLE comigs_contributions (
    user_id     text PRIMARY KEY,
    mixture_uri text    NOT NULL,
    round       integer NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
