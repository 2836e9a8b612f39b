-- Narinfos served by this cache: the text is stored already rewritten and re-signed.
-- MySQL/MariaDB: utf8mb4_bin compares and sorts bytes as SQLite and PostgreSQL do (keys are
-- case-sensitive); indexed text is VARCHAR (an index key holds at most 3072 bytes).
CREATE TABLE narinfos (
    hash             VARCHAR(64) NOT NULL PRIMARY KEY,  -- 32-char store path hash
    store_path       VARCHAR(1024) NOT NULL,
    nar_file         VARCHAR(255) NOT NULL,             -- "<filehash>.nar[.ext]" under /nar/
    file_size        BIGINT,
    file_hash        VARCHAR(255),
    nar_hash         VARCHAR(255) NOT NULL,
    narinfo          LONGTEXT NOT NULL,
    origin           VARCHAR(1024) NOT NULL,            -- upstream base URL, or 'upload'
    created_at       BIGINT NOT NULL,
    last_accessed_at BIGINT NOT NULL,
    INDEX narinfos_nar_file (nar_file)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Where a NAR that is not stored yet can be fetched from, best first.
CREATE TABLE nar_sources (
    nar_file  VARCHAR(255) NOT NULL,
    url       VARCHAR(512) NOT NULL,
    upstream  VARCHAR(1024) NOT NULL,
    `rank`    BIGINT NOT NULL,
    PRIMARY KEY (nar_file, url)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- NAR files whose bytes are stored and verified.
CREATE TABLE nars (
    nar_file         VARCHAR(255) NOT NULL PRIMARY KEY,
    size             BIGINT NOT NULL,
    sha256           VARCHAR(128) NOT NULL,             -- hex of the stored bytes
    created_at       BIGINT NOT NULL,
    last_accessed_at BIGINT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
