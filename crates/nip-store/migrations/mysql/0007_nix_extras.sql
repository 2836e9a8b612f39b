-- The rest of the Nix binary cache protocol: NAR listings (<hash>.ls), build logs (log/<drv>),
-- realisations (realisations/<id>.doi, build-trace-v2/<drv>/<output>) and debug info
-- (debuginfo/<build-id>). Bytes live in blob
-- storage under a prefix per kind, kept as sent (content_encoding says how they are compressed).
CREATE TABLE nix_extras (
    kind             VARCHAR(32) NOT NULL,   -- 'ls', 'log', 'realisation', 'debuginfo', 'build-trace'
    name             VARCHAR(512) NOT NULL,  -- hash, drv basename, realisation id or build id
    size             BIGINT NOT NULL,
    sha256           VARCHAR(128) NOT NULL,  -- hex of the stored bytes
    content_type     VARCHAR(255) NOT NULL,
    content_encoding VARCHAR(64),
    origin           VARCHAR(1024) NOT NULL, -- upstream base URL, 'upload' or 'generated'
    uploaded_by      VARCHAR(255),
    created_at       BIGINT NOT NULL,
    last_accessed_at BIGINT NOT NULL,
    PRIMARY KEY (kind, name),
    INDEX nix_extras_last_accessed (last_accessed_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
