-- 004_listing_counts: member and instance listings whose cost does not
-- grow with the cluster: totals kept by the database, and members read
-- without a lookup per member (see the end of this file).
--
-- The totals of a cluster's listings (members, invites,
-- instances), kept by the database in the same transaction as every write
-- that changes them, so a page reads its `total` from one row instead of
-- counting the whole listing: a page of a 100 000-member cluster costs what
-- a page of a 50-member one does.
--
-- Exact under concurrency: each write updates the row of its cluster under
-- that row's lock, in the writer's transaction, so the counts and the rows
-- they count are committed (or rolled back) together and any snapshot sees
-- them agree. The counters are updated by statement-level triggers over the
-- statement's transition tables: one UPDATE per statement, whatever the
-- number of rows it wrote. A statement that touches several clusters (the
-- cascade of a user's deletion) locks their rows in cluster id order, the
-- order of every multi-row write (docs/ARCHITECTURE.md), after the
-- memberships and instances themselves.

CREATE TABLE cluster_counts (
    cluster_id TEXT   NOT NULL,
    -- Memberships whose role is not `invited` (owner, admin, developer, viewer).
    members    BIGINT NOT NULL DEFAULT 0,
    -- Memberships whose role is `invited`.
    invites    BIGINT NOT NULL DEFAULT 0,
    instances  BIGINT NOT NULL DEFAULT 0,
    CONSTRAINT cluster_counts_pkey PRIMARY KEY (cluster_id),
    CONSTRAINT cluster_counts_cluster_id_fkey FOREIGN KEY (cluster_id)
        REFERENCES clusters (id) ON DELETE CASCADE,
    CONSTRAINT cluster_counts_not_negative CHECK (members >= 0 AND invites >= 0 AND instances >= 0)
);

COMMENT ON TABLE cluster_counts IS
    'Totals of each cluster''s listings (members, invites, instances), kept by triggers in the writing transaction.';

INSERT INTO cluster_counts (cluster_id, members, invites, instances)
SELECT c.id,
       (SELECT count(*) FROM user_clusters m WHERE m.cluster_id = c.id AND m.role <> 'invited'),
       (SELECT count(*) FROM user_clusters m WHERE m.cluster_id = c.id AND m.role = 'invited'),
       (SELECT count(*) FROM instances i WHERE i.cluster_id = c.id)
FROM clusters c;

CREATE FUNCTION dployr_cluster_counts_create() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cluster_counts (cluster_id) SELECT id FROM created;
    RETURN NULL;
END;
$$;

CREATE TRIGGER clusters_counts_create AFTER INSERT ON clusters
    REFERENCING NEW TABLE AS created
    FOR EACH STATEMENT EXECUTE FUNCTION dployr_cluster_counts_create();

-- Applies per-cluster deltas (cluster_id, members, invites, instances), after
-- locking the rows in cluster id order.
CREATE FUNCTION dployr_cluster_counts_apply(deltas JSONB) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM cluster_counts
     WHERE cluster_id IN (SELECT d.key FROM jsonb_each(deltas) AS d)
     ORDER BY cluster_id
       FOR NO KEY UPDATE;
    UPDATE cluster_counts AS c
       SET members = c.members + (d.value ->> 0)::bigint,
           invites = c.invites + (d.value ->> 1)::bigint,
           instances = c.instances + (d.value ->> 2)::bigint
      FROM jsonb_each(deltas) AS d
     WHERE c.cluster_id = d.key;
END;
$$;

CREATE FUNCTION dployr_cluster_counts_memberships() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    deltas JSONB;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT jsonb_object_agg(cluster_id, jsonb_build_array(m, i, 0)) INTO deltas
          FROM (SELECT cluster_id, count(*) FILTER (WHERE role <> 'invited') AS m,
                       count(*) FILTER (WHERE role = 'invited') AS i
                  FROM added GROUP BY cluster_id) AS per_cluster;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT jsonb_object_agg(cluster_id, jsonb_build_array(-m, -i, 0)) INTO deltas
          FROM (SELECT cluster_id, count(*) FILTER (WHERE role <> 'invited') AS m,
                       count(*) FILTER (WHERE role = 'invited') AS i
                  FROM removed GROUP BY cluster_id) AS per_cluster;
    ELSE
        SELECT jsonb_object_agg(cluster_id, jsonb_build_array(m, i, 0)) INTO deltas
          FROM (SELECT cluster_id, sum(m) AS m, sum(i) AS i
                  FROM (SELECT cluster_id, (role <> 'invited')::int AS m, (role = 'invited')::int AS i FROM added
                        UNION ALL
                        SELECT cluster_id, -(role <> 'invited')::int, -(role = 'invited')::int FROM removed) AS changes
                 GROUP BY cluster_id
                HAVING sum(m) <> 0 OR sum(i) <> 0) AS per_cluster;
    END IF;
    IF deltas IS NOT NULL THEN
        PERFORM dployr_cluster_counts_apply(deltas);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER user_clusters_counts_insert AFTER INSERT ON user_clusters
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION dployr_cluster_counts_memberships();
CREATE TRIGGER user_clusters_counts_delete AFTER DELETE ON user_clusters
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION dployr_cluster_counts_memberships();
CREATE TRIGGER user_clusters_counts_update AFTER UPDATE ON user_clusters
    REFERENCING OLD TABLE AS removed NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION dployr_cluster_counts_memberships();

CREATE FUNCTION dployr_cluster_counts_instances() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    deltas JSONB;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT jsonb_object_agg(cluster_id, jsonb_build_array(0, 0, n)) INTO deltas
          FROM (SELECT cluster_id, count(*) AS n FROM added GROUP BY cluster_id) AS per_cluster;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT jsonb_object_agg(cluster_id, jsonb_build_array(0, 0, -n)) INTO deltas
          FROM (SELECT cluster_id, count(*) AS n FROM removed GROUP BY cluster_id) AS per_cluster;
    ELSE
        SELECT jsonb_object_agg(cluster_id, jsonb_build_array(0, 0, n)) INTO deltas
          FROM (SELECT cluster_id, sum(n) AS n
                  FROM (SELECT cluster_id, 1 AS n FROM added UNION ALL SELECT cluster_id, -1 FROM removed) AS changes
                 GROUP BY cluster_id HAVING sum(n) <> 0) AS per_cluster;
    END IF;
    IF deltas IS NOT NULL THEN
        PERFORM dployr_cluster_counts_apply(deltas);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER instances_counts_insert AFTER INSERT ON instances
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION dployr_cluster_counts_instances();
CREATE TRIGGER instances_counts_delete AFTER DELETE ON instances
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION dployr_cluster_counts_instances();
CREATE TRIGGER instances_counts_update AFTER UPDATE ON instances
    REFERENCING OLD TABLE AS removed NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION dployr_cluster_counts_instances();

-- A membership also copies the member's name and picture, as it already
-- copies their e-mail, so a cluster's members (clusters.get, member pages,
-- the owner) are read from one index range of user_clusters, without a
-- lookup into users per member. A user's name or picture change reaches
-- their memberships in the same transaction (users, then memberships: the
-- lock order of ARCHITECTURE.md).
ALTER TABLE user_clusters ADD COLUMN name TEXT, ADD COLUMN picture TEXT;
UPDATE user_clusters AS m SET name = u.name, picture = u.picture FROM users AS u WHERE u.id = m.user_id;
ALTER TABLE user_clusters ALTER COLUMN name SET NOT NULL;
COMMENT ON COLUMN user_clusters.name IS 'Copy of users.name, kept by triggers, so member listings read no other table.';
COMMENT ON COLUMN user_clusters.picture IS 'Copy of users.picture, kept by triggers, so member listings read no other table.';

CREATE OR REPLACE FUNCTION dployr_user_clusters_copy_email() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    SELECT email, name, picture INTO NEW.email, NEW.name, NEW.picture FROM users WHERE id = NEW.user_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'user % does not exist', NEW.user_id
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'user_clusters_user_id_fkey',
                  TABLE = 'user_clusters',
                  COLUMN = 'user_id';
    END IF;
    RETURN NEW;
END;
$$;

CREATE FUNCTION dployr_users_copy_profile() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE user_clusters SET name = NEW.name, picture = NEW.picture WHERE user_id = NEW.id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER users_copy_profile AFTER UPDATE OF name, picture ON users
    FOR EACH ROW WHEN (OLD.name IS DISTINCT FROM NEW.name OR OLD.picture IS DISTINCT FROM NEW.picture)
    EXECUTE FUNCTION dployr_users_copy_profile();
