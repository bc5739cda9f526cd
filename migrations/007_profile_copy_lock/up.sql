-- 007_profile_copy_lock: a membership's copy of its user's name and picture
-- is the user's current one, also when the user changes them while the
-- membership is being inserted.
--
-- 004_listing_counts copied the profile on insert (a BEFORE INSERT trigger
-- reading `users`) and kept it by an AFTER UPDATE trigger on `users` that
-- updates the user's memberships. The insert only took the key-share lock
-- of its foreign-key check, which does not conflict with an update of the
-- name, so the two could interleave, each missing the other:
--   * an insert that copied the old name, then an update of the user that
--     committed first: its trigger could not see the uncommitted
--     membership;
--   * an update not yet committed, then an insert: the insert read the last
--     committed name, and the update's trigger had already run.
-- Either way the membership kept the old name until the next change
-- (reproduced with two sessions; tests stores/races.rs).
--
-- Now the insert reads the user `FOR SHARE`, which conflicts with the
-- update's `FOR NO KEY UPDATE`: an insert waits for an update in progress
-- and reads the name it committed (READ COMMITTED follows the row to its
-- newest version), and an update waits for an insert in progress, after
-- which its trigger sees the new membership. The stores that insert
-- memberships for users they locked first (transfer_ownership, update's
-- roles) take the same lock, so the lock order of docs/ARCHITECTURE.md
-- holds.

CREATE OR REPLACE FUNCTION dployr_user_clusters_copy_email() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    SELECT email, name, picture INTO NEW.email, NEW.name, NEW.picture
      FROM users WHERE id = NEW.user_id
       FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'user % does not exist', NEW.user_id
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'user_clusters_user_id_fkey',
                  TABLE = 'user_clusters',
                  COLUMN = 'user_id';
    END IF;
    RETURN NEW;
END;
$$;

-- Copies the race left behind are mended (the e-mail never changes, so only
-- a name or a picture can differ).
UPDATE user_clusters AS m
   SET name = u.name, picture = u.picture
  FROM users AS u
 WHERE u.id = m.user_id
   AND (m.name, m.picture) IS DISTINCT FROM (u.name, u.picture);
