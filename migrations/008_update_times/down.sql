ALTER TABLE kv_entries DROP CONSTRAINT kv_entries_updated_at_check;
ALTER TABLE bootstrap_tokens DROP CONSTRAINT bootstrap_tokens_updated_at_check;
ALTER TABLE instances DROP CONSTRAINT instances_updated_at_check;
ALTER TABLE user_clusters DROP CONSTRAINT user_clusters_updated_at_check;
ALTER TABLE clusters DROP CONSTRAINT clusters_updated_at_check;
ALTER TABLE users DROP CONSTRAINT users_updated_at_check;

-- The function as 000_init made it.
CREATE OR REPLACE FUNCTION dployr_set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- A no-op UPDATE keeps the old timestamp: nothing was modified.
    IF NEW IS DISTINCT FROM OLD THEN
        NEW.updated_at := now();
    ELSE
        NEW.updated_at := OLD.updated_at;
    END IF;
    RETURN NEW;
END;
$$;
