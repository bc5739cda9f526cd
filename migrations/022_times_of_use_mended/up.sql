-- 022_times_of_use_mended: what 021 refuses from now on, mended in the
-- rows from before it (023 then validates 021's checks).
--
-- 1. A token that holds a nonce spent_nonces remembers (a state hand-written
--    SQL could make before 021, such as one statement that deleted the
--    used token and gave its nonce to another) would answer `mark_used`
--    true a second time: it is marked used now (at the migration's time,
--    or its creation if that is later), as its nonce was already; a NOTICE
--    says how many.
-- 2. A token used before it was made is one the stores stamped while the
--    database's clock stood behind its creation (a clock stepped back
--    between the two transactions; 021 mends such a use as it is written
--    from now on) or one changed by hand: its use is moved to its
--    creation, the closest time known and what 021 writes for such a use.
--    The trigger that keeps a use set once, bootstrap_tokens_used_once, is
--    off for that update only, inside this migration's transaction: its
--    `DISABLE TRIGGER` keeps writers out of bootstrap_tokens until this
--    migration commits, through one scan of that table (a token per
--    instance), which is why the validation is a migration of its own.
DO $$
DECLARE
    marked bigint;
BEGIN
    UPDATE bootstrap_tokens AS t SET used_at = greatest(now(), t.created_at)
      FROM spent_nonces AS s
     WHERE s.nonce = t.nonce AND t.used_at IS NULL;
    GET DIAGNOSTICS marked = ROW_COUNT;
    IF marked > 0 THEN
        RAISE NOTICE '% unused bootstrap token(s) held a nonce already spent: marked used', marked;
    END IF;
END
$$;
ALTER TABLE bootstrap_tokens DISABLE TRIGGER bootstrap_tokens_used_once;
UPDATE bootstrap_tokens SET used_at = created_at WHERE used_at < created_at;
ALTER TABLE bootstrap_tokens ENABLE TRIGGER bootstrap_tokens_used_once;
