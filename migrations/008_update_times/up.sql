-- 008_update_times: a row's updated_at is never before its created_at, and
-- a real change never moves it back.
--
-- dployr_set_updated_at (000_init) set updated_at to now(), the time the
-- updating transaction started. A transaction that started, waited for a
-- lock, and then changed a row that another transaction had created in the
-- meantime wrote an updated_at before that row's created_at; two changes of
-- one row could also leave it at the earlier of their starts. Seen by the
-- stress checker: memberships "updated" 1 to 6 ms before they were created,
-- from the first second of a two-minute run on.
--
-- Now a real change sets updated_at to the time of the change itself
-- (clock_timestamp()), and never to less than just after the previous
-- update nor less than the row's created_at, whatever the server's clock
-- did meanwhile. A no-op update still keeps the old timestamp. A check on
-- every table with the two columns refuses what the trigger cannot stop (an
-- INSERT that sets both).

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

-- Rows the old trigger left updated before they were created: the change
-- came within milliseconds after the creation (the window above), so the
-- creation time is the closest value known. The trigger would set the time
-- of this migration instead, so it is turned off for the repair. Then the
-- check. Tables in the stores' lock order (clusters, then users, then
-- memberships: docs/ARCHITECTURE.md), so that a write running beside the
-- migration rather waits for it than deadlocks with it (what still runs
-- into the runner's lock_timeout is rolled back and tried again whole).
DO $$
DECLARE
    t TEXT;
BEGIN
    FOREACH t IN ARRAY ARRAY['clusters', 'users', 'user_clusters', 'instances', 'bootstrap_tokens', 'kv_entries'] LOOP
        EXECUTE format('ALTER TABLE %I DISABLE TRIGGER %I', t, t || '_set_updated_at');
        EXECUTE format('UPDATE %I SET updated_at = created_at WHERE updated_at < created_at', t);
        EXECUTE format('ALTER TABLE %I ENABLE TRIGGER %I', t, t || '_set_updated_at');
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (updated_at >= created_at)', t, t || '_updated_at_check');
    END LOOP;
END
$$;
