ALTER TABLE bootstrap_tokens DROP CONSTRAINT bootstrap_tokens_times_readable;
ALTER TABLE instances DROP CONSTRAINT instances_times_readable, DROP CONSTRAINT instances_metadata_readable;
ALTER TABLE user_clusters DROP CONSTRAINT user_clusters_times_readable;
ALTER TABLE users DROP CONSTRAINT users_times_readable, DROP CONSTRAINT users_metadata_readable;
ALTER TABLE clusters DROP CONSTRAINT clusters_times_readable, DROP CONSTRAINT clusters_metadata_readable;
