-- 000_init: the schema of the dployr data layer.
--
-- Rules the database itself enforces (so no store can forget them):
--   * ids are ULIDs (26 characters of Crockford base32);
--   * timestamps are TIMESTAMPTZ, and updated_at is kept by a trigger;
--   * metadata columns hold a JSON object of at most 128 KiB as text (the
--     stores take 64 KiB per write; this bounds what repeated merges grow);
--   * a user's e-mail is stored trimmed and lower-cased and never changes;
--   * a cluster has at most one owner (a partial unique index, which holds
--     under concurrency, unlike a trigger that checks first);
--   * a membership never goes back to `invited`;
--   * deleting a cluster removes its memberships, instances and tokens.
-- Triggers raise with a CONSTRAINT name so stores map errors by name, not text.

CREATE FUNCTION dployr_set_updated_at() RETURNS trigger
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

CREATE FUNCTION dployr_users_email_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.email IS DISTINCT FROM OLD.email THEN
        RAISE EXCEPTION 'the e-mail of user % cannot change', OLD.id
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'users_email_immutable',
                  TABLE = 'users',
                  COLUMN = 'email';
    END IF;
    RETURN NEW;
END;
$$;

CREATE FUNCTION dployr_user_clusters_no_return_to_invited() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.role <> 'invited' AND NEW.role = 'invited' THEN
        RAISE EXCEPTION 'member % of cluster % cannot go back to invited', OLD.user_id, OLD.cluster_id
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'user_clusters_no_return_to_invited',
                  TABLE = 'user_clusters',
                  COLUMN = 'role';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TABLE users (
    id         TEXT        NOT NULL,
    email      TEXT        NOT NULL,
    name       TEXT        NOT NULL,
    picture    TEXT,
    provider   TEXT        NOT NULL,
    metadata   JSONB       NOT NULL DEFAULT '{}'::jsonb,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT users_pkey PRIMARY KEY (id),
    CONSTRAINT users_email_key UNIQUE (email),
    CONSTRAINT users_id_check CHECK (id ~ '^[0-9A-HJKMNP-TV-Z]{26}$'),
    CONSTRAINT users_email_check CHECK (
        email = lower(btrim(email))
        AND octet_length(email) <= 254
        AND email LIKE '_%@_%'
    ),
    CONSTRAINT users_name_check CHECK (octet_length(name) <= 1024),
    CONSTRAINT users_provider_check CHECK (provider IN ('google', 'github', 'microsoft', 'email')),
    CONSTRAINT users_metadata_check CHECK (jsonb_typeof(metadata) = 'object'),
    CONSTRAINT users_metadata_size CHECK (octet_length(metadata::text) <= 131072)
);

CREATE TRIGGER users_set_updated_at BEFORE UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION dployr_set_updated_at();
CREATE TRIGGER users_email_immutable BEFORE UPDATE OF email ON users
    FOR EACH ROW EXECUTE FUNCTION dployr_users_email_immutable();

CREATE TABLE clusters (
    id         TEXT        NOT NULL,
    name       TEXT        NOT NULL,
    metadata   JSONB       NOT NULL DEFAULT '{}'::jsonb,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT clusters_pkey PRIMARY KEY (id),
    CONSTRAINT clusters_id_check CHECK (id ~ '^[0-9A-HJKMNP-TV-Z]{26}$'),
    CONSTRAINT clusters_name_check CHECK (btrim(name) <> '' AND octet_length(name) <= 1024),
    CONSTRAINT clusters_metadata_check CHECK (jsonb_typeof(metadata) = 'object'),
    CONSTRAINT clusters_metadata_size CHECK (octet_length(metadata::text) <= 131072)
);

CREATE TRIGGER clusters_set_updated_at BEFORE UPDATE ON clusters
    FOR EACH ROW EXECUTE FUNCTION dployr_set_updated_at();
-- install_github_integration looks clusters up by these two keys.
CREATE INDEX clusters_github_login_id_idx
    ON clusters ((metadata -> 'gitHub' ->> 'loginId'));
CREATE INDEX clusters_github_installation_id_idx
    ON clusters ((metadata -> 'gitHub' ->> 'installationId'));

-- A membership copies the member's e-mail (immutable, see above) and derives
-- a sort key from the role, so member listings, ordered by role rank then
-- e-mail, page by keyset over one index: deep pages cost what the first does.
CREATE FUNCTION dployr_user_clusters_copy_email() RETURNS trigger
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

CREATE TABLE user_clusters (
    user_id    TEXT        NOT NULL,
    cluster_id TEXT        NOT NULL,
    role       TEXT        NOT NULL,
    -- Filled by a trigger from users.email; never written by the stores.
    email      TEXT        NOT NULL,
    -- 0 owner, 1 admin, 2 developer, 3 viewer, 4 invited: listings sort by it ascending.
    role_order SMALLINT    NOT NULL GENERATED ALWAYS AS (
        CASE role
            WHEN 'owner' THEN 0
            WHEN 'admin' THEN 1
            WHEN 'developer' THEN 2
            WHEN 'viewer' THEN 3
            ELSE 4
        END
    ) STORED,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT user_clusters_pkey PRIMARY KEY (user_id, cluster_id),
    CONSTRAINT user_clusters_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT user_clusters_cluster_id_fkey FOREIGN KEY (cluster_id)
        REFERENCES clusters (id) ON DELETE CASCADE,
    CONSTRAINT user_clusters_role_check
        CHECK (role IN ('owner', 'admin', 'developer', 'viewer', 'invited'))
);

-- At most one owner per cluster, race-free: two transactions inserting an
-- owner for one cluster cannot both commit.
CREATE UNIQUE INDEX user_clusters_one_owner_per_cluster
    ON user_clusters (cluster_id) WHERE role = 'owner';
-- The foreign key on cluster_id, and the order of members/invites listings
-- (role rank, then e-mail) for keyset pagination and counts.
-- (user_id is the leading column of the primary key, which indexes it.)
CREATE INDEX user_clusters_cluster_id_order_idx ON user_clusters (cluster_id, role_order, email);

CREATE TRIGGER user_clusters_copy_email BEFORE INSERT ON user_clusters
    FOR EACH ROW EXECUTE FUNCTION dployr_user_clusters_copy_email();

CREATE TRIGGER user_clusters_set_updated_at BEFORE UPDATE ON user_clusters
    FOR EACH ROW EXECUTE FUNCTION dployr_set_updated_at();
CREATE TRIGGER user_clusters_no_return_to_invited BEFORE UPDATE OF role ON user_clusters
    FOR EACH ROW EXECUTE FUNCTION dployr_user_clusters_no_return_to_invited();

CREATE TABLE instances (
    id         TEXT        NOT NULL,
    cluster_id TEXT        NOT NULL,
    address    TEXT        NOT NULL,
    tag        TEXT        NOT NULL,
    metadata   JSONB       NOT NULL DEFAULT '{}'::jsonb,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT instances_pkey PRIMARY KEY (id),
    CONSTRAINT instances_address_key UNIQUE (address),
    CONSTRAINT instances_tag_key UNIQUE (tag),
    CONSTRAINT instances_cluster_id_fkey FOREIGN KEY (cluster_id)
        REFERENCES clusters (id) ON DELETE CASCADE,
    CONSTRAINT instances_id_check CHECK (id ~ '^[0-9A-HJKMNP-TV-Z]{26}$'),
    CONSTRAINT instances_address_check CHECK (btrim(address) <> '' AND octet_length(address) <= 1024),
    CONSTRAINT instances_tag_check CHECK (btrim(tag) <> '' AND octet_length(tag) <= 255),
    CONSTRAINT instances_metadata_check CHECK (jsonb_typeof(metadata) = 'object'),
    CONSTRAINT instances_metadata_size CHECK (octet_length(metadata::text) <= 131072)
);

-- The foreign key, and list_by_cluster's order (newest first, id as tie-break
-- for keyset pagination).
CREATE INDEX instances_cluster_id_created_at_idx
    ON instances (cluster_id, created_at DESC, id DESC);

CREATE TRIGGER instances_set_updated_at BEFORE UPDATE ON instances
    FOR EACH ROW EXECUTE FUNCTION dployr_set_updated_at();

CREATE TABLE bootstrap_tokens (
    nonce       TEXT        NOT NULL,
    instance_id TEXT        NOT NULL,
    used_at     TIMESTAMPTZ,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT bootstrap_tokens_pkey PRIMARY KEY (nonce),
    CONSTRAINT bootstrap_tokens_instance_id_fkey FOREIGN KEY (instance_id)
        REFERENCES instances (id) ON DELETE CASCADE,
    CONSTRAINT bootstrap_tokens_nonce_check CHECK (btrim(nonce) <> '' AND octet_length(nonce) <= 255)
);

CREATE INDEX bootstrap_tokens_instance_id_idx ON bootstrap_tokens (instance_id);

CREATE TRIGGER bootstrap_tokens_set_updated_at BEFORE UPDATE ON bootstrap_tokens
    FOR EACH ROW EXECUTE FUNCTION dployr_set_updated_at();

COMMENT ON TABLE users IS 'User accounts; one per e-mail address (stored trimmed and lower-cased, never changed).';
COMMENT ON TABLE clusters IS 'Clusters (organisations): each has at most one owner and holds instances.';
COMMENT ON TABLE user_clusters IS 'Memberships: the role of a user in a cluster (owner, admin, developer, viewer, invited).';
COMMENT ON TABLE instances IS 'Instances: the machines of a cluster, unique by address and by tag.';
COMMENT ON TABLE bootstrap_tokens IS 'Single-use bootstrap tokens of an instance, by nonce; used_at is set once.';
COMMENT ON COLUMN user_clusters.email IS 'Copy of users.email (immutable), filled by a trigger, so member pages sort and seek on one index.';
COMMENT ON COLUMN user_clusters.role_order IS 'Generated from role: 0 owner, 1 admin, 2 developer, 3 viewer, 4 invited.';
COMMENT ON COLUMN bootstrap_tokens.used_at IS 'Set once by mark_used; NULL while the token is unused.';
