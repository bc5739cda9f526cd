-- 009_stamps_counts_copies_mended: what earlier migrations left wrong.
--
-- 1. A no-op update of a membership keeps its updated_at, as it does in
--    every other table.
-- 2. The listing totals and the memberships' copies of their users'
--    profiles agree with the rows, counted again once with writers kept out.
--
-- Writers are kept out first, before the trigger's table is altered (SHARE
-- ROW EXCLUSIVE lets reads through), in the stores' lock order
-- (docs/ARCHITECTURE.md: clusters, users, memberships, then instances). A
-- write that took a table lock out of that order (its statements run in
-- their own order) may still meet the migration in a deadlock, which
-- PostgreSQL breaks by aborting one side: the write is retried by the
-- store, the migration, rolled back whole, by the runner.
LOCK TABLE clusters, users, user_clusters, instances IN SHARE ROW EXCLUSIVE MODE;

-- 1. Stamps.
-- dployr_set_updated_at (008_update_times) tells a change from a no-op by
-- comparing the new row with the old one whole. In a BEFORE trigger, a
-- stored generated column is not computed yet: PostgreSQL hands the
-- trigger NULL for it in NEW. user_clusters has one (role_order), so its
-- new row always differed from the old one, and every update of a
-- membership was stamped as a change (clusters.update re-stamped each
-- member it listed, whether its role changed or not).
--
-- Now a table names its stored generated columns to the trigger, as
-- arguments, and they are left out of the comparison (both rows as jsonb,
-- less those keys). A table without any compares the rows whole, as
-- before. A guard test checks that each stamped table names exactly its
-- generated columns.

CREATE OR REPLACE FUNCTION dployr_set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed BOOLEAN;
BEGIN
    IF TG_NARGS = 0 THEN
        changed := NEW IS DISTINCT FROM OLD;
    ELSE
        changed := (to_jsonb(NEW) - TG_ARGV) IS DISTINCT FROM (to_jsonb(OLD) - TG_ARGV);
    END IF;
    IF changed THEN
        NEW.updated_at := greatest(clock_timestamp(), OLD.updated_at + interval '1 microsecond', NEW.created_at);
    ELSE
        NEW.updated_at := OLD.updated_at;
    END IF;
    RETURN NEW;
END;
$$;

DROP TRIGGER user_clusters_set_updated_at ON user_clusters;
CREATE TRIGGER user_clusters_set_updated_at BEFORE UPDATE ON user_clusters
    FOR EACH ROW EXECUTE FUNCTION dployr_set_updated_at('role_order');

-- 2. Totals and copies.
-- 004_listing_counts counted the memberships and instances of each cluster
-- and only then installed the triggers that keep the counts, in the same
-- transaction but without a lock that kept writers out in between: a
-- cluster, membership or instance written by an older process while 004
-- ran (the runner migrates beside live traffic) was counted neither by the
-- first count nor by a trigger. Such a cluster had no row of totals (its
-- listings read 0 forever); such a membership was never counted, and its
-- removal later drove the total below zero, which cluster_counts_not_negative
-- refuses, so the membership could not be removed nor its cluster deleted.
-- 003_email_identity rewrote the memberships' copies of the e-mails with
-- the same gap, and 004 the copies of names and pictures (mended by 007).
--
-- With writers kept out (the lock at the top of this file), every total is
-- counted again and every copy taken again from its user, changing only
-- the rows that differ. A database where nothing slipped through is left
-- as it is. The totals are counted with one pass over each table.

INSERT INTO cluster_counts (cluster_id)
SELECT c.id
  FROM clusters AS c
 WHERE NOT EXISTS (SELECT 1 FROM cluster_counts AS k WHERE k.cluster_id = c.id);

UPDATE cluster_counts AS k
   SET members = n.members, invites = n.invites, instances = n.instances
  FROM (SELECT k.cluster_id,
               coalesce(m.members, 0) AS members,
               coalesce(m.invites, 0) AS invites,
               coalesce(i.instances, 0) AS instances
          FROM cluster_counts AS k
          LEFT JOIN (SELECT cluster_id,
                            count(*) FILTER (WHERE role <> 'invited') AS members,
                            count(*) FILTER (WHERE role = 'invited') AS invites
                       FROM user_clusters
                      GROUP BY cluster_id) AS m ON m.cluster_id = k.cluster_id
          LEFT JOIN (SELECT cluster_id, count(*) AS instances
                       FROM instances
                      GROUP BY cluster_id) AS i ON i.cluster_id = k.cluster_id) AS n
 WHERE k.cluster_id = n.cluster_id
   AND (k.members, k.invites, k.instances) IS DISTINCT FROM (n.members, n.invites, n.instances);

UPDATE user_clusters AS m
   SET email = u.email, name = u.name, picture = u.picture
  FROM users AS u
 WHERE u.id = m.user_id
   AND (m.email, m.name, m.picture) IS DISTINCT FROM (u.email, u.name, u.picture);
