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

-- The delete of a used token and the creation of a token with its nonce
-- take one transaction-scoped advisory lock per nonce (class 20140, apart
-- from the migration runner's single-key lock), the delete before it
-- removes the row: a creation that waited for it sees the nonce remembered;
-- one that came first meets the token still there (its primary key).
CREATE FUNCTION dployr_lock_nonce(nonce TEXT) RETURNS void
LANGUAGE sql AS $$ SELECT pg_advisory_xact_lock(20140, hashtext(nonce)) $$;

CREATE FUNCTION dployr_bootstrap_tokens_before_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM dployr_lock_nonce(OLD.nonce);
    RETURN OLD;
END;
$$;
CREATE TRIGGER bootstrap_tokens_lock_spent_nonce BEFORE DELETE ON bootstrap_tokens
    FOR EACH ROW WHEN (OLD.used_at IS NOT NULL)
    EXECUTE FUNCTION dployr_bootstrap_tokens_before_delete();

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

CREATE FUNCTION dployr_bootstrap_tokens_nonce_not_spent() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM dployr_lock_nonce(NEW.nonce);
    IF EXISTS (SELECT 1 FROM spent_nonces WHERE nonce = NEW.nonce) THEN
        RAISE EXCEPTION 'the nonce of a used bootstrap token is never used again'
            USING ERRCODE = 'unique_violation',
                  CONSTRAINT = TG_NAME,
                  TABLE = TG_TABLE_NAME,
                  HINT = 'make a new nonce for every token';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER bootstrap_tokens_nonce_not_spent BEFORE INSERT OR UPDATE OF nonce ON bootstrap_tokens
    FOR EACH ROW EXECUTE FUNCTION dployr_bootstrap_tokens_nonce_not_spent();

-- A used token keeps its nonce: renamed, it would free the nonce for a new
-- token (the same hole by hand).
CREATE FUNCTION dployr_bootstrap_tokens_keep_nonce() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a used bootstrap token keeps its nonce'
        USING ERRCODE = 'check_violation',
              CONSTRAINT = TG_NAME,
              TABLE = TG_TABLE_NAME;
END;
$$;
CREATE TRIGGER bootstrap_tokens_used_keep_nonce BEFORE UPDATE OF nonce ON bootstrap_tokens
    FOR EACH ROW WHEN (OLD.used_at IS NOT NULL AND NEW.nonce IS DISTINCT FROM OLD.nonce)
    EXECUTE FUNCTION dployr_bootstrap_tokens_keep_nonce();
