-- 001_kv_store: the table of the PostgreSQL key-value backend (sessions,
-- OAuth state, one-time codes when dployr runs on nothing but PostgreSQL).
--
--   * keys sort by their bytes (COLLATE "C"), the order every backend lists
--     in, and are 1 to 512 bytes like Cloudflare's;
--   * expires_at is compared with now() only (never with a zone-converted
--     time), so the server's TimeZone cannot make a live row look expired;
--   * expired rows are invisible to reads and purged in bounded batches
--     through the partial index on expires_at.

CREATE TABLE kv_entries (
    key        TEXT COLLATE "C" NOT NULL,
    value      BYTEA       NOT NULL,
    expires_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT kv_entries_pkey PRIMARY KEY (key),
    CONSTRAINT kv_entries_key_check CHECK (octet_length(key) BETWEEN 1 AND 512),
    CONSTRAINT kv_entries_value_check CHECK (octet_length(value) <= 26214400)
);

-- The purge walks expired rows oldest first; rows without expiry are not indexed.
CREATE INDEX kv_entries_expires_at_idx ON kv_entries (expires_at) WHERE expires_at IS NOT NULL;

CREATE TRIGGER kv_entries_set_updated_at BEFORE UPDATE ON kv_entries
    FOR EACH ROW EXECUTE FUNCTION dployr_set_updated_at();

COMMENT ON TABLE kv_entries IS 'Key-value entries of the PostgreSQL KV backend; a row past expires_at is dead and purged in batches.';
