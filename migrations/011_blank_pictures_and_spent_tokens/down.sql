DROP TRIGGER bootstrap_tokens_used_once ON bootstrap_tokens;
DROP FUNCTION dployr_bootstrap_token_used_once();
ALTER TABLE user_clusters DROP CONSTRAINT user_clusters_picture_check;
ALTER TABLE users DROP CONSTRAINT users_picture_check;
