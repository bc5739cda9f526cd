-- Back to 004_listing_counts' copy, without the lock.
CREATE OR REPLACE FUNCTION dployr_user_clusters_copy_email() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    SELECT email, name, picture INTO NEW.email, NEW.name, NEW.picture FROM users WHERE id = NEW.user_id;
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
