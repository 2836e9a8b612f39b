-- /v1 artifacts. Bytes live in blob storage under artifacts/<sha256>, shared by identical uploads.
CREATE TABLE artifacts (
    key              TEXT PRIMARY KEY NOT NULL,
    size             BIGINT NOT NULL,
    sha256           TEXT NOT NULL,
    metadata         TEXT NOT NULL,         -- the JSON object as uploaded
    name             TEXT,                  -- metadata.name, for search
    version          TEXT,                  -- metadata.version, for search
    created_at       BIGINT NOT NULL,
    last_accessed_at BIGINT NOT NULL
);
CREATE INDEX artifacts_name_version ON artifacts (name, version, created_at);
CREATE INDEX artifacts_sha256 ON artifacts (sha256);
CREATE INDEX artifacts_last_accessed ON artifacts (last_accessed_at);

-- API keys: only a SHA-256 of the token is stored.
CREATE TABLE api_keys (
    name        TEXT PRIMARY KEY NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    scope       TEXT NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    prefix      TEXT,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    revoked_at  BIGINT
);

-- Every write, delete, key change and authentication failure. Never holds a token.
CREATE TABLE audit_log (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          BIGINT NOT NULL,
    key_name    TEXT,
    remote_addr TEXT,
    action      TEXT NOT NULL,
    target      TEXT,
    size        BIGINT,
    sha256      TEXT,
    result      TEXT NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
