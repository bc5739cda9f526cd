-- 023_times_of_use_validated: the checks 021 added NOT VALID hold for
-- every row once 022 mended the tokens: bootstrap_tokens_used_at_check (no
-- token used before it was made) and users_first_signed_in_at_check (no
-- account signed in to before it was made). VALIDATE CONSTRAINT scans the
-- table under a SHARE UPDATE EXCLUSIVE lock, which lets reads and writes
-- through. An account signed in to before it was made was changed by hand
-- (the stores never write one): the migration stops then, naming the
-- check, the table and how many rows, with the query that finds them and
-- how to mend them (the time set to the row's created_at, with the trigger
-- that keeps it set once disabled), and deploy again.
DO $$
DECLARE
    c record;
    failing bigint;
BEGIN
    FOR c IN
        SELECT conrelid::regclass::text AS tbl, conname, pg_get_constraintdef(oid) AS def,
               CASE conname WHEN 'bootstrap_tokens_used_at_check' THEN 'used_at'
                            ELSE 'first_signed_in_at' END AS col,
               CASE conname WHEN 'bootstrap_tokens_used_at_check' THEN 'bootstrap_tokens_used_once'
                            ELSE 'users_first_signed_in_at_set_once' END AS set_once
          FROM pg_constraint
         WHERE conname IN ('bootstrap_tokens_used_at_check', 'users_first_signed_in_at_check')
           AND NOT convalidated
         ORDER BY conname
    LOOP
        EXECUTE format('SELECT count(*) FROM %s WHERE NOT (%s)', c.tbl,
                       regexp_replace(c.def, '^CHECK \((.*)\)( NOT VALID)?$', '\1'))
            INTO failing;
        IF failing > 0 THEN
            RAISE EXCEPTION '% row(s) of % fail the check %: a time of use before the row was made', failing, c.tbl, c.conname
                USING ERRCODE = 'check_violation',
                      CONSTRAINT = c.conname,
                      HINT = format('Find them with: SELECT * FROM %1$s WHERE NOT (%2$s); then mend them with '
                                    || 'the trigger %3$s disabled: ALTER TABLE %1$s DISABLE TRIGGER %3$s; '
                                    || 'UPDATE %1$s SET %4$I = created_at WHERE NOT (%2$s); '
                                    || 'ALTER TABLE %1$s ENABLE TRIGGER %3$s', c.tbl,
                                    regexp_replace(c.def, '^CHECK \((.*)\)( NOT VALID)?$', '\1'),
                                    c.set_once, c.col);
        END IF;
        EXECUTE format('ALTER TABLE %s VALIDATE CONSTRAINT %I', c.tbl, c.conname);
    END LOOP;
END
$$;
