ALTER TABLE user_clusters ALTER COLUMN email TYPE TEXT COLLATE "default";
