-- 017_rows_the_stores_can_read: what no store writes, but SQL written by
-- hand could, and that the stores then cannot read back (found by the
-- review of the instances store): the schema now refuses it, as 010 did for
-- other hand-written states.
--
-- 1. Times the stores cannot read or page by: 'infinity' (and any time
--    past year 9999) fails every read of its row (chrono's range), and an
--    instance created before year 1 or after 9999 broke the instance
--    listing: its first page starts just before the end of year 9999, so a
--    later one was counted in `total` and never listed, and a cursor made
--    from an earlier one was refused as not one of the listing's. Every time
--    the stores read is within years 1 to 9999, as their cursors are.
-- 2. Metadata nested 128 levels or more: serde_json, which reads jsonb for
--    diesel, stops at 127, so such a row failed every read of it (a user
--    who could no longer sign in, a cluster whose instances could no longer
--    be listed). `Metadata` refuses more than 64 before any write; the
--    check is on what cannot be read at all.
--
-- NOT VALID: added without a scan, under a brief lock; new and changed rows
-- are checked from now on. 018 validates them (a scan that lets reads and
-- writes through), naming the rows that stand in the way, if any.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT * FROM (VALUES
        ('clusters', ARRAY['created_at', 'updated_at'], true),
        ('users', ARRAY['created_at', 'updated_at'], true),
        ('user_clusters', ARRAY['created_at', 'updated_at'], false),
        ('instances', ARRAY['created_at', 'updated_at'], true),
        ('bootstrap_tokens', ARRAY['created_at', 'updated_at', 'used_at'], false)
    ) AS v (tbl, times, has_metadata) LOOP
        EXECUTE format(
            'ALTER TABLE %I ADD CONSTRAINT %I CHECK (%s) NOT VALID',
            t.tbl, t.tbl || '_times_readable',
            (SELECT string_agg(format(
                '(%1$I IS NULL OR (%1$I >= ''0001-01-01 00:00:00+00'' AND %1$I < ''10000-01-01 00:00:00+00''))', c),
                ' AND ') FROM unnest(t.times) AS c));
        IF t.has_metadata THEN
            EXECUTE format(
                'ALTER TABLE %I ADD CONSTRAINT %I CHECK (NOT jsonb_path_exists(metadata, '
                || '''strict $.**{127} ? (@.type() == "object" || @.type() == "array")'')) NOT VALID',
                t.tbl, t.tbl || '_metadata_readable');
        END IF;
    END LOOP;
END
$$;
