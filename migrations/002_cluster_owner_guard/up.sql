-- 002_cluster_owner_guard: a live cluster always has exactly one owner.
--
-- "At most one" is the partial unique index of 000_init. "At least one" is
-- kept here by the database itself, whatever statements run in whatever
-- order, so that no store bug, race or hand-written SQL can commit a cluster
-- that nobody may administer. Two triggers:
--
--   * user_clusters_owner_kept (BEFORE DELETE, immediate): an owner row is
--     never deleted while its cluster lives. Only deleting the cluster (whose
--     cascade runs after the cluster row is gone) removes it. This refuses,
--     at the statement, the cascades of users.delete and of the invitee
--     clean-up that raced a transfer of ownership to that user.
--   * clusters_have_an_owner (a constraint trigger, DEFERRABLE INITIALLY
--     DEFERRED): at commit, every cluster whose owner row was demoted,
--     deleted or moved in the transaction, and every cluster created in it,
--     has an owner. A demotion must be paired with a promotion in the same
--     transaction (transfer_ownership demotes first, then promotes, since
--     the unique index is checked at once and must never see two owners).
--
-- Why this holds under concurrency: there is never more than one committed
-- owner row per cluster (the unique index), removing it needs its row lock,
-- and a replacement owner inserted by another transaction waits on that
-- index entry until the remover commits or rolls back. So a commit-time
-- check that sees an owner sees one that no concurrent transaction can take
-- away without its own check failing. Both triggers only read; the stores'
-- own checks run first, so callers get a typed Conflict, never this text.

DO $$
DECLARE
    ownerless TEXT;
BEGIN
    SELECT string_agg(c.id, ', ' ORDER BY c.id) INTO ownerless
    FROM clusters c
    WHERE NOT EXISTS (SELECT 1 FROM user_clusters m WHERE m.cluster_id = c.id AND m.role = 'owner');
    IF ownerless IS NOT NULL THEN
        RAISE EXCEPTION 'clusters without an owner: %', ownerless
            USING HINT = 'give each an owner (INSERT INTO user_clusters ... role ''owner'') or delete it, then migrate again';
    END IF;
END;
$$;

CREATE FUNCTION dployr_user_clusters_owner_kept() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- A cluster being deleted in this transaction is no longer visible here.
    IF OLD.role = 'owner' AND EXISTS (SELECT 1 FROM clusters WHERE id = OLD.cluster_id) THEN
        RAISE EXCEPTION 'the owner % of cluster % cannot be removed while the cluster exists', OLD.user_id, OLD.cluster_id
            USING ERRCODE = 'restrict_violation',
                  CONSTRAINT = 'user_clusters_owner_kept',
                  TABLE = 'user_clusters';
    END IF;
    RETURN OLD;
END;
$$;

CREATE TRIGGER user_clusters_owner_kept BEFORE DELETE ON user_clusters
    FOR EACH ROW WHEN (OLD.role = 'owner') EXECUTE FUNCTION dployr_user_clusters_owner_kept();

CREATE FUNCTION dployr_clusters_have_an_owner() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cluster TEXT;
BEGIN
    IF TG_TABLE_NAME = 'clusters' THEN
        cluster := NEW.id;
    ELSE
        cluster := OLD.cluster_id;
    END IF;
    IF EXISTS (SELECT 1 FROM clusters WHERE id = cluster)
       AND NOT EXISTS (SELECT 1 FROM user_clusters WHERE cluster_id = cluster AND role = 'owner') THEN
        RAISE EXCEPTION 'cluster % would be left without an owner', cluster
            USING ERRCODE = 'integrity_constraint_violation',
                  CONSTRAINT = TG_NAME,
                  TABLE = 'clusters';
    END IF;
    RETURN NULL;
END;
$$;

-- Fires only for owner rows that change: a demotion, a deletion, or a move
-- to another user or cluster (which the stores never do, but SQL can).
CREATE CONSTRAINT TRIGGER clusters_have_an_owner
    AFTER UPDATE OF role, user_id, cluster_id OR DELETE ON user_clusters
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (OLD.role = 'owner')
    EXECUTE FUNCTION dployr_clusters_have_an_owner();

-- A cluster is created with its owner, in one transaction.
CREATE CONSTRAINT TRIGGER clusters_created_with_an_owner
    AFTER INSERT ON clusters
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    EXECUTE FUNCTION dployr_clusters_have_an_owner();

COMMENT ON TRIGGER user_clusters_owner_kept ON user_clusters IS
    'An owner membership is removed only by deleting its cluster.';
COMMENT ON TRIGGER clusters_have_an_owner ON user_clusters IS
    'At commit, a cluster whose owner row changed still has an owner.';
COMMENT ON TRIGGER clusters_created_with_an_owner ON clusters IS
    'At commit, a new cluster has an owner.';
