DROP TRIGGER users_copy_profile ON users;
DROP FUNCTION dployr_users_copy_profile();
CREATE OR REPLACE FUNCTION dployr_user_clusters_copy_email() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    SELECT email INTO NEW.email FROM users WHERE id = NEW.user_id;
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
ALTER TABLE user_clusters DROP COLUMN name, DROP COLUMN picture;
DROP TRIGGER instances_counts_update ON instances;
DROP TRIGGER instances_counts_delete ON instances;
DROP TRIGGER instances_counts_insert ON instances;
DROP FUNCTION dployr_cluster_counts_instances();
DROP TRIGGER user_clusters_counts_update ON user_clusters;
DROP TRIGGER user_clusters_counts_delete ON user_clusters;
DROP TRIGGER user_clusters_counts_insert ON user_clusters;
DROP FUNCTION dployr_cluster_counts_memberships();
DROP FUNCTION dployr_cluster_counts_apply(JSONB);
DROP TRIGGER clusters_counts_create ON clusters;
DROP FUNCTION dployr_cluster_counts_create();
DROP TABLE cluster_counts;
