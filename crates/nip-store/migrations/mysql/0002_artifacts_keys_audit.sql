-- /v1 artifacts. Bytes live in blob storage under artifacts/<sha256>, shared by identical uploads.
CREATE TABLE artifacts (
    `key`            VARCHAR(255) NOT NULL PRIMARY KEY,
    size             BIGINT NOT NULL,
    sha256           VARCHAR(128) NOT NULL,
    metadata         LONGTEXT NOT NULL,     -- the JSON object as uploaded
    name             TEXT,                  -- metadata.name, for search (never read back)
    version          TEXT,                  -- metadata.version, for search (never read back)
    created_at       BIGINT NOT NULL,
    last_accessed_at BIGINT NOT NULL,
    INDEX artifacts_name_version (name(255), version(255), created_at),
    INDEX artifacts_sha256 (sha256),
    INDEX artifacts_last_accessed (last_accessed_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- API keys: only a SHA-256 of the token is stored.
CREATE TABLE api_keys (
    name        VARCHAR(255) NOT NULL PRIMARY KEY,
    token_hash  VARCHAR(128) NOT NULL UNIQUE,
    scope       VARCHAR(16) NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    prefix      VARCHAR(255),
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    revoked_at  BIGINT
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Every write, delete, key change and authentication failure. Never holds a token.
CREATE TABLE audit_log (
    id          BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    at          BIGINT NOT NULL,
    key_name    VARCHAR(255),
    remote_addr VARCHAR(255),
    action      VARCHAR(255) NOT NULL,
    target      VARCHAR(2048),
    size        BIGINT,
    sha256      VARCHAR(128),
    result      VARCHAR(255) NOT NULL,
    INDEX audit_log_at (at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
