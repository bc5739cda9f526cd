-- 016_first_sign_in: when an account first signed in, so that removing a
-- member deletes only an account an invitation made and nobody ever used.
--
-- clusters.remove_users deletes the accounts of provider `email` it leaves
-- in no cluster: behaviour.md calls them never-activated invitees, the
-- accounts clusters.add_users makes for addresses that have none. But a
-- person who signs in by e-mail one-time code signs in with provider
-- `email` too (users.upsert, the sign-in path): removed from their last
-- cluster, such a member lost the account itself, with its profile, its
-- metadata and its id (found by the probe of the axum example). Now
-- users.upsert sets first_signed_in_at, once; an invitation leaves it NULL;
-- and the removal deletes only accounts where it is NULL.
ALTER TABLE users ADD COLUMN first_signed_in_at TIMESTAMPTZ;

-- Accounts from before it: one of another provider signed in (only a
-- sign-in gives one); an e-mail account that owns a cluster or holds a role
-- other than invited signed in to get it (an invitation is accepted, and a
-- cluster made, by a signed-in user). When is not known: the account's
-- creation is the closest time known. The trigger would set updated_at to
-- the time of this migration, so it is off for the backfill (as in 008).
ALTER TABLE users DISABLE TRIGGER users_set_updated_at;
UPDATE users SET first_signed_in_at = created_at
 WHERE provider <> 'email'
    OR EXISTS (SELECT 1 FROM user_clusters m WHERE m.user_id = users.id AND m.role <> 'invited');
ALTER TABLE users ENABLE TRIGGER users_set_updated_at;

-- An account that signed in stays one that did: set back to NULL by hand,
-- it would become an invitee the next removal deletes.
CREATE FUNCTION dployr_users_signed_in_stays() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.first_signed_in_at IS NOT NULL AND NEW.first_signed_in_at IS DISTINCT FROM OLD.first_signed_in_at THEN
        RAISE EXCEPTION 'users.first_signed_in_at of % is set once: it was %', OLD.id, OLD.first_signed_in_at
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'users_first_signed_in_at_set_once';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER users_first_signed_in_at_set_once BEFORE UPDATE OF first_signed_in_at ON users
    FOR EACH ROW EXECUTE FUNCTION dployr_users_signed_in_stays();
