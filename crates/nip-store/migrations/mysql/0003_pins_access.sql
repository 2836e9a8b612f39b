-- Entries kept by eviction whatever their age: artifact keys or store path hashes.
CREATE TABLE pins (
    `key`      VARCHAR(255) NOT NULL PRIMARY KEY,
    created_at BIGINT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE INDEX nars_last_accessed ON nars (last_accessed_at);
