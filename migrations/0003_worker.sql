-- Inference workers' dedupe ledger: a request whose final response was produced is never
-- generated again, even if its RoutingDecision is delivered twice.
CREATE TABLE final_responses (
    request_id   text PRIMARY KEY,
    user_id      text NOT NULL,
    model        text NOT NULL,
    worker_id    text NOT NULL,
    response     jsonb NOT NULL,
    completed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX final_responses_user ON final_responses (user_id);
