-- 013_counts_and_copies_kept: two derived values that only triggers kept
-- could still be changed by hand, leaving a state the schema promises
-- never to hold (what the stress checker compares with count(*) and with
-- the users' rows).
--
-- 1. cluster_counts holds the listing totals, kept by the statement
--    triggers of memberships and instances (004, 006) and created with
--    each cluster. `UPDATE cluster_counts SET members = 0` by hand made
--    every page's total wrong, and the next removal drove it below zero,
--    which cluster_counts_not_negative refuses: nothing in the cluster
--    could be removed, nor the cluster deleted. A write to it is now
--    refused unless a trigger makes it (the counting triggers, and the
--    foreign key's cascade when a cluster is deleted, run at trigger
--    depth 1 or more; a statement typed at a prompt, or sent by a
--    migration, at 0). A migration that must count again disables this
--    trigger for its transaction (ALTER TABLE cluster_counts DISABLE
--    TRIGGER cluster_counts_kept_by_triggers), as 009 would have.
CREATE FUNCTION dployr_cluster_counts_kept() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'cluster_counts holds the listing totals the database keeps; % by hand would make them wrong', TG_OP
        USING ERRCODE = 'integrity_constraint_violation',
              CONSTRAINT = TG_NAME,
              TABLE = TG_TABLE_NAME,
              HINT = 'write the memberships or instances; the triggers count them';
END;
$$;
CREATE TRIGGER cluster_counts_kept_by_triggers BEFORE INSERT OR UPDATE OR DELETE ON cluster_counts
    FOR EACH ROW WHEN (pg_trigger_depth() = 0)
    EXECUTE FUNCTION dployr_cluster_counts_kept();

-- 2. A membership's name and picture are copies of its user's (taken on
--    insert and on a change of user or e-mail, 010; carried over when the
--    user's change, 004). `UPDATE user_clusters SET name = ...` by hand
--    kept the copy apart from the user, so member pages showed a name the
--    user never had. Such an update is now refused unless the values are
--    the user's; the copies the users_copy_profile trigger makes run at
--    trigger depth 1 and are not looked at.
CREATE FUNCTION dployr_user_clusters_profile_is_a_copy() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM users
                WHERE id = NEW.user_id
                  AND (name, picture) IS DISTINCT FROM (NEW.name, NEW.picture)) THEN
        RAISE EXCEPTION 'a membership''s name and picture are copies of its user''s (user %)', NEW.user_id
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = TG_NAME,
                  TABLE = TG_TABLE_NAME,
                  HINT = 'update the user; the change reaches every membership';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER user_clusters_profile_is_a_copy BEFORE UPDATE OF name, picture ON user_clusters
    FOR EACH ROW WHEN (pg_trigger_depth() = 0)
    EXECUTE FUNCTION dployr_user_clusters_profile_is_a_copy();
