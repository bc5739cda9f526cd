-- 003_email_identity: stored e-mail addresses brought to the rule of
-- `dployr_domain::Email` (docs/EMAIL.md): one person, one address.
--
-- Rows written before this migration are trimmed and lower-cased (the old
-- rule, enforced by users_email_check). What the new rule changes in them:
--   1. Unicode NFC (`cafe` + U+0301 becomes `café`): PostgreSQL's
--      normalize(), the same Unicode algorithm as the application's.
--   2. One trailing dot of the domain removed (`dot@x.io.` is `dot@x.io`).
--   3. A non-ASCII domain mapped by IDNA (UTS 46) to its ASCII form
--      (`bücher.de` is `xn--bcher-kva.de`).
-- Steps 1 and 2 are done here, in SQL, inside this migration's transaction.
-- Step 3 is not: UTS 46 is a mapping table plus Punycode, and writing them
-- in PL/pgSQL would be a second, hand-written copy of Unicode tables that
-- could disagree with the `idna` crate. Such rows are rare (internationalised
-- mail domains), so the migration refuses to run, naming their ids, and the
-- operator rewrites them (the message says how) before running it again.
-- Rows the new rule would refuse outright (`a@b`, invisible characters) are
-- left as they are: they stay readable, and cannot sign in again, which
-- they never could in practice (no mail reaches them).
--
-- Whether this SQL and the Rust rule agree is tested, on a corpus, by
-- tests/tests/email_migration.rs (function dployr_email_identity below vs.
-- Email::parse), together with the collision refusal.
--
-- If two rows would become one address, the migration refuses to run and
-- names both ids: merging two accounts is a decision for a person, not for
-- a migration.

-- The new form of a stored address as far as SQL can compute it; NULL when
-- its domain needs IDNA. Kept (not dropped) so the agreement test can call it.
CREATE FUNCTION dployr_email_identity(address TEXT) RETURNS TEXT
    LANGUAGE plpgsql STABLE STRICT
AS $$
DECLARE
    normal TEXT := normalize(btrim(address), NFC);
    local_part TEXT;
    domain TEXT;
BEGIN
    -- Stored rows are lower-case already; only ASCII is folded here, so the
    -- result does not depend on the database's locale.
    normal := translate(normal, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz');
    IF normal !~ '^[^@]+@[^@]+$' THEN
        RETURN normal;
    END IF;
    local_part := split_part(normal, '@', 1);
    domain := regexp_replace(split_part(normal, '@', 2), '\.$', '');
    IF domain ~ '[^\x01-\x7f]' THEN
        RETURN NULL;
    END IF;
    RETURN local_part || '@' || domain;
END
$$;

DO $$
DECLARE
    needs_idna TEXT;
    collisions TEXT;
BEGIN
    SELECT string_agg(format('%s (%s)', id, email), ', ' ORDER BY id) INTO needs_idna
    FROM users WHERE dployr_email_identity(email) IS NULL;
    IF needs_idna IS NOT NULL THEN
        RAISE EXCEPTION 'users % have an internationalised mail domain, which SQL cannot map by IDNA', needs_idna
            USING HINT = 'rewrite each domain to its ASCII form (what dployr_domain::Email::parse gives, e.g. '
                      || 'xn--bcher-kva.de for bücher.de) with users_email_immutable disabled, then run again';
    END IF;
    SELECT string_agg(format('%s become %s', ids, normal), '; ' ORDER BY normal) INTO collisions
    FROM (
        SELECT dployr_email_identity(email) AS normal, string_agg(id, ' and ' ORDER BY id) AS ids
        FROM users GROUP BY 1 HAVING count(*) > 1
    ) AS colliding;
    IF collisions IS NOT NULL THEN
        RAISE EXCEPTION 'users would share one e-mail address: %', collisions
            USING HINT = 'merge or delete the duplicates first; this migration never merges accounts';
    END IF;
END
$$;

ALTER TABLE users DISABLE TRIGGER users_email_immutable;
UPDATE users SET email = dployr_email_identity(email) WHERE email <> dployr_email_identity(email);
ALTER TABLE users ENABLE TRIGGER users_email_immutable;

-- The copy that member pages sort on follows.
UPDATE user_clusters AS m SET email = u.email FROM users AS u WHERE u.id = m.user_id AND m.email <> u.email;
