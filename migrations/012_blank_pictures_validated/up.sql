-- 012_blank_pictures_validated: the checks 011 added NOT VALID now hold
-- for every row. VALIDATE CONSTRAINT scans the table under a SHARE UPDATE
-- EXCLUSIVE lock, which lets reads and writes through (011 emptied the
-- blank pictures, and its checks refused new ones since).
ALTER TABLE users VALIDATE CONSTRAINT users_picture_check;
ALTER TABLE user_clusters VALIDATE CONSTRAINT user_clusters_picture_check;
