-- The function as 004_listing_counts made it.
CREATE OR REPLACE FUNCTION dployr_cluster_counts_apply(deltas JSONB) RETURNS void
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
