-- Back to 011's state: the same checks, not validated.
ALTER TABLE user_clusters DROP CONSTRAINT user_clusters_picture_check,
    ADD CONSTRAINT user_clusters_picture_check CHECK (picture IS NULL OR btrim(picture) <> '') NOT VALID;
ALTER TABLE users DROP CONSTRAINT users_picture_check,
    ADD CONSTRAINT users_picture_check CHECK (picture IS NULL OR btrim(picture) <> '') NOT VALID;
