-- 021_spent_nonces_guarded: a spent nonce is never held by a token again,
-- whatever the statement, the order of concurrent transactions or their
-- isolation level, and neither the memory of spent nonces nor the order of
-- a token's or an account's times can be broken by hand (found by the probe
-- of the schema's refusals).
--
-- 1. The spent nonces are looked for past any snapshot. 014 read
--    spent_nonces with the statement's snapshot, and three states got
--    through:
--    - one statement that deletes the used token and gives its nonce to
--      another (`WITH spent AS (DELETE ... RETURNING nonce) UPDATE ... SET
--      nonce = spent.nonce`): the rename's check (BEFORE, per row) ran
--      before the delete's statement trigger remembered the nonce;
--    - a rename racing the delete of the used token holding that nonce: the
--      check ran before the rename waited for the delete on the primary
--      key, saw nothing remembered yet, and the rename committed after it;
--    - a token made under REPEATABLE READ (or SERIALIZABLE) while the used
--      token holding its nonce is deleted: the check after the insert
--      waited for the delete all the same, but read spent_nonces with the
--      transaction's snapshot, taken before the delete committed.
--    A snapshot cannot see a nonce spent after it was taken; a unique index
--    can: its check sees every committed row and waits for a transaction
--    in progress that wrote the key. So the new nonces of an INSERT or a
--    rename are now offered to spent_nonces' primary key, after the rows
--    are in (so after any wait on the token's own key), in a
--    subtransaction that is always rolled back (dployr_nonce_spent): a
--    unique_violation there is a nonce spent, whatever the snapshot. That
--    costs each creation of a token a subtransaction and a dead row in
--    spent_nonces (autovacuum's to clear); and whoever inserts tokens needs
--    INSERT on spent_nonces, as whoever deletes them already did.
--    The other order within one statement (the new nonces offered before
--    the statement's delete remembers its nonce: AFTER triggers of one
--    statement fire in no order this can rely on) is refused when the
--    nonces are remembered: the delete's statement trigger refuses to
--    remember a nonce that a token still holds. Between transactions that
--    order cannot happen: a token takes a nonce only once the used token
--    holding it is deleted and committed (the primary key waits for it).
--    The error stays 014's (unique_violation, constraint
--    bootstrap_tokens_nonce_not_spent, same message and hint), which the
--    stores map to a Conflict on the nonce. 014's check before a rename is
--    kept: it refuses early what it can see.
CREATE FUNCTION dployr_nonce_spent(nonces TEXT[]) RETURNS TEXT
LANGUAGE plpgsql AS $$
DECLARE
    n TEXT;
BEGIN
    -- All at once first: when none is spent (every creation by the
    -- stores), one subtransaction. SQLSTATE DN021 is this function's own,
    -- raised only to roll the probe back, and caught here.
    BEGIN
        INSERT INTO spent_nonces (nonce, used_at) SELECT unnest(nonces), now();
        RAISE SQLSTATE 'DN021';
    EXCEPTION
        WHEN SQLSTATE 'DN021' THEN
            RETURN NULL;
        WHEN unique_violation THEN
            NULL;
    END;
    -- One is spent: which (for the message). Under SERIALIZABLE the probe
    -- may fail with serialization_failure instead, which is passed on: the
    -- transaction is retried, and then meets the spent nonce.
    FOREACH n IN ARRAY nonces LOOP
        BEGIN
            INSERT INTO spent_nonces (nonce, used_at) VALUES (n, now());
            RAISE SQLSTATE 'DN021';
        EXCEPTION
            WHEN SQLSTATE 'DN021' THEN
                NULL;
            WHEN unique_violation THEN
                RETURN n;
        END;
    END LOOP;
    -- Spent by a transaction that rolled back between the two probes.
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION dployr_nonce_spent(TEXT[]) IS
    'The first of the nonces that is spent (in spent_nonces, committed or by a transaction it waited for), whatever the snapshot; NULL if none.';

-- The new rows of an INSERT (statement trigger, as in 014) and a renamed
-- token (row trigger: AFTER, so after the wait on the primary key; per row,
-- as a statement trigger with transition tables cannot be limited to
-- updates of the nonce, and `mark_used` should not pay for it).
CREATE OR REPLACE FUNCTION dployr_bootstrap_tokens_nonce_not_spent() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    spent TEXT;
BEGIN
    IF TG_LEVEL = 'ROW' THEN
        spent := dployr_nonce_spent(ARRAY[NEW.nonce]);
    ELSE
        spent := dployr_nonce_spent(ARRAY(SELECT nonce FROM made));
    END IF;
    IF spent IS NOT NULL THEN
        RAISE EXCEPTION 'the nonce % of a used bootstrap token is never used again', spent
            USING ERRCODE = 'unique_violation',
                  CONSTRAINT = 'bootstrap_tokens_nonce_not_spent',
                  TABLE = TG_TABLE_NAME,
                  HINT = 'make a new nonce for every token';
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER bootstrap_tokens_renamed_not_spent AFTER UPDATE OF nonce ON bootstrap_tokens
    FOR EACH ROW WHEN (NEW.nonce IS DISTINCT FROM OLD.nonce)
    EXECUTE FUNCTION dployr_bootstrap_tokens_nonce_not_spent();

-- Remembering refuses a nonce a token still holds (after the statement:
-- the token that took it in the same statement is seen).
CREATE OR REPLACE FUNCTION dployr_bootstrap_tokens_remember_spent() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    held TEXT;
BEGIN
    SELECT t.nonce INTO held
      FROM gone JOIN bootstrap_tokens AS t USING (nonce)
     WHERE gone.used_at IS NOT NULL
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'the nonce % of a used bootstrap token is never used again', held
            USING ERRCODE = 'unique_violation',
                  CONSTRAINT = 'bootstrap_tokens_nonce_not_spent',
                  TABLE = TG_TABLE_NAME,
                  HINT = 'make a new nonce for every token';
    END IF;
    INSERT INTO spent_nonces (nonce, used_at)
    SELECT nonce, used_at FROM gone WHERE used_at IS NOT NULL
    ON CONFLICT (nonce) DO NOTHING;
    RETURN NULL;
END;
$$;

-- 2. spent_nonces is the only memory of a used token that was deleted:
--    `DELETE FROM spent_nonces`, an UPDATE of a nonce or a TRUNCATE by hand
--    let the nonce be issued and used again (what 011 refuses for `SET
--    used_at = NULL`). As 013 does for cluster_counts, a change or delete
--    is refused unless a trigger makes it (at trigger depth 1 or more; a
--    statement typed at a prompt, or sent by a migration, runs at 0), and a
--    TRUNCATE always (no trigger sends one; a TRUNCATE of bootstrap_tokens
--    or instances does not reach this table, and remembers the used tokens
--    it removes by INSERT). An INSERT by hand stays allowed: it only
--    refuses a nonce more. A migration that must forget nonces on purpose
--    disables these triggers for its transaction (and 014's down.sql, the
--    only one that does, runs after this migration is reverted).
CREATE FUNCTION dployr_spent_nonces_kept() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'spent_nonces remembers the nonces of used bootstrap tokens that were deleted; % by hand would let one be used again', TG_OP
        USING ERRCODE = 'integrity_constraint_violation',
              CONSTRAINT = 'spent_nonces_kept_by_triggers',
              TABLE = TG_TABLE_NAME,
              HINT = 'delete the bootstrap tokens; their nonces are remembered here';
END;
$$;
CREATE TRIGGER spent_nonces_kept_by_triggers BEFORE UPDATE OR DELETE ON spent_nonces
    FOR EACH ROW WHEN (pg_trigger_depth() = 0)
    EXECUTE FUNCTION dployr_spent_nonces_kept();
CREATE TRIGGER spent_nonces_not_truncated BEFORE TRUNCATE ON spent_nonces
    FOR EACH STATEMENT EXECUTE FUNCTION dployr_spent_nonces_kept();

-- 3. A token is not used before it was made, nor an account signed in to
--    before it was made. Where each time comes from:
--    - bootstrap_tokens.created_at is the database's now() of the creating
--      transaction (the column's default; `create` sets none), used_at the
--      database's now() of `mark_used`'s statement. One clock, but two
--      transactions: a clock stepped back between them (NTP), or a
--      `mark_used` whose transaction began just before the creation
--      committed, stamps a use before the creation. A plain check would
--      then refuse `mark_used`, and the token could never be used. So, as
--      008 does for updated_at, the database mends what the store writes,
--      and the check refuses the rest: a used_at of now() (the time of use
--      as this transaction reads the clock, what `mark_used` writes) before
--      created_at is raised to created_at; any other time before it is
--      refused.
--    - users.created_at is the database's now() (the default); `upsert`
--      sets first_signed_in_at to the same now() when it creates the
--      account, and to greatest(now(), created_at) when it signs in an
--      account an invitation made; nothing else sets it. The store never
--      writes one before created_at, whatever the clock does: a plain
--      check.
--    No time here comes from the application's clock.
--    NOT VALID, as 011 and 017: added without a scan, under a brief lock;
--    new and changed rows are checked from now on. A row from before this
--    migration may fail them: one changed by hand, or a token used while
--    the clock stood behind its creation (which no migration mended). 022
--    mends such tokens (their use moved to their creation, the closest
--    time known), and 023 validates both checks, naming the rows in the
--    way, as 018 does (an account's first_signed_in_at is mended by hand,
--    with users_first_signed_in_at_set_once disabled). Until then such a row
--    keeps its times, and any update of it is refused: the stores never
--    update a used token, but `users.update` and `users.upsert` of such an
--    account would be, until its time is mended.
CREATE FUNCTION dployr_bootstrap_tokens_used_not_before_creation() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.used_at := NEW.created_at;
    RETURN NEW;
END;
$$;
CREATE TRIGGER bootstrap_tokens_used_not_before_creation BEFORE INSERT OR UPDATE OF used_at ON bootstrap_tokens
    FOR EACH ROW WHEN (NEW.used_at < NEW.created_at AND NEW.used_at = now())
    EXECUTE FUNCTION dployr_bootstrap_tokens_used_not_before_creation();
ALTER TABLE bootstrap_tokens
    ADD CONSTRAINT bootstrap_tokens_used_at_check CHECK (used_at >= created_at) NOT VALID;
ALTER TABLE users
    ADD CONSTRAINT users_first_signed_in_at_check CHECK (first_signed_in_at >= created_at) NOT VALID;
