-- Installations taken over once (e.g. an ncps database): what was imported, so it happens once.
CREATE TABLE imports (
    source      TEXT PRIMARY KEY NOT NULL,   -- e.g. 'ncps'
    imported_at INTEGER NOT NULL,
    narinfos    INTEGER NOT NULL,
    nars        INTEGER NOT NULL,
    pins        INTEGER NOT NULL
);
