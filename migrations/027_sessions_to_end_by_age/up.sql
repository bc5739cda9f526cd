-- 027_sessions_to_end_by_age: `sessions_to_end` (024) remembers every
-- deleted account, and only the data layer's sign-out forgot them: an
-- account deleted through the stores directly (`users.delete`,
-- `clusters.remove_users`, whose callers keep its sessions), or by hand,
-- stayed for good, one row per account (a soak by a helper: about 350 rows
-- a minute, never fewer). Once older than the sessions' TTL, a row names
-- no session a sign-out could still end: every session made before the
-- account was deleted has expired. The data layer forgets such rows at
-- open and with each sign-out's forget, by age: this index finds them.
CREATE INDEX sessions_to_end_deleted_at_idx ON sessions_to_end (deleted_at);
COMMENT ON TABLE sessions_to_end IS
    'Deleted accounts whose sessions are not yet known to be ended: DataLayer ends them, then forgets the row; or forgets it once older than the sessions'' TTL.';
