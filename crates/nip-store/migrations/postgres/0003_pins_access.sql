-- Entries kept by eviction whatever their age: artifact keys or store path hashes.
CREATE TABLE pins (
    key        TEXT PRIMARY KEY NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX nars_last_accessed ON nars (last_accessed_at);
