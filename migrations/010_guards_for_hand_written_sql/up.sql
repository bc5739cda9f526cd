-- 010_guards_for_hand_written_sql: what the stores never do, but a person at
-- a psql prompt may, no longer leaves a state the schema promises never to
-- hold; and a GitHub key of any size no longer fails its cluster's write.
--
-- 1. The GitHub lookup keys are indexed by hash. install_github_integration
--    finds a cluster by `metadata -> 'gitHub' ->> 'loginId'` (and a caller
--    may by 'installationId'), always with `=`. A btree keeps the key
--    itself, and refuses one past 2704 bytes ("index row size exceeds btree
--    version 4 maximum"): metadata takes 64 KiB, so a long random
--    installationId failed a cluster's update, a GitHub install, or every
--    sign-in of a user whose metadata is merged into that cluster, as a
--    Backend error. A hash index keeps a 4-byte hash and serves `=` alike.
DROP INDEX clusters_github_login_id_idx;
CREATE INDEX clusters_github_login_id_idx
    ON clusters USING hash ((metadata -> 'gitHub' ->> 'loginId'));
DROP INDEX clusters_github_installation_id_idx;
CREATE INDEX clusters_github_installation_id_idx
    ON clusters USING hash ((metadata -> 'gitHub' ->> 'installationId'));

-- 2. TRUNCATE fires no row or statement trigger of INSERT, UPDATE or DELETE:
--    `TRUNCATE user_clusters` left every cluster without an owner (which
--    002_cluster_owner_guard promises no SQL can commit) and its totals
--    counting members that were gone; a later removal then drove a total
--    below zero, which its check refuses, so nothing in the cluster could be
--    removed or deleted again. After a TRUNCATE (the trigger runs once every
--    table of the statement is empty, cascaded ones included):
--    - of memberships or totals while a cluster remains: refused, rolling
--      the TRUNCATE back (`TRUNCATE clusters CASCADE` empties all of them
--      together and is allowed);
--    - of instances: every cluster's instance total is zero again.
CREATE FUNCTION dployr_after_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'instances' THEN
        UPDATE cluster_counts SET instances = 0 WHERE instances <> 0;
    ELSIF EXISTS (SELECT 1 FROM clusters) THEN
        RAISE EXCEPTION 'TRUNCATE of % would leave clusters without their %', TG_TABLE_NAME,
            CASE TG_TABLE_NAME WHEN 'user_clusters' THEN 'owners and listing totals' ELSE 'listing totals' END
            USING ERRCODE = 'integrity_constraint_violation',
                  CONSTRAINT = TG_NAME,
                  TABLE = TG_TABLE_NAME,
                  HINT = 'DELETE the rows (the triggers keep owners and totals), or TRUNCATE clusters CASCADE to empty them all';
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER user_clusters_after_truncate AFTER TRUNCATE ON user_clusters
    FOR EACH STATEMENT EXECUTE FUNCTION dployr_after_truncate();
CREATE TRIGGER cluster_counts_after_truncate AFTER TRUNCATE ON cluster_counts
    FOR EACH STATEMENT EXECUTE FUNCTION dployr_after_truncate();
CREATE TRIGGER instances_after_truncate AFTER TRUNCATE ON instances
    FOR EACH STATEMENT EXECUTE FUNCTION dployr_after_truncate();

-- 3. A membership given to another user takes that user's e-mail, name and
--    picture. The copy was taken on INSERT only, so `UPDATE user_clusters
--    SET user_id = ...` (an account merge by hand) kept the first user's:
--    member pages showed and sorted the wrong address, and two rows of one
--    cluster could share a sort key, which the keyset cursor then skipped.
--    The same for a copy changed by hand (`SET email = ...`): it is taken
--    again from the user, so the sort key stays the user's e-mail.
DROP TRIGGER user_clusters_copy_email ON user_clusters;
CREATE TRIGGER user_clusters_copy_email BEFORE INSERT OR UPDATE OF user_id, email ON user_clusters
    FOR EACH ROW EXECUTE FUNCTION dployr_user_clusters_copy_email();

-- 4. An id is a ULID as the stores read it: 26 Crockford base-32 characters
--    whose first is at most 7 (128 bits). The check took any first
--    character, and a row written by hand with '8...' was read back as
--    another id ('0...') by a decoder that drops the extra bits. Rows the
--    old check let in are named first, rather than failing the new check
--    with no hint of which.
DO $$
DECLARE
    past TEXT;
BEGIN
    SELECT string_agg(format('%s %s', t, id), ', ' ORDER BY t, id) INTO past
      FROM (SELECT 'user' AS t, id FROM users UNION ALL
            SELECT 'cluster', id FROM clusters UNION ALL
            SELECT 'instance', id FROM instances) AS ids
     WHERE id !~ '^[0-7]';
    IF past IS NOT NULL THEN
        RAISE EXCEPTION 'ids past the largest ULID (7ZZZZZZZZZZZZZZZZZZZZZZZZZ), which no store reads back as written: %', past
            USING HINT = 'these rows were written by hand; give them ids the stores made (or delete them), then migrate again';
    END IF;
END;
$$;
ALTER TABLE users DROP CONSTRAINT users_id_check,
    ADD CONSTRAINT users_id_check CHECK (id ~ '^[0-7][0-9A-HJKMNP-TV-Z]{25}$');
ALTER TABLE clusters DROP CONSTRAINT clusters_id_check,
    ADD CONSTRAINT clusters_id_check CHECK (id ~ '^[0-7][0-9A-HJKMNP-TV-Z]{25}$');
ALTER TABLE instances DROP CONSTRAINT instances_id_check,
    ADD CONSTRAINT instances_id_check CHECK (id ~ '^[0-7][0-9A-HJKMNP-TV-Z]{25}$');
