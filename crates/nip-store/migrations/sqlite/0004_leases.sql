-- Leases: which instance runs a cluster-wide job (eviction, retention) until when. A lease whose
-- expiry has passed is free, so a crashed holder blocks nobody for longer than its term.
CREATE TABLE leases (
    name       TEXT PRIMARY KEY NOT NULL,
    holder     TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
