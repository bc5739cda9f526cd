-- 012_blank_pictures_validated: the checks 011 added NOT VALID now hold
-- for every row. VALIDATE CONSTRAINT scans the table under a SHARE UPDATE
-- EXCLUSIVE lock, which lets reads and writes through (011 emptied the
-- blank pictures, and its checks refused new ones since).
--
-- 011's clean-up is run again first: a blank picture written by a server
-- of the previous version while 011 ran (after its UPDATE took its
-- snapshot, before its ALTER TABLE took its lock) passed the checks, which
-- were NOT VALID, and would make this validation fail on every deploy.
UPDATE users SET picture = NULL WHERE btrim(picture) = '';
UPDATE user_clusters m SET picture = u.picture
  FROM users u
 WHERE u.id = m.user_id AND btrim(m.picture) = '';
ALTER TABLE users VALIDATE CONSTRAINT users_picture_check;
ALTER TABLE user_clusters VALIDATE CONSTRAINT user_clusters_picture_check;
