-- Reverting forgets which deleted accounts may still have sessions. The
-- code before 024 does not read this table: it ends the sessions of every
-- account of a retried call's list that no longer exists, so nothing it
-- relies on is lost.
DROP TRIGGER users_remember_sessions_to_end_on_truncate ON users;
DROP FUNCTION dployr_users_remember_sessions_to_end_before_truncate();
DROP TRIGGER users_remember_sessions_to_end ON users;
DROP FUNCTION dployr_users_remember_sessions_to_end();
DROP TABLE sessions_to_end;
