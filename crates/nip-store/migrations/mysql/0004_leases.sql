-- Leases: which instance runs a cluster-wide job (eviction, retention) until when. A lease whose
-- expiry has passed is free, so a crashed holder blocks nobody for longer than its term.
CREATE TABLE leases (
    name       VARCHAR(255) NOT NULL PRIMARY KEY,
    holder     VARCHAR(255) NOT NULL,
    expires_at BIGINT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
