-- Back to 017's state: the same checks, not validated.
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT conrelid::regclass::text AS tbl, conname, pg_get_constraintdef(oid) AS def
          FROM pg_constraint
         WHERE conname IN ('clusters_times_readable', 'clusters_metadata_readable', 'users_times_readable',
                           'users_metadata_readable', 'user_clusters_times_readable', 'instances_times_readable',
                           'instances_metadata_readable', 'bootstrap_tokens_times_readable')
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I, ADD CONSTRAINT %I %s NOT VALID',
                       c.tbl, c.conname, c.conname, c.def);
    END LOOP;
END
$$;
