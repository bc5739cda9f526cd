-- 025_metadata_nesting_with_room: metadata written by hand may nest at most
-- 100 levels (the root object counting as one), not 127. 017 refused what
-- serde_json cannot read at all (128 levels), so a row of 127 levels was
-- read by the stores, but a record that holds its metadata one level or
-- more below its own root (a `User`, a `Cluster`, a page of instances:
-- three levels) serialized to more than serde_json reads back, and a
-- service that sends such a record on (a cache, another service) could not
-- read it (found by a helper's limits probe). No store writes more than 65
-- levels (`Metadata` takes 64, `install_github_integration` adds one); 100
-- leaves 27 for the records and whatever wraps them.
--
-- NOT VALID, under a brief lock; 026 validates the rows already there,
-- naming those that stand in the way, as 018 did.
ALTER TABLE users DROP CONSTRAINT users_metadata_readable,
    ADD CONSTRAINT users_metadata_readable CHECK (NOT jsonb_path_exists(metadata,
        'strict $.**{100} ? (@.type() == "object" || @.type() == "array")')) NOT VALID;
ALTER TABLE clusters DROP CONSTRAINT clusters_metadata_readable,
    ADD CONSTRAINT clusters_metadata_readable CHECK (NOT jsonb_path_exists(metadata,
        'strict $.**{100} ? (@.type() == "object" || @.type() == "array")')) NOT VALID;
ALTER TABLE instances DROP CONSTRAINT instances_metadata_readable,
    ADD CONSTRAINT instances_metadata_readable CHECK (NOT jsonb_path_exists(metadata,
        'strict $.**{100} ? (@.type() == "object" || @.type() == "array")')) NOT VALID;
