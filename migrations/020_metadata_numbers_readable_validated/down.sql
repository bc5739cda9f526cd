-- Back to 019's state: the same checks, not validated.
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT conrelid::regclass::text AS tbl, conname, pg_get_constraintdef(oid) AS def
          FROM pg_constraint
         WHERE conname IN ('users_metadata_numbers_readable', 'clusters_metadata_numbers_readable',
                           'instances_metadata_numbers_readable')
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I, ADD CONSTRAINT %I %s NOT VALID',
                       c.tbl, c.conname, c.conname, c.def);
    END LOOP;
END
$$;
