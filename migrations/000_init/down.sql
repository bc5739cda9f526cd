-- Reverts 000_init: drops every table and function it created.
DROP TABLE bootstrap_tokens;
DROP TABLE instances;
DROP TABLE user_clusters;
DROP TABLE clusters;
DROP TABLE users;
DROP FUNCTION dployr_user_clusters_no_return_to_invited();
DROP FUNCTION dployr_user_clusters_copy_email();
DROP FUNCTION dployr_users_email_immutable();
DROP FUNCTION dployr_set_updated_at();
