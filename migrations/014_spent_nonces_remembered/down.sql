-- Reverting forgets the nonces of used tokens that were deleted: a token
-- could then be made again with one, and `mark_used` answer true for it a
-- second time. Refused while there are any; the hint says how to go on
-- knowingly.
-- No token is deleted (and no nonce remembered) between the count and the
-- drop: a delete in flight is waited for, then counted.
LOCK TABLE bootstrap_tokens, spent_nonces IN SHARE ROW EXCLUSIVE MODE;
DO $$
DECLARE
    spent bigint := (SELECT count(*) FROM spent_nonces);
BEGIN
    IF spent > 0 THEN
        RAISE EXCEPTION 'reverting 014_spent_nonces_remembered would forget % spent nonce(s)', spent
            USING ERRCODE = 'object_in_use',
                  HINT = 'Their tokens could be issued again and used a second time. To revert anyway, '
                      || 'DELETE FROM spent_nonces first (and issue no token with those nonces).';
    END IF;
END $$;
DROP TRIGGER bootstrap_tokens_renamed ON bootstrap_tokens;
DROP FUNCTION dployr_bootstrap_tokens_renamed();
DROP TRIGGER bootstrap_tokens_nonce_not_spent ON bootstrap_tokens;
DROP FUNCTION dployr_bootstrap_tokens_nonce_not_spent();
DROP TRIGGER bootstrap_tokens_remember_spent_on_truncate ON bootstrap_tokens;
DROP FUNCTION dployr_bootstrap_tokens_before_truncate();
DROP TRIGGER bootstrap_tokens_remember_spent ON bootstrap_tokens;
DROP FUNCTION dployr_bootstrap_tokens_remember_spent();
DROP TABLE spent_nonces;
