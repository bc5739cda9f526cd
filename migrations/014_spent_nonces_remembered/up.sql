-- 014_spent_nonces_remembered: `mark_used(nonce)` is true exactly once per
-- nonce. A used token went with its instance (the foreign key cascades), and
-- the nonce with it: a token made again with that nonce, for another
-- instance, could be used a second time. The nonces of used tokens that are
-- deleted are now remembered, and a token is never made again with one.
CREATE TABLE spent_nonces (
    nonce TEXT NOT NULL,
    used_at TIMESTAMPTZ NOT NULL,
    CONSTRAINT spent_nonces_pkey PRIMARY KEY (nonce)
);
COMMENT ON TABLE spent_nonces IS
    'Nonces of used bootstrap tokens that were deleted (with their instance): no token is made with one again.';

-- Remembered by the statement that deletes the tokens (one insert per
-- statement, whatever the number of tokens).
CREATE FUNCTION dployr_bootstrap_tokens_remember_spent() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO spent_nonces (nonce, used_at)
    SELECT nonce, used_at FROM gone WHERE used_at IS NOT NULL
    ON CONFLICT (nonce) DO NOTHING;
    RETURN NULL;
END;
$$;
CREATE TRIGGER bootstrap_tokens_remember_spent AFTER DELETE ON bootstrap_tokens
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION dployr_bootstrap_tokens_remember_spent();

-- TRUNCATE fires no delete trigger: the used tokens it is about to remove
-- are remembered first (also when it cascades from instances).
CREATE FUNCTION dployr_bootstrap_tokens_before_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO spent_nonces (nonce, used_at)
    SELECT nonce, used_at FROM bootstrap_tokens WHERE used_at IS NOT NULL
    ON CONFLICT (nonce) DO NOTHING;
    RETURN NULL;
END;
$$;
CREATE TRIGGER bootstrap_tokens_remember_spent_on_truncate BEFORE TRUNCATE ON bootstrap_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION dployr_bootstrap_tokens_before_truncate();

-- A token made with a spent nonce is refused. Looked for after the
-- statement's rows are in, not before: a creation racing the delete of the
-- used token that holds its nonce waits on that token's primary key until
-- the delete commits (or fails at once on it while it is not deleted), and
-- only then looks, with a snapshot that sees the nonce remembered. One
-- lookup per statement, on its new rows.
CREATE FUNCTION dployr_bootstrap_tokens_nonce_not_spent() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    spent TEXT;
BEGIN
    SELECT s.nonce INTO spent FROM made JOIN spent_nonces AS s USING (nonce) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'the nonce % of a used bootstrap token is never used again', spent
            USING ERRCODE = 'unique_violation',
                  CONSTRAINT = 'bootstrap_tokens_nonce_not_spent',
                  TABLE = TG_TABLE_NAME,
                  HINT = 'make a new nonce for every token';
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER bootstrap_tokens_nonce_not_spent AFTER INSERT ON bootstrap_tokens
    REFERENCING NEW TABLE AS made
    FOR EACH STATEMENT EXECUTE FUNCTION dployr_bootstrap_tokens_nonce_not_spent();

-- Renamed by hand: an unused token may not take a spent nonce, and a used
-- token keeps its own (renamed, it would free it for a new token).
CREATE FUNCTION dployr_bootstrap_tokens_renamed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.used_at IS NOT NULL THEN
        RAISE EXCEPTION 'a used bootstrap token keeps its nonce'
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'bootstrap_tokens_used_keep_nonce',
                  TABLE = TG_TABLE_NAME;
    END IF;
    IF EXISTS (SELECT 1 FROM spent_nonces WHERE nonce = NEW.nonce) THEN
        RAISE EXCEPTION 'the nonce % of a used bootstrap token is never used again', NEW.nonce
            USING ERRCODE = 'unique_violation',
                  CONSTRAINT = 'bootstrap_tokens_nonce_not_spent',
                  TABLE = TG_TABLE_NAME,
                  HINT = 'make a new nonce for every token';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER bootstrap_tokens_renamed BEFORE UPDATE OF nonce ON bootstrap_tokens
    FOR EACH ROW WHEN (NEW.nonce IS DISTINCT FROM OLD.nonce)
    EXECUTE FUNCTION dployr_bootstrap_tokens_renamed();
