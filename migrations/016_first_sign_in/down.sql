-- Reverting forgets who signed in: an older binary deletes every e-mail
-- account it removes from its last cluster, signed in or not.
DROP TRIGGER users_first_signed_in_at_set_once ON users;
DROP FUNCTION dployr_users_signed_in_stays();
ALTER TABLE users DROP COLUMN first_signed_in_at;
