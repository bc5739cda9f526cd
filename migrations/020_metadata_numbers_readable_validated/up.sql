-- 020_metadata_numbers_readable_validated: the checks 019 added NOT VALID
-- now hold for every row, as 018 did for 017's: VALIDATE CONSTRAINT scans
-- under a SHARE UPDATE EXCLUSIVE lock, which lets reads and writes through.
-- A row that fails one could only have been written by hand; the migration
-- stops then, naming the check, the table and how many rows, with the query
-- that finds them: delete them or change the number (send it as a string)
-- and deploy again.
DO $$
DECLARE
    c record;
    failing bigint;
BEGIN
    FOR c IN
        SELECT conrelid::regclass::text AS tbl, conname, pg_get_constraintdef(oid) AS def
          FROM pg_constraint
         WHERE conname IN ('users_metadata_numbers_readable', 'clusters_metadata_numbers_readable',
                           'instances_metadata_numbers_readable')
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
                      HINT = format('Find them with: SELECT * FROM %s WHERE NOT (%s); then delete them, or change '
                                    || 'the number (a string keeps it exactly)', c.tbl,
                                    regexp_replace(c.def, '^CHECK \((.*)\)( NOT VALID)?$', '\1'));
        END IF;
        EXECUTE format('ALTER TABLE %s VALIDATE CONSTRAINT %I', c.tbl, c.conname);
    END LOOP;
END
$$;
