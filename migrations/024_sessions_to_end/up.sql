-- 024_sessions_to_end: the sign-out of deleted accounts is finished by a
-- retry, however many accounts a call deleted. `DataLayer::remove_users`
-- and `DataLayer::delete_user` end the sessions of the accounts they delete
-- in a second step, on the key-value backend. When that step failed
-- half-way (on Cloudflare, the account's 1200 requests per 5 minutes run
-- out), a retry found every deleted account of its list again and listed
-- each one's sessions from the first again: a removal of more accounts than
-- one budget holds never finished, and each retry spent the whole budget.
-- Each deleted account is now remembered here, by the statement that
-- deletes it, until its sessions are ended; a retry ends only those still
-- here.
CREATE TABLE sessions_to_end (
    user_id TEXT NOT NULL,
    deleted_at TIMESTAMPTZ NOT NULL,
    CONSTRAINT sessions_to_end_pkey PRIMARY KEY (user_id)
);
COMMENT ON TABLE sessions_to_end IS
    'Deleted accounts whose sessions are not yet known to be ended: DataLayer ends them, then forgets the row.';

-- Remembered by the statement that deletes the accounts (one insert per
-- statement, whatever the number of accounts).
CREATE FUNCTION dployr_users_remember_sessions_to_end() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sessions_to_end (user_id, deleted_at)
    SELECT id, now() FROM gone
    ON CONFLICT (user_id) DO NOTHING;
    RETURN NULL;
END;
$$;
CREATE TRIGGER users_remember_sessions_to_end AFTER DELETE ON users
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION dployr_users_remember_sessions_to_end();

-- TRUNCATE fires no delete trigger: the accounts it is about to remove are
-- remembered first.
CREATE FUNCTION dployr_users_remember_sessions_to_end_before_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sessions_to_end (user_id, deleted_at)
    SELECT id, now() FROM users
    ON CONFLICT (user_id) DO NOTHING;
    RETURN NULL;
END;
$$;
CREATE TRIGGER users_remember_sessions_to_end_on_truncate BEFORE TRUNCATE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION dployr_users_remember_sessions_to_end_before_truncate();
