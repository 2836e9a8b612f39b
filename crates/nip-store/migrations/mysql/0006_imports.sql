-- Installations taken over once (e.g. an ncps database): what was imported, so it happens once.
CREATE TABLE imports (
    source      VARCHAR(255) NOT NULL PRIMARY KEY,   -- e.g. 'ncps'
    imported_at BIGINT NOT NULL,
    narinfos    BIGINT NOT NULL,
    nars        BIGINT NOT NULL,
    pins        BIGINT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
