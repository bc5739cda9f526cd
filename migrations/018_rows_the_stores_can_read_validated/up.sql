-- 018_rows_the_stores_can_read_validated: the checks 017 added NOT VALID
-- now hold for every row. VALIDATE CONSTRAINT scans the table under a SHARE
-- UPDATE EXCLUSIVE lock, which lets reads and writes through. A row that
-- fails one could only have been written by hand; the migration stops then,
-- naming the check, the table and how many rows, with the query that finds
-- them: delete or change them (a time within years 1 to 9999, metadata less
-- deeply nested) and deploy again.
DO $$
DECLARE
    c record;
    failing bigint;
BEGIN
    FOR c IN
        SELECT conrelid::regclass::text AS tbl, conname, pg_get_constraintdef(oid) AS def
          FROM pg_constraint
         WHERE conname IN ('clusters_times_readable', 'clusters_metadata_readable', 'users_times_readable',
                           'users_metadata_readable', 'user_clusters_times_readable', 'instances_times_readable',
                           'instances_metadata_readable', 'bootstrap_tokens_times_readable')
           AND NOT convalidated
         ORDER BY conname
    LOOP
        EXECUTE format('SELECT count(*) FROM %s WHERE NOT (%s)', c.tbl,
                       regexp_replace(c.def, '^CHECK \((.*)\)( NOT VALID)?$', '\1'))
            INTO failing;
        IF failing > 0 THEN
            RAISE EXCEPTION '% row(s) of % fail the check %, which the stores need to read them', failing, c.tbl, c.conname
                USING ERRCODE = 'check_violation',
                      CONSTRAINT = c.conname,
                      HINT = format('Find them with: SELECT * FROM %s WHERE NOT (%s); then delete them, or '
                                    || 'change them (times: with the trigger %s disabled, which keeps '
                                    || 'updated_at from going back)', c.tbl,
                                    regexp_replace(c.def, '^CHECK \((.*)\)( NOT VALID)?$', '\1'),
                                    c.tbl || '_set_updated_at');
        END IF;
        EXECUTE format('ALTER TABLE %s VALIDATE CONSTRAINT %I', c.tbl, c.conname);
    END LOOP;
END
$$;
