-- Embedded schema registry: the default when no Confluent-compatible registry is configured.
-- Ids are global and stable; a subject's versions are numbered from 1 like the Confluent API.
CREATE TABLE registry_schemas (
    id          serial PRIMARY KEY,
    fingerprint text   NOT NULL UNIQUE,   -- sha256 of the canonical schema text
    schema      text   NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE registry_subject_versions (
    subject    text    NOT NULL,
    version    integer NOT NULL,
    schema_id  integer NOT NULL REFERENCES registry_schemas (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, version),
    UNIQUE (subject, schema_id)
);

CREATE TABLE registry_config (
    subject       text PRIMARY KEY,        -- '' holds the global default
    compatibility text NOT NULL
);

INSERT INTO registry_config (subject, compatibility) VALUES ('', 'BACKWARD');
