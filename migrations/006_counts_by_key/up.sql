-- 006_counts_by_key: the listing totals of 004_listing_counts are changed
-- through the primary key of cluster_counts, not by reading the whole table.
--
-- dployr_cluster_counts_apply found the rows it changes with a join against
-- jsonb_each(deltas), which the planner takes for 100 rows whatever the
-- deltas hold (every set-returning function's default estimate): past a few
-- hundred clusters it chose a hash join over a sequential scan of
-- cluster_counts, twice per write (the lock, then the update). Every
-- membership and instance write read every cluster's totals: with 10 000
-- clusters, 7.5 ms of the 7.9 ms that inserting one instance took on the
-- development machine (auto_explain), and it grows with the clusters.
--
-- Now each cluster's row is updated on its own, by key, in cluster id
-- order: the update takes the row's lock as the separate `FOR NO KEY
-- UPDATE` did, in the same order (docs/ARCHITECTURE.md, "lock order"), so a
-- write that changes several clusters (a user's deletion) still cannot
-- deadlock with another.
CREATE OR REPLACE FUNCTION dployr_cluster_counts_apply(deltas JSONB) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    delta RECORD;
BEGIN
    FOR delta IN SELECT d.key, d.value FROM jsonb_each(deltas) AS d ORDER BY d.key LOOP
        UPDATE cluster_counts
           SET members = members + (delta.value ->> 0)::bigint,
               invites = invites + (delta.value ->> 1)::bigint,
               instances = instances + (delta.value ->> 2)::bigint
         WHERE cluster_id = delta.key;
    END LOOP;
END;
$$;
