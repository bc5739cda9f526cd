DROP TRIGGER user_clusters_set_updated_at ON user_clusters;
CREATE TRIGGER user_clusters_set_updated_at BEFORE UPDATE ON user_clusters
    FOR EACH ROW EXECUTE FUNCTION dployr_set_updated_at();

-- The function as 008_update_times made it.
CREATE OR REPLACE FUNCTION dployr_set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW IS DISTINCT FROM OLD THEN
        NEW.updated_at := greatest(clock_timestamp(), OLD.updated_at + interval '1 microsecond', NEW.created_at);
    ELSE
        NEW.updated_at := OLD.updated_at;
    END IF;
    RETURN NEW;
END;
$$;
