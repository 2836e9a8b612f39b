-- Narinfos served by this cache: the text is stored already rewritten and re-signed.
CREATE TABLE narinfos (
    hash            TEXT PRIMARY KEY NOT NULL,  -- 32-char store path hash
    store_path      TEXT NOT NULL,
    nar_file        TEXT NOT NULL,              -- "<filehash>.nar[.ext]" under /nar/
    file_size       BIGINT,
    file_hash       TEXT,
    nar_hash        TEXT NOT NULL,
    narinfo         TEXT NOT NULL,
    origin          TEXT NOT NULL,              -- upstream base URL, or 'upload'
    created_at      BIGINT NOT NULL,
    last_accessed_at BIGINT NOT NULL
);
CREATE INDEX narinfos_nar_file ON narinfos (nar_file);

-- Where a NAR that is not stored yet can be fetched from, best first.
CREATE TABLE nar_sources (
    nar_file  TEXT NOT NULL,
    url       TEXT NOT NULL,
    upstream  TEXT NOT NULL,
    rank      BIGINT NOT NULL,
    PRIMARY KEY (nar_file, url)
);

-- NAR files whose bytes are stored and verified.
CREATE TABLE nars (
    nar_file        TEXT PRIMARY KEY NOT NULL,
    size            BIGINT NOT NULL,
    sha256          TEXT NOT NULL,              -- hex of the stored bytes
    created_at      BIGINT NOT NULL,
    last_accessed_at BIGINT NOT NULL
);
