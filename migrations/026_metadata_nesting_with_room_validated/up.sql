-- 026_metadata_nesting_with_room_validated: 025's bound now holds for every
-- row. VALIDATE CONSTRAINT scans the table under a SHARE UPDATE EXCLUSIVE
-- lock, which lets reads and writes through. A row that fails it could only
-- have been written by hand; the migration stops then, naming the check,
-- the table and how many rows, with the query that finds them: nest their
-- metadata less deeply (or delete them) and deploy again.
DO $$
DECLARE
    c record;
    failing bigint;
BEGIN
    FOR c IN
        SELECT conrelid::regclass::text AS tbl, conname, pg_get_constraintdef(oid) AS def
          FROM pg_constraint
         WHERE conname IN ('clusters_metadata_readable', 'users_metadata_readable', 'instances_metadata_readable')
           AND NOT convalidated
         ORDER BY conname
    LOOP
        EXECUTE format('SELECT count(*) FROM %s WHERE NOT (%s)', c.tbl,
                       regexp_replace(c.def, '^CHECK \((.*)\)( NOT VALID)?$', '\1'))
            INTO failing;
        IF failing > 0 THEN
            RAISE EXCEPTION '% row(s) of % hold metadata nested more than 100 levels (check %)', failing, c.tbl, c.conname
                USING ERRCODE = 'check_violation',
                      CONSTRAINT = c.conname,
                      HINT = format('Find them with: SELECT * FROM %s WHERE NOT (%s); then nest their metadata '
                                    || 'less deeply, or delete them', c.tbl,
                                    regexp_replace(c.def, '^CHECK \((.*)\)( NOT VALID)?$', '\1'));
        END IF;
        EXECUTE format('ALTER TABLE %s VALIDATE CONSTRAINT %I', c.tbl, c.conname);
    END LOOP;
END
$$;
