ALTER TABLE users DROP CONSTRAINT users_first_signed_in_at_check;
ALTER TABLE bootstrap_tokens DROP CONSTRAINT bootstrap_tokens_used_at_check;
DROP TRIGGER bootstrap_tokens_used_not_before_creation ON bootstrap_tokens;
DROP FUNCTION dployr_bootstrap_tokens_used_not_before_creation();
DROP TRIGGER spent_nonces_not_truncated ON spent_nonces;
DROP TRIGGER spent_nonces_kept_by_triggers ON spent_nonces;
DROP FUNCTION dployr_spent_nonces_kept();
DROP TRIGGER bootstrap_tokens_renamed_not_spent ON bootstrap_tokens;

-- The functions as 014_spent_nonces_remembered made them.
CREATE OR REPLACE FUNCTION dployr_bootstrap_tokens_remember_spent() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO spent_nonces (nonce, used_at)
    SELECT nonce, used_at FROM gone WHERE used_at IS NOT NULL
    ON CONFLICT (nonce) DO NOTHING;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION dployr_bootstrap_tokens_nonce_not_spent() RETURNS trigger
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

DROP FUNCTION dployr_nonce_spent(TEXT[]);
