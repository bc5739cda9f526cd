-- 011_blank_pictures_and_spent_tokens: two promises the stores keep, and
-- the schema now keeps for every SQL session.
--
-- 1. A picture is a URL or none, never blank. `users.update` stored '' or
--    '   ' as the picture (mended in the store: a blank picture removes
--    it), and `users_copy_profile` copied it into every membership, whose
--    listings then showed a broken image. Blank pictures become none (the
--    copy trigger carries that to the memberships), and a check refuses
--    them from now on. `btrim` trims spaces only, while the store also
--    takes other Unicode white space as blank: the check is the weaker of
--    the two, so it never refuses what the store writes. NOT VALID here,
--    so that no whole-table scan runs under this migration's ACCESS
--    EXCLUSIVE lock; 012 validates the rows already there.
UPDATE users SET picture = NULL WHERE btrim(picture) = '';
-- A blank copy beside a user's real picture (a copy changed by hand) takes
-- the user's picture again, as every copy is the user's.
UPDATE user_clusters m SET picture = u.picture
  FROM users u
 WHERE u.id = m.user_id AND btrim(m.picture) = '';
ALTER TABLE users
    ADD CONSTRAINT users_picture_check CHECK (picture IS NULL OR btrim(picture) <> '') NOT VALID;
ALTER TABLE user_clusters
    ADD CONSTRAINT user_clusters_picture_check CHECK (picture IS NULL OR btrim(picture) <> '') NOT VALID;

-- 2. A bootstrap token is used once: `used_at`, once set, never changes
--    (000_init said so in a comment only). `mark_used` sets it only where
--    it is NULL; an UPDATE by hand that cleared it would let the token be
--    used again. Deleting the token (or its instance) stays allowed.
CREATE FUNCTION dployr_bootstrap_token_used_once() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a bootstrap token that was used stays used'
        USING ERRCODE = 'check_violation',
              CONSTRAINT = TG_NAME,
              TABLE = TG_TABLE_NAME,
              DETAIL = format('used at %s', OLD.used_at);
END;
$$;
CREATE TRIGGER bootstrap_tokens_used_once BEFORE UPDATE OF used_at ON bootstrap_tokens
    FOR EACH ROW
    WHEN (OLD.used_at IS NOT NULL AND NEW.used_at IS DISTINCT FROM OLD.used_at)
    EXECUTE FUNCTION dployr_bootstrap_token_used_once();
