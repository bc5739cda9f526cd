ALTER TABLE instances DROP CONSTRAINT instances_id_check,
    ADD CONSTRAINT instances_id_check CHECK (id ~ '^[0-9A-HJKMNP-TV-Z]{26}$');
ALTER TABLE clusters DROP CONSTRAINT clusters_id_check,
    ADD CONSTRAINT clusters_id_check CHECK (id ~ '^[0-9A-HJKMNP-TV-Z]{26}$');
ALTER TABLE users DROP CONSTRAINT users_id_check,
    ADD CONSTRAINT users_id_check CHECK (id ~ '^[0-9A-HJKMNP-TV-Z]{26}$');

DROP TRIGGER user_clusters_copy_email ON user_clusters;
CREATE TRIGGER user_clusters_copy_email BEFORE INSERT ON user_clusters
    FOR EACH ROW EXECUTE FUNCTION dployr_user_clusters_copy_email();

DROP TRIGGER instances_after_truncate ON instances;
DROP TRIGGER cluster_counts_after_truncate ON cluster_counts;
DROP TRIGGER user_clusters_after_truncate ON user_clusters;
DROP FUNCTION dployr_after_truncate();

DROP INDEX clusters_github_installation_id_idx;
CREATE INDEX clusters_github_installation_id_idx
    ON clusters ((metadata -> 'gitHub' ->> 'installationId'));
DROP INDEX clusters_github_login_id_idx;
CREATE INDEX clusters_github_login_id_idx
    ON clusters ((metadata -> 'gitHub' ->> 'loginId'));
