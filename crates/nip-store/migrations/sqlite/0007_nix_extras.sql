-- The rest of the Nix binary cache protocol: NAR listings (<hash>.ls), build logs (log/<drv>),
-- realisations (realisations/<id>.doi, build-trace-v2/<drv>/<output>) and debug info
-- (debuginfo/<build-id>). Bytes live in blob
-- storage under a prefix per kind, kept as sent (content_encoding says how they are compressed).
CREATE TABLE nix_extras (
    kind             TEXT NOT NULL,         -- 'ls', 'log', 'realisation', 'debuginfo', 'build-trace'
    name             TEXT NOT NULL,         -- hash, drv basename, realisation id or build id
    size             INTEGER NOT NULL,
    sha256           TEXT NOT NULL,         -- hex of the stored bytes
    content_type     TEXT NOT NULL,
    content_encoding TEXT,
    origin           TEXT NOT NULL,         -- upstream base URL, 'upload' or 'generated'
    uploaded_by      TEXT,
    created_at       INTEGER NOT NULL,
    last_accessed_at INTEGER NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE INDEX nix_extras_last_accessed ON nix_extras (last_accessed_at);
